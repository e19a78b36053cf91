"""DualCoOp's asymmetric loss (Sun et al. 2022, Sec. 3.3; after Ridnik et al.'s ASL, 2021).

DualCoOp scores every class with a *pair* of logits, one from the positive prompt and one from the
negative prompt. The probability that class ``c`` is present is their two-way softmax

    p_c = exp(l⁺_c) / (exp(l⁺_c) + exp(l⁻_c)) = σ(l⁺_c − l⁻_c),

and the loss treats positives and negatives asymmetrically: positives are focused with ``γ⁺``,
negatives with ``γ⁻`` after shifting their probability by the margin ``m`` (easy negatives with
``p ≤ m`` are discarded entirely):

    L = − Σ_{c observed} [ y_c (1 − p_c)^γ⁺ log p_c + (1 − y_c) p_{c,m}^γ⁻ log(1 − p_{c,m}) ],
    p_{c,m} = max(p_c − m, 0).

A single logit per class (``[B, C]``) is the sigmoid special case (negative logit 0), i.e. the
loss timm ships as ``AsymmetricLossMultiLabel``. Entries whose ``mask`` is ``False`` (unknown labels
of partial annotation) contribute neither to the loss nor to its gradient.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Reduction = Literal["sum", "mean", "none"]


def pair_to_margin(logits: Tensor) -> Tensor:
    """``[..., 2]`` (positive, negative) logit pairs -> ``l⁺ − l⁻`` (the logit of the two-way softmax);
    a tensor without the pair dimension is returned as it is."""
    if logits.dim() >= 3 and logits.shape[-1] == 2:
        return logits[..., 0] - logits[..., 1]
    return logits


def _check(z: Tensor, targets: Tensor, mask: Tensor | None) -> Tensor:
    if targets.shape != z.shape:
        raise ValueError(f"targets have shape {tuple(targets.shape)}, logits give {tuple(z.shape)} (batch, classes)")
    if mask is None:
        return torch.ones_like(z, dtype=torch.bool)
    if mask.shape != z.shape:
        raise ValueError(f"mask has shape {tuple(mask.shape)}, expected {tuple(z.shape)}")
    return mask.bool()


def _reduce(loss: Tensor, mask: Tensor, reduction: Reduction) -> Tensor:
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    if reduction == "mean":
        return loss.sum() / mask.sum().clamp(min=1)
    raise ValueError(f"reduction must be 'sum', 'mean' or 'none', got {reduction!r}")


def asymmetric_loss(
    logits: Tensor,
    targets: Tensor,
    mask: Tensor | None = None,
    gamma_pos: float = 1.0,
    gamma_neg: float = 2.0,
    clip: float = 0.05,
    eps: float = 1e-8,
    reduction: Reduction = "sum",
    detach_weights: bool = False,
) -> Tensor:
    """DualCoOp's asymmetric loss.

    Args:
        logits: ``[B, C, 2]`` (positive, negative) logit pairs, or ``[B, C]`` single logits (sigmoid ASL).
        targets: ``[B, C]`` multi-hot targets (values outside the mask are ignored, whatever they are).
        mask: ``[B, C]`` bool, ``True`` = label observed; ``None`` = all observed.
        gamma_pos: focusing exponent of positives ``γ⁺``.
        gamma_neg: focusing exponent of negatives ``γ⁻``.
        clip: probability margin ``m`` shifted off negatives (0 disables it).
        eps: floor inside the negatives' logarithm when the margin is active.
        reduction: ``sum`` over observed entries (the paper's), ``mean`` over observed entries, or ``none``.
        detach_weights: compute the focusing weights ``(1 - p)^γ⁺`` and ``p_m^γ⁻`` without gradient,
            as DualCoOp's public code does (same loss value, different gradient); default off.
    """
    z = pair_to_margin(logits).float()
    mask = _check(z, targets, mask)
    # unknown entries may hold anything (even NaN): zero them before any arithmetic, so that no
    # 0 * NaN reaches the gradient
    y = torch.where(mask, torch.nan_to_num(targets.float()), 0.0)
    p = torch.sigmoid(z)
    # the focusing weights' bases are floored at eps: x^γ with γ < 1 has an infinite slope at 0
    w_pos = (1 - p).clamp(min=eps).pow(gamma_pos) if gamma_pos else None
    # Negatives: p_m^γ- log(1 - p_m), p_m = max(p - m, 0).
    if clip > 0:
        p_m = (p - clip).clamp(min=0)
        log_not = torch.log((1 - p_m).clamp(min=eps))
    else:
        p_m, log_not = p, F.logsigmoid(-z)
    w_neg = p_m.clamp(min=eps).pow(gamma_neg) if gamma_neg else None
    if detach_weights:
        w_pos = None if w_pos is None else w_pos.detach()
        w_neg = None if w_neg is None else w_neg.detach()
    # Positives: (1 - p)^γ+ log p, with log p = logσ(z) (stable for large |z|). ASL's and DualCoOp's
    # public code take log(max(p, eps)) instead, so a positive scored below eps (margin z < log eps,
    # about -18 at eps 1e-8) stops contributing gradient there; here it keeps pulling, as the loss is defined.
    pos = F.logsigmoid(z) if w_pos is None else w_pos * F.logsigmoid(z)
    neg = log_not if w_neg is None else w_neg * log_not
    loss = -(y * pos + (1 - y) * neg)
    # torch.where (not a product with the mask) so that unknown entries get an exactly-zero gradient.
    loss = torch.where(mask, loss, torch.zeros_like(loss))
    return _reduce(loss, mask, reduction)


class AsymmetricLoss(nn.Module):
    """Module form of :func:`asymmetric_loss` (DualCoOp's defaults: ``γ⁺ = 1``, ``γ⁻ = 2``, ``m = 0.05``).

    Args:
        gamma_pos: focusing exponent of positives.
        gamma_neg: focusing exponent of negatives.
        clip: probability margin shifted off negatives.
        reduction: ``sum``, ``mean`` (over observed entries) or ``none``.
        detach_weights: focusing weights without gradient (as DualCoOp's public code); default off.
    """

    def __init__(
        self,
        gamma_pos: float = 1.0,
        gamma_neg: float = 2.0,
        clip: float = 0.05,
        reduction: Reduction = "sum",
        detach_weights: bool = False,
    ) -> None:
        super().__init__()
        if gamma_pos < 0 or gamma_neg < 0:
            raise ValueError(f"focusing exponents must be >= 0, got gamma_pos={gamma_pos}, gamma_neg={gamma_neg}")
        if not 0 <= clip < 1:
            raise ValueError(f"clip must lie in [0, 1), got {clip}")
        self.gamma_pos, self.gamma_neg, self.clip, self.reduction = gamma_pos, gamma_neg, clip, reduction
        self.detach_weights = detach_weights

    def forward(self, logits: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
        return asymmetric_loss(
            logits, targets, mask, self.gamma_pos, self.gamma_neg, self.clip, reduction=self.reduction,
            detach_weights=self.detach_weights,
        )

    def extra_repr(self) -> str:
        return f"gamma_pos={self.gamma_pos}, gamma_neg={self.gamma_neg}, clip={self.clip}, reduction={self.reduction}"
