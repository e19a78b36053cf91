import pytest
import torch

from vlweak.labels.selection import k_schedule, top_k_per_class


def _scores(pred: list[int], conf: list[float], c: int = 3) -> torch.Tensor:
    """Rows whose arg-max is ``pred`` with confidence ``conf`` (rest spread evenly)."""
    s = torch.zeros(len(pred), c)
    for i, (p, q) in enumerate(zip(pred, conf)):
        s[i] = (1 - q) / (c - 1)
        s[i, p] = q
    return s


def test_class_balanced_top_k():
    # class 0 predicted 6 times, class 1 four times, class 2 twice: K=2 keeps two of each
    pred = [0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 2, 2]
    conf = [0.9, 0.5, 0.95, 0.6, 0.7, 0.8, 0.4, 0.9, 0.5, 0.8, 0.6, 0.7]
    pos, lab = top_k_per_class(_scores(pred, conf), 2)
    assert torch.bincount(lab, minlength=3).tolist() == [2, 2, 2]
    assert pos.tolist() == [0, 2, 7, 9, 10, 11]  # the most confident of each class, ascending positions
    assert lab.tolist() == [0, 0, 1, 1, 2, 2]


def test_ties_broken_by_position_and_deterministic():
    s = _scores([1] * 6, [0.8] * 6)
    pos, lab = top_k_per_class(s, 3)
    assert pos.tolist() == [0, 1, 2] and lab.tolist() == [1, 1, 1]
    again, _ = top_k_per_class(s.clone(), 3)
    assert torch.equal(pos, again)


def test_k_larger_than_pool_takes_whole_pool_and_none_takes_all():
    pred = [0, 0, 1, 2, 2, 2]
    s = _scores(pred, [0.9, 0.8, 0.7, 0.6, 0.5, 0.4])
    pos, lab = top_k_per_class(s, 100)
    assert pos.tolist() == list(range(6)) and lab.tolist() == pred
    pos_all, lab_all = top_k_per_class(s, None)
    assert torch.equal(pos_all, pos) and torch.equal(lab_all, lab)
    assert top_k_per_class(s, 0)[0].numel() == 0


def test_restricted_classes_relabel_among_allowed():
    # transductive zero-shot: only classes 1 and 2 may be pseudolabels; row 0 prefers 0, then 2
    s = torch.tensor([[0.7, 0.1, 0.2], [0.1, 0.8, 0.1], [0.2, 0.3, 0.5]])
    pos, lab = top_k_per_class(s, 5, classes=[1, 2])
    assert pos.tolist() == [0, 1, 2] and lab.tolist() == [2, 1, 2]


def test_bad_inputs_are_named():
    with pytest.raises(ValueError, match="k"):
        top_k_per_class(torch.rand(4, 3), -1)
    with pytest.raises(ValueError, match="outside"):
        top_k_per_class(torch.rand(4, 3), 2, classes=[5])
    with pytest.raises(ValueError, match="strategy"):
        k_schedule("grp", 100, 10)
    nan = torch.rand(4, 3)
    nan[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"not finite \(first rows \[2\]\)"):
        top_k_per_class(nan, 1)


def test_schedules_follow_the_paper():
    assert k_schedule("fpl", 1000, 10) == [16]
    assert k_schedule("ifpl", 1000, 10) == [16] * 10
    grip = k_schedule("grip", 1000, 10)
    assert len(grip) == 10 and grip[0] == 10 and grip[-2] == 90 and grip[-1] is None
    assert all(a < b for a, b in zip(grip[:-2], grip[1:-1]))
