"""DualCoOp's asymmetric loss against a direct, entry-by-entry computation; masks and gradients."""

from __future__ import annotations

import math

import pytest
import torch

from vlweak.losses import AsymmetricLoss, asymmetric_loss


def direct(pairs: torch.Tensor, y: torch.Tensor, mask: torch.Tensor, gp: float, gn: float, m: float) -> float:
    total = 0.0
    for b in range(pairs.shape[0]):
        for c in range(pairs.shape[1]):
            if not mask[b, c]:
                continue
            lp, ln = float(pairs[b, c, 0]), float(pairs[b, c, 1])
            p = math.exp(lp) / (math.exp(lp) + math.exp(ln))  # two-way softmax
            if y[b, c] == 1:
                total += -((1 - p) ** gp) * math.log(p)
            else:
                pm = max(p - m, 0.0)
                total += -(pm**gn) * math.log(1 - pm)
    return total


@pytest.mark.parametrize("gp,gn,m", [(1.0, 2.0, 0.05), (0.0, 4.0, 0.0), (2.0, 1.0, 0.2)])
def test_matches_direct_computation(gp, gn, m):
    g = torch.Generator().manual_seed(0)
    pairs = torch.randn(5, 7, 2, generator=g) * 3
    y = (torch.rand(5, 7, generator=g) < 0.4).float()
    mask = torch.rand(5, 7, generator=g) < 0.6
    got = asymmetric_loss(pairs, y, mask, gp, gn, m)
    assert got.item() == pytest.approx(direct(pairs, y, mask, gp, gn, m), rel=1e-5, abs=1e-6)


def test_pair_equals_sigmoid_of_difference():
    g = torch.Generator().manual_seed(1)
    pairs = torch.randn(4, 6, 2, generator=g)
    y = (torch.rand(4, 6, generator=g) < 0.5).float()
    single = pairs[..., 0] - pairs[..., 1]
    assert torch.allclose(asymmetric_loss(pairs, y), asymmetric_loss(single, y))
    # Shifting both logits of a pair changes nothing: only the softmax matters.
    assert torch.allclose(asymmetric_loss(pairs + 5.0, y), asymmetric_loss(pairs, y))


def test_unknown_entries_never_contribute():
    g = torch.Generator().manual_seed(2)
    pairs = torch.randn(3, 5, 2, generator=g).requires_grad_()
    y = (torch.rand(3, 5, generator=g) < 0.5).float()
    mask = torch.rand(3, 5, generator=g) < 0.5
    loss = asymmetric_loss(pairs, y, mask)
    loss.backward()
    assert torch.all(pairs.grad[~mask] == 0)
    assert pairs.grad[mask].abs().sum() > 0
    # Whatever the unknown entries hold (targets or extreme logits), the loss is the same.
    y2 = torch.where(mask, y, 1 - y)
    wild = torch.where(mask[..., None], pairs.detach(), torch.full_like(pairs.detach(), 1e4))
    assert asymmetric_loss(wild, y2, mask).item() == pytest.approx(loss.item(), rel=1e-6)


def test_easy_negatives_below_margin_are_discarded():
    # p = σ(-4) ≈ 0.018 < m = 0.05: the negative contributes nothing, and no gradient.
    z = torch.tensor([[-4.0]], requires_grad=True)
    loss = asymmetric_loss(z, torch.zeros(1, 1), clip=0.05)
    loss.backward()
    assert loss.item() == 0.0 and z.grad.item() == 0.0


def test_reductions_and_bad_input():
    pairs = torch.randn(2, 3, 2)
    y = torch.ones(2, 3)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    total = asymmetric_loss(pairs, y, mask)
    assert asymmetric_loss(pairs, y, mask, reduction="mean").item() == pytest.approx(total.item() / 3)
    assert asymmetric_loss(pairs, y, mask, reduction="none").shape == (2, 3)
    with pytest.raises(ValueError, match="targets have shape"):
        asymmetric_loss(pairs, torch.ones(2, 4))
    with pytest.raises(ValueError, match="reduction"):
        asymmetric_loss(pairs, y, reduction="avg")
    with pytest.raises(ValueError, match="clip"):
        AsymmetricLoss(clip=1.5)


def test_nan_targets_and_saturated_logits_at_unknown_entries_leave_gradients_finite():
    from vlweak.losses import asymmetric_loss

    z = torch.tensor([[30.0, -30.0, 0.3, 2.0]], requires_grad=True)
    targets = torch.tensor([[1.0, float("nan"), 0.0, 1.0]])
    mask = torch.tensor([[True, False, True, True]])
    loss = asymmetric_loss(z, targets, mask, gamma_pos=0.5, gamma_neg=0.5)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    assert z.grad[0, 1] == 0  # the unknown entry


def test_detached_focusing_weights_keep_the_value_and_change_the_gradient():
    from vlweak.losses import asymmetric_loss

    z = torch.tensor([[0.85, 2.0]])
    y = torch.tensor([[1.0, 0.0]])
    grads = []
    for detach in (False, True):
        zz = z.clone().requires_grad_(True)
        loss = asymmetric_loss(zz, y, detach_weights=detach)
        loss.backward()
        grads.append((loss.item(), zz.grad.clone()))
    (v0, g0), (v1, g1) = grads
    assert v0 == pytest.approx(v1)
    # with detached weights only the log terms carry gradient: -(1-p)^γ⁺ (1-p) for the positive
    p = torch.sigmoid(z)
    expected_pos = -(1 - p[0, 0]) * (1 - p[0, 0])
    assert g1[0, 0].item() == pytest.approx(expected_pos.item(), rel=1e-5)
    assert not torch.allclose(g0, g1)
