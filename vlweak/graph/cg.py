"""Conjugate gradient for many right-hand sides at once.

Solves ``A X = B`` for a symmetric positive-definite ``A`` given as a function ``X -> A X`` and a
dense ``B [n, m]``. Each column runs its own CG (its own step sizes and stopping test), so the
result equals ``m`` independent single-vector solves, but the ``m`` products with ``A`` are one
matrix product per iteration — for a sparse ``A`` one sparse-dense product for all columns.

A column stops when ``||b - A x|| <= tol * ||b||`` (SciPy's ``rtol`` rule); a converged column is
frozen (step size zero) while the others go on.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["CGResult", "conjugate_gradient"]


@dataclass
class CGResult:
    """Solution and diagnostics of :func:`conjugate_gradient`.

    Attributes:
        x: the solution ``[n, m]``.
        iterations: iterations run (the slowest column's).
        residual_norms: ``||b - A x||`` per column at the end ``[m]``.
        converged: per-column flag ``[m]``.
    """

    x: Tensor
    iterations: int
    residual_norms: Tensor
    converged: Tensor


def _col_dot(a: Tensor, b: Tensor) -> Tensor:
    return torch.linalg.vecdot(a, b, dim=0)


@torch.no_grad()
def conjugate_gradient(
    matvec: Callable[[Tensor], Tensor],
    b: Tensor,
    *,
    x0: Tensor | None = None,
    tol: float = 1e-6,
    maxiter: int = 50,
) -> CGResult:
    """Multi-right-hand-side conjugate gradient.

    Args:
        matvec: ``X -> A X`` for a symmetric positive-definite ``A`` (shape-preserving).
        b: right-hand sides ``[n]`` or ``[n, m]``; the solve runs on ``b``'s device and dtype.
        x0: initial guess, zeros by default.
        tol: relative residual tolerance per column.
        maxiter: iteration cap.

    Returns:
        :class:`CGResult` (``x`` has ``b``'s shape).
    """
    vector = b.dim() == 1
    B = b.unsqueeze(1) if vector else b
    if B.dim() != 2:
        raise ValueError(f"b must be [n] or [n, m], got shape {tuple(b.shape)}")
    if maxiter < 0 or tol < 0:
        raise ValueError("tol and maxiter must be non-negative")
    if x0 is None:
        x = torch.zeros_like(B)
        r = B.clone()
    else:
        x = (x0.unsqueeze(1) if vector else x0).clone()
        r = B - matvec(x)
    threshold_sq = (tol * torch.linalg.vector_norm(B, dim=0)) ** 2
    rs = _col_dot(r, r)
    active = rs > threshold_sq
    p = r.clone()
    iterations = 0
    zero = torch.zeros((), dtype=B.dtype, device=B.device)
    while iterations < maxiter and bool(active.any()):
        ap = matvec(p)
        pap = _col_dot(p, ap)
        step = torch.where(active, rs / torch.where(active, pap, torch.ones_like(pap)), zero)
        x.addcmul_(p, step)  # x += step * p   (step broadcasts over rows)
        r.addcmul_(ap, step, value=-1.0)
        rs_new = _col_dot(r, r)
        beta = torch.where(active, rs_new / torch.where(active, rs, torch.ones_like(rs)), zero)
        p.mul_(beta).add_(r)
        rs = torch.where(active, rs_new, rs)
        active = active & (rs > threshold_sq)
        iterations += 1
    residual = rs.clamp_min(0).sqrt()
    out = x.squeeze(1) if vector else x
    return CGResult(x=out, iterations=iterations, residual_norms=residual, converged=~active)
