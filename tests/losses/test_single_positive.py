"""EM + APL (Zhou et al. 2022) against a direct computation; pseudo-labeling schedule."""

from __future__ import annotations

import math

import pytest
import torch

from vlweak.losses import AsymmetricPseudoLabeler, EntropyMaximizationLoss, em_apl_loss


def test_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4, 5, generator=g) * 2
    y = (torch.rand(4, 5, generator=g) < 0.5).float()
    mask = torch.rand(4, 5, generator=g) < 0.3
    pseudo = torch.where(torch.rand(4, 5, generator=g) < 0.3, torch.rand(4, 5, generator=g) * 0.2, torch.tensor(float("nan")))
    alpha, beta = 0.2, 0.5
    total = 0.0
    for b in range(4):
        for c in range(5):
            p = 1 / (1 + math.exp(-float(z[b, c])))
            if mask[b, c]:
                total += -math.log(p) if y[b, c] == 1 else -math.log(1 - p)
            elif not math.isnan(float(pseudo[b, c])):
                s = float(pseudo[b, c])
                total += -beta * (s * math.log(p) + (1 - s) * math.log(1 - p))
            else:
                total += alpha * (p * math.log(p) + (1 - p) * math.log(1 - p))  # -α H(p)
    got = EntropyMaximizationLoss(alpha, beta)(z, y, mask, pseudo)
    assert got.item() == pytest.approx(total / 20, rel=1e-5)


def test_entropy_pushes_unknowns_towards_one_half():
    z = torch.tensor([[3.0, -3.0]], requires_grad=True)
    em_apl_loss(z, torch.zeros(1, 2), torch.zeros(1, 2, dtype=torch.bool)).backward()
    # Gradient descent moves a confident positive down and a confident negative up.
    assert z.grad[0, 0] > 0 and z.grad[0, 1] < 0


def test_labeler_schedule_picks_lowest_unknowns():
    n, c = 10, 2
    mask = torch.zeros(n, c, dtype=torch.bool)
    mask[0] = True  # one observed row
    probs = torch.linspace(0.01, 0.5, n)[:, None].repeat(1, c)
    lab = AsymmetricPseudoLabeler(n, c, neg_proportion=0.8, warmup_epochs=2, max_epochs=4)
    idx = torch.arange(n)
    assert lab.update(probs, idx, mask, epoch=0) == 0  # warm-up
    # 9 unknowns per class, 0.8 of them over 2 labeling epochs: round(3.6) = 4, then round(7.2) = 7
    assert lab.update(probs, idx, mask, epoch=1) == 8
    chosen = (~torch.isnan(lab.pseudo[:, 0])).nonzero().flatten().tolist()
    assert chosen == [1, 2, 3, 4]  # lowest unknown scores, observed row 0 excluded
    assert torch.allclose(lab.pseudo[1:5, 0], probs[1:5, 0])  # soft targets = predictions
    assert lab.update(probs, idx, mask, epoch=2) == 6
    assert lab.update(probs, idx, mask, epoch=3) == 0  # nothing after the last epoch
    assert int((~torch.isnan(lab.pseudo)).sum()) == 14  # round(0.8 * 9) = 7 per class, as promised
    assert torch.isnan(lab(torch.tensor([0]))).all()
    with pytest.raises(ValueError, match="warmup_epochs must be >= 1, got 0"):
        AsymmetricPseudoLabeler(n, c, warmup_epochs=0)


def test_labeler_counts_repeated_items_once():
    # a distributed sampler pads its shards with repeats; they must not count as more unknowns
    n, c = 10, 2
    mask = torch.zeros(n, c, dtype=torch.bool)
    probs = torch.linspace(0.01, 0.5, n)[:, None].repeat(1, c)
    idx = torch.arange(n)
    rep = torch.cat([idx, idx[:4]])
    lab = AsymmetricPseudoLabeler(n, c, neg_proportion=0.5, warmup_epochs=1, max_epochs=2)
    assert lab.update(probs[rep], rep, mask[rep], epoch=0) == 10  # round(0.5 * 10) per class
    assert lab.unknown_count.tolist() == [10, 10]
    assert (~torch.isnan(lab.pseudo[:, 0])).nonzero().flatten().tolist() == [0, 1, 2, 3, 4]


def test_nan_targets_at_unknown_entries_leave_gradients_finite():
    from vlweak.losses.single_positive import em_apl_loss

    z = torch.tensor([[1.0, -2.0, 0.5]], requires_grad=True)
    targets = torch.tensor([[1.0, float("nan"), float("nan")]])
    mask = torch.tensor([[True, False, False]])
    loss = em_apl_loss(z, targets, mask)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
