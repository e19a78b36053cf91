"""Pseudolabel selection for pseudolabel prompt tuning (Menghini et al. 2023, Sec. 3-4).

CLIP's confidences are miscalibrated and its predictions imbalanced across classes, so a global
confidence threshold picks many images of a few "easy" classes. The paper instead selects, for each
class, the ``K`` images most confidently predicted as that class (class-balanced top-K):

1. every unlabeled image gets one hard pseudolabel, its arg-max class (among the classes that may
   receive pseudolabels: all classes, or the unseen ones in transductive zero-shot learning);
2. a class's *pool* is the images whose pseudolabel it is; the ``K`` most confident images of each
   pool are kept;
3. a class whose pool holds fewer than ``K`` images (one CLIP under-predicts) is filled up to ``K``
   from the images no class kept, those scoring it highest first: every class gets ``K``
   pseudolabels while enough images are left. An image wanted by several classes goes to the one it
   scores highest. The paper's reference code fills classes too, but streams the images once: an
   image its arg-max class rejects on arrival is offered to the other classes in score order, one
   pushed out of a full class later is lost, and an image can end up in two classes, so its result
   depends on the image order. vlweak selects over the whole pool at once.

Equal confidences are broken by the lower sample position (then the lower class), so the selection
is deterministic.

The training strategies differ in how ``K`` evolves over rounds (:func:`k_schedule`):

* ``fpl``  — Fixed PseudoLabels: one round with ``K`` (16 in the paper) from zero-shot scores;
* ``ifpl`` — Iterative FPL: ``rounds`` rounds (10) with the same ``K``; each round retrains the
  prompt from scratch on the pseudolabels of the previous round's prompt;
* ``grip`` — Grow and Refine Iterative Pseudolabeling: ``rounds`` rounds (10); round ``t``
  (1-based) keeps ``ceil(t · |U| / (rounds · C))`` images per class, so the last round asks
  ``ceil(|U| / C)`` of every class and, with the fill of step 3, covers the whole unlabeled pool,
  class-balanced up to the remainder of ``|U| / C`` (the reference code rounds down and leaves up to
  ``C − 1`` images out); labels are recomputed on the whole pool each round.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal, get_args

import torch
from torch import Tensor

Strategy = Literal["fpl", "ifpl", "grip"]
STRATEGIES = get_args(Strategy)


def top_k_per_class(
    scores: Tensor,
    k: int | None,
    classes: Sequence[int] | Tensor | None = None,
    fill: bool = True,
) -> tuple[Tensor, Tensor]:
    """Class-balanced top-K pseudolabels.

    Args:
        scores: ``[N, C]`` class scores (probabilities or logits) of the unlabeled samples.
        k: images kept per class; ``None`` keeps every sample (each with its arg-max class).
        classes: the classes that may receive pseudolabels (default: all ``C``); a sample's
            pseudolabel is its arg-max among these.
        fill: fill a class whose arg-max pool holds fewer than ``k`` images from the images no
            class kept, by its score (step 3 of the module docstring); ``False`` keeps only
            arg-max pools.

    Returns:
        ``(positions, labels)``: row positions into ``scores`` of the selected samples (sorted
        ascending) and their pseudolabels (class indices into the ``C`` columns).
    """
    if scores.dim() != 2:
        raise ValueError(f"scores must be [N, C], got shape {tuple(scores.shape)}")
    if k is not None and k < 0:
        raise ValueError(f"k (pseudolabels per class) must be >= 0 or None, got {k}")
    bad = (~torch.isfinite(scores)).any(1).nonzero().flatten()
    if len(bad):
        raise ValueError(f"scores of {len(bad)} samples are not finite (first rows {bad[:5].tolist()}): NaN would rank as most confident")
    n, c = scores.shape
    allowed = torch.arange(c) if classes is None else torch.as_tensor(list(classes) if not isinstance(classes, Tensor) else classes, dtype=torch.long).flatten()
    if allowed.numel() == 0:
        raise ValueError("classes is empty: no class may receive pseudolabels")
    if int(allowed.min()) < 0 or int(allowed.max()) >= c:
        raise ValueError(f"classes {allowed.tolist()} fall outside the {c} score columns")
    if n == 0:
        empty = torch.empty(0, dtype=torch.long)
        return empty, empty
    sub = scores.detach().float().cpu()[:, allowed]
    conf, arg = sub.max(1)
    labels = allowed[arg]
    if k is None:
        return torch.arange(n), labels
    keep = torch.zeros(n, dtype=torch.bool)
    out = labels.clone()
    for cls in allowed.tolist():
        pool = (labels == cls).nonzero().flatten()  # ascending positions
        if len(pool) == 0 or k == 0:
            continue
        # stable descending sort: equal confidences keep ascending position order
        order = torch.sort(conf[pool], descending=True, stable=True).indices
        keep[pool[order[:k]]] = True
    if fill and k > 0:
        _fill(sub, allowed, arg, keep, out, k)
    positions = keep.nonzero().flatten()
    return positions, out[positions]


def _fill(sub: Tensor, allowed: Tensor, arg: Tensor, keep: Tensor, out: Tensor, k: int) -> None:
    """Fill classes holding fewer than ``k`` kept images from the images nobody kept (in place).

    ``sub`` holds the scores of the ``allowed`` classes only and ``arg`` each image's arg-max column
    of it. Each pass, every short class proposes its best-scoring free images (as many as it lacks);
    an image proposed by several classes goes to the class it scores highest (ties: lower class);
    the passes repeat until every class is full or no image is free."""
    held = torch.bincount(arg[keep], minlength=len(allowed))
    while True:
        need = (k - held).clamp_min(0)
        short = need.nonzero().flatten()
        free = (~keep).nonzero().flatten()
        if len(short) == 0 or len(free) == 0:
            return
        cand = sub[free][:, short]  # [F, S]
        depth = min(int(need[short].max()), len(free))
        rank = torch.sort(cand, dim=0, descending=True, stable=True).indices[:depth]  # [depth, S]
        # class s proposes its first need[s] free images
        proposes = torch.arange(depth)[:, None] < need[short][None, :]
        depths, cols = proposes.nonzero(as_tuple=True)
        rows = rank[depths, cols]
        # order proposals by score (desc), then class (asc)
        score = cand[rows, cols]
        order = torch.sort(cols, stable=True).indices
        order = order[torch.sort(score[order], descending=True, stable=True).indices]
        rows, cols = rows[order], cols[order]
        # the first proposal of each image (in that order) wins it
        first = torch.full((len(free),), len(rows), dtype=torch.long)
        first.scatter_reduce_(0, rows, torch.arange(len(rows)), reduce="amin")
        win = first[first < len(rows)]
        img, cls_col = free[rows[win]], short[cols[win]]
        keep[img] = True
        out[img] = allowed[cls_col]
        held.index_add_(0, cls_col, torch.ones(len(img), dtype=torch.long))


def k_schedule(strategy: str, n_unlabeled: int, n_classes: int, k: int = 16, rounds: int = 10) -> list[int]:
    """Images per class of each round.

    Args:
        strategy: ``fpl``, ``ifpl`` or ``grip``.
        n_unlabeled: size of the unlabeled pool ``|U|``.
        n_classes: classes that receive pseudolabels ``C``.
        k: fixed K of FPL and IFPL (paper: 16).
        rounds: rounds of IFPL and GRIP (paper: 10); FPL always has one round.
    """
    strategy = strategy.lower()
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if k < 0:
        raise ValueError(f"k must be >= 0, got {k}")
    if n_classes < 1:
        raise ValueError(f"n_classes must be >= 1, got {n_classes}")
    if strategy == "fpl":
        return [k]
    if strategy == "ifpl":
        return [k] * rounds
    return [max(1, -(-t * n_unlabeled // (rounds * n_classes))) for t in range(1, rounds + 1)]


def first_occurrences(index: Tensor) -> Tensor:
    """Positions of the first occurrence of each distinct value of ``index``, in increasing value
    order (drops the repeats a distributed sampler pads its shards with)."""
    order = torch.argsort(index, stable=True)
    ordered = index[order]
    first = torch.ones(len(index), dtype=torch.bool, device=index.device)
    first[1:] = ordered[1:] != ordered[:-1]
    return order[first]
