import pytest
import torch

from vlweak.data import Budgeted, LabelBudget


class _Toy:
    def __init__(self, labels, multilabel=False):
        self.labels, self.multilabel = labels, multilabel

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        if self.multilabel:
            return {"index": i, "target": self.labels[i], "mask": torch.ones_like(self.labels[i], dtype=torch.bool)}
        return {"index": i, "label": int(self.labels[i])}

    def targets(self):
        return self.labels


def test_shots_per_class_and_seed():
    labels = torch.arange(5).repeat(10)
    b = Budgeted(_Toy(labels), LabelBudget(shots=3, seed=1))
    kept = b.targets()
    for c in range(5):
        assert int((kept == c).sum()) == 3
    assert int((kept == -1).sum()) == 35
    again = Budgeted(_Toy(labels), LabelBudget(shots=3, seed=1)).targets()
    assert torch.equal(kept, again)
    assert not torch.equal(kept, Budgeted(_Toy(labels), LabelBudget(shots=3, seed=2)).targets())
    assert b[int((kept == -1).nonzero()[0])]["label"] == -1


def test_partial_and_single_positive_masks():
    t = (torch.rand(200, 6, generator=torch.Generator().manual_seed(0)) < 0.4).float()
    part = Budgeted(_Toy(t, True), LabelBudget(fraction=0.1))
    assert 0.05 < part.masks().float().mean() < 0.15
    sp = Budgeted(_Toy(t, True), LabelBudget(single_positive=True)).masks()
    has_pos = t.sum(1) > 0
    assert torch.all(sp[has_pos].sum(1) == 1) and torch.all((t[sp] == 1))


def test_budget_errors():
    with pytest.raises(ValueError, match="label_fraction"):
        LabelBudget(fraction=1.5)
    with pytest.raises(ValueError, match="either shots or label_fraction"):
        LabelBudget(shots=1, fraction=0.5)
    with pytest.raises(ValueError, match="single_positive.*label_fraction"):
        LabelBudget(single_positive=True, fraction=0.1)
    with pytest.raises(ValueError, match="single_positive.*shots"):
        LabelBudget(single_positive=True, shots=2)
