"""Evaluation reports: multi-label APs rank by the scores they are given."""

from __future__ import annotations

import pytest
import torch

from vlweak.metrics import multilabel_report


def test_ap_ranks_by_rank_scores_and_f1_reads_the_confidences():
    raw = torch.tensor([[0.9, 0.3], [0.1, 0.05], [0.5, 0.6]])
    target = torch.tensor([[1, 0], [0, 1], [1, 1]])
    rescaled = raw / raw.amax(1, keepdim=True)  # per-image rescaling changes each class's ranking
    assert multilabel_report(raw, target)["mAP"].item() == pytest.approx(11 / 12)
    assert multilabel_report(rescaled, target)["mAP"].item() == pytest.approx(19 / 24)
    both = multilabel_report(rescaled, target, rank_scores=raw)
    assert both["mAP"].item() == pytest.approx(11 / 12)
    assert both["f1_at_threshold"].item() == pytest.approx(multilabel_report(rescaled, target)["f1_at_threshold"].item())


def test_unknown_entries_are_ignored():
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.7], [0.2, 0.3]])
    target = torch.tensor([[1, 0], [0, 1], [1, 0]])
    mask = torch.tensor([[True, True], [False, True], [True, True]])
    # with image 1's first label unknown, class 0 ranks image 0 (positive) over image 2 (positive): AP 1
    per_class = multilabel_report(scores, target, mask)["per_class"]
    assert per_class[0].item() == pytest.approx(1.0)


def test_a_class_with_no_observed_entry_is_nan_not_a_crash():
    scores = torch.rand(6, 4)
    target = (torch.rand(6, 4) > 0.5).long()
    target[0] = 1
    mask = torch.ones(6, 4, dtype=torch.bool)
    mask[:, 2] = False
    report = multilabel_report(scores, target, mask)
    assert torch.isnan(report["per_class"][2])
    assert not torch.isnan(report["per_class"][[0, 1, 3]]).any()
    assert torch.isfinite(report["mAP"])


def test_f1_at_top3_ignores_picks_on_unknown_entries():
    scores = torch.tensor([[0.9, 0.8, 0.7, 0.1]])
    target = torch.tensor([[1, 1, 0, 0]])
    mask = torch.tensor([[True, True, False, True]])
    assert multilabel_report(scores, target, mask)["f1_top3"].item() == pytest.approx(1.0)
    assert multilabel_report(scores, target)["f1_top3"].item() == pytest.approx(0.8)


def test_a_class_without_a_positive_has_no_ap_as_the_map_leaves_it_out():
    scores = torch.tensor([[0.9, 0.2, 0.1], [0.3, 0.8, 0.4], [0.6, 0.1, 0.7]])
    target = torch.tensor([[1, 0, 0], [0, 1, 0], [1, 0, 0]])  # class 2 observed everywhere, never positive
    report = multilabel_report(scores, target)
    assert torch.isnan(report["per_class"][2]) and not torch.isnan(report["per_class"][:2]).any()
    assert report["mAP"].item() == pytest.approx(report["per_class"][:2].mean().item())


def test_a_single_class_with_positives_is_scored():
    # one class with a positive, the other none: its AP alone (torchmetrics' multi-label AP needs two)
    scores = torch.tensor([[0.9, 0.2], [0.3, 0.8], [0.6, 0.1]])
    target = torch.tensor([[1, 0], [0, 0], [0, 0]])
    report = multilabel_report(scores, target)
    assert report["per_class"][0].item() == pytest.approx(1.0) and torch.isnan(report["per_class"][1])
    assert report["mAP"].item() == pytest.approx(1.0)


def test_a_one_class_report_is_scored():
    # one seen (or unseen) class of a zero-shot split, or a one-class manifest: AP and F1 of that class
    scores = torch.tensor([[0.9], [0.3], [0.6], [0.2]])
    target = torch.tensor([[1], [0], [1], [1]])
    mask = torch.tensor([[True], [True], [True], [False]])
    report = multilabel_report(scores, target, mask)
    assert report["mAP"].item() == pytest.approx(1.0)
    # known entries: predicted positive (>= 0.5) rows 0 and 2, both right; no positive missed
    assert report["f1_at_threshold"].item() == pytest.approx(1.0)
    assert multilabel_report(scores, target, mask, threshold=0.7)["f1_at_threshold"].item() == pytest.approx(2 / 3)


def test_f1_at_top3_needs_more_than_three_classes_and_breaks_ties_by_class_order():
    target = torch.tensor([[1, 0, 0], [0, 1, 1]])
    # three classes: the top three are all of them, whatever the scores; no F1@top-3 is reported
    assert "f1_top3" not in multilabel_report(torch.rand(2, 3), target)
    # scores saturated at 1.0: the tie goes to the lower class index
    from vlweak.metrics.classification import f1_at_top_k

    scores = torch.tensor([[1.0, 1.0, 1.0, 1.0, 0.2]])
    assert f1_at_top_k(scores, torch.tensor([[1, 1, 1, 0, 0]]), 3).item() == pytest.approx(1.0)
    assert f1_at_top_k(scores, torch.tensor([[0, 0, 0, 1, 1]]), 3).item() == pytest.approx(0.0)
