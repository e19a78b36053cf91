"""Evaluation reports built on torchmetrics' functional metrics."""

from __future__ import annotations

import torch
from torch import Tensor
from torchmetrics.functional.classification import (
    multiclass_accuracy,
    multilabel_average_precision,
    multilabel_f1_score,
)


def multiclass_report(scores: Tensor, labels: Tensor) -> dict[str, Tensor]:
    """Top-1, top-5 (when there are more than 5 classes), mean per-class accuracy and the per-class
    accuracies of ``[N, C]`` scores against ``[N]`` labels (rows with label ``-1`` are ignored; a
    class without samples has accuracy NaN and no part in the mean)."""
    keep = labels >= 0
    if not keep.any():
        raise ValueError("no labelled samples to evaluate (every label is -1)")
    scores, labels = scores[keep].float(), labels[keep].long()
    c = scores.shape[1]
    present = torch.bincount(labels, minlength=c) > 0
    per_class = multiclass_accuracy(scores, labels, num_classes=c, average=None).float()
    per_class = torch.where(present.to(per_class.device), per_class, torch.nan)
    out: dict[str, Tensor] = {
        "acc": multiclass_accuracy(scores, labels, num_classes=c, average="micro"),
        "mean_class_acc": per_class.nanmean(),  # over the classes with samples (torchmetrics' macro counts a predicted absent class as 0)
    }
    if c > 5:
        out["acc_top5"] = multiclass_accuracy(scores, labels, num_classes=c, top_k=5, average="micro")
    out["per_class"] = per_class
    return out


def f1_at_top_k(scores: Tensor, targets: Tensor, k: int = 3, mask: Tensor | None = None) -> Tensor:
    """Overall (micro) F1 when each image predicts its ``k`` highest-scoring classes; a prediction
    on an entry where ``mask`` is False (unknown) counts neither for nor against."""
    pred = torch.zeros_like(targets, dtype=torch.bool)
    # ties (scores saturated at 1.0) go to the lower class index, on every device and in every run
    top = scores.argsort(dim=1, descending=True, stable=True)[:, : min(k, scores.shape[1])]
    pred.scatter_(1, top, True)
    if mask is not None:
        pred &= mask.bool()
    tp = (pred & (targets > 0)).sum().float()
    precision = tp / pred.sum().clamp(min=1)
    recall = tp / (targets > 0).sum().clamp(min=1)
    return 2 * precision * recall / (precision + recall).clamp(min=1e-12)


def multilabel_report(
    scores: Tensor, targets: Tensor, mask: Tensor | None = None, threshold: float = 0.5, rank_scores: Tensor | None = None
) -> dict[str, Tensor]:
    """mAP (macro over classes with a positive), per-class AP (NaN for a class without a known
    positive), F1@top-3 (of more than three classes) and F1 at ``threshold``.
    Entries where ``mask`` is False are unknown and ignored. ``rank_scores``, when given, are what
    the per-class APs rank images by (e.g. raw propagation scores whose per-image rescaled
    confidences are ``scores``); the F1 values always read ``scores``."""
    scores, t = scores.float(), targets.long()
    ranked = scores if rank_scores is None else rank_scores.float()
    if mask is not None:
        t = torch.where(mask.bool(), t, torch.full_like(t, -1))
    c = scores.shape[1]
    # AP of the classes with a known positive: no positive, no AP (torchmetrics would give -0.0 with
    # a warning, and cannot score a fully unknown column); the mAP leaves them out
    has_pos = (t == 1).any(0)
    per_class = torch.full((c,), float("nan"), device=ranked.device)
    if int(has_pos.sum()) == 1:  # torchmetrics' multi-label AP needs two labels
        from torchmetrics.functional.classification import binary_average_precision

        col = int(has_pos.nonzero())
        per_class[col] = binary_average_precision(ranked[:, col], t[:, col], ignore_index=-1).float()
    elif has_pos.any():
        ap = multilabel_average_precision(
            ranked[:, has_pos], t[:, has_pos], num_labels=int(has_pos.sum()), average=None, ignore_index=-1
        )
        per_class[has_pos] = ap.reshape(-1).float()
    if c == 1:  # one class (a single seen or unseen class): torchmetrics' multi-label F1 needs two
        from torchmetrics.functional.classification import binary_f1_score

        f1 = binary_f1_score(scores[:, 0], t[:, 0], threshold=threshold, ignore_index=-1)
    else:
        f1 = multilabel_f1_score(scores, t, num_labels=c, threshold=threshold, average="micro", ignore_index=-1)
    out = {"mAP": per_class[has_pos].nanmean() if has_pos.any() else torch.tensor(float("nan"))}
    if c > 3:  # with three classes or fewer every image predicts all of them: no measure of the scores
        out["f1_top3"] = f1_at_top_k(scores, (t == 1).long(), 3, None if mask is None else t >= 0)
    out.update(f1_at_threshold=f1, per_class=per_class)
    return out
