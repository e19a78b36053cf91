"""Label budgets: which train labels a method may see.

Single-label data: ``shots`` labels per class or a ``fraction`` of the images keep their label; the
rest become unlabeled (label ``-1``). With ``seen`` classes (transductive zero-shot learning), only
images of the seen classes keep labels; the unseen classes' images are all unlabeled. Multi-label data: a ``fraction`` of the image-class entries is
observed (partial labels), or exactly one positive per image (``single_positive``); the rest are
masked out as unknown. The draw depends only on ``seed`` and the dataset, so runs are comparable.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch.utils.data import Dataset


@dataclass(frozen=True)
class LabelBudget:
    shots: int | None = None
    fraction: float | None = None
    single_positive: bool = False
    seed: int = 0
    seen: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        if self.shots is not None and self.shots < 0:
            raise ValueError(f"shots must be >= 0, got {self.shots}")
        if self.fraction is not None and not 0.0 <= self.fraction <= 1.0:
            raise ValueError(f"label_fraction must lie in [0, 1], got {self.fraction}")
        if self.shots is not None and self.fraction is not None:
            raise ValueError("give either shots or label_fraction, not both")
        if self.single_positive and (self.shots is not None or self.fraction is not None):
            given = "shots" if self.shots is not None else "label_fraction"
            raise ValueError(f"single_positive observes exactly one positive per image; it cannot be combined with {given}")

    @property
    def active(self) -> bool:
        return self.shots is not None or self.fraction is not None or self.single_positive or self.seen is not None

    def draw_single(self, labels: torch.Tensor) -> torch.Tensor:
        """Boolean ``[N]``: which single-label items keep their label."""
        g = torch.Generator().manual_seed(self.seed)
        keep = torch.zeros(len(labels), dtype=torch.bool)
        if self.shots is not None:
            for c in labels.unique().tolist():
                if c < 0:
                    continue
                idx = (labels == c).nonzero().flatten()
                keep[idx[torch.randperm(len(idx), generator=g)[: self.shots]]] = True
        elif self.fraction is not None:
            order = torch.randperm(len(labels), generator=g)
            keep[order[: round(self.fraction * len(labels))]] = True
        else:
            keep[:] = True
        if self.seen is not None:
            keep &= torch.isin(labels, torch.as_tensor(self.seen, dtype=labels.dtype))
        return keep & (labels >= 0)

    def draw_multi(self, targets: torch.Tensor) -> torch.Tensor:
        """Boolean ``[N, C]`` observation mask for multi-hot targets."""
        g = torch.Generator().manual_seed(self.seed)
        if self.seen is not None:
            raise ValueError("seen classes (transductive zero-shot) is a single-label budget")
        if self.single_positive:
            mask = torch.zeros_like(targets, dtype=torch.bool)
            for i in range(len(targets)):
                pos = targets[i].nonzero().flatten()
                if len(pos):
                    mask[i, pos[torch.randint(len(pos), (1,), generator=g)]] = True
            return mask
        if self.fraction is not None:
            return torch.rand(targets.shape, generator=g) < self.fraction
        if self.shots is not None:
            raise ValueError("shots is a single-label budget; use label_fraction or single_positive for multi-label data")
        return torch.ones_like(targets, dtype=torch.bool)


class Budgeted(Dataset):
    """A train dataset seen through a :class:`LabelBudget`."""

    def __init__(self, dataset: Any, budget: LabelBudget) -> None:
        self.dataset, self.budget = dataset, budget
        self.multilabel = getattr(dataset, "multilabel", False)
        self._true = dataset.targets()
        if self.multilabel:
            self._mask = budget.draw_multi(self._true)
            if hasattr(dataset, "masks"):  # entries the annotation itself leaves unknown stay unknown
                self._mask &= dataset.masks().bool()
        else:
            if budget.single_positive:
                raise ValueError(
                    "single_positive (one observed positive per image) needs multi-label data; "
                    "this dataset is single-label (use shots or label_fraction)"
                )
            self._keep = budget.draw_single(self._true)
            if budget.shots:
                self._warn_short_classes()

    def _warn_short_classes(self) -> None:
        """Few-shot practice keeps every image of a class with fewer than ``shots`` of them; say so."""

        shots = self.budget.shots
        names = list(getattr(self.dataset, "classnames", None) or [])
        labels = self._true[self._true >= 0].long()
        n_classes = max(len(names), int(labels.max()) + 1 if len(labels) else 0)
        counts = torch.bincount(labels, minlength=n_classes)
        classes = range(n_classes) if self.budget.seen is None else sorted(self.budget.seen)
        short = [c for c in classes if int(counts[c]) < shots]
        if not short:
            return
        listed = ", ".join(f"{names[c] if c < len(names) else c} ({int(counts[c])})" for c in short[:20])
        rank_zero_warn(
            f"shots={shots} but {len(short)} of {n_classes} classes have fewer train images, so all of "
            f"their images keep their labels: {listed}{' ...' if len(short) > 20 else ''}",
            stacklevel=2,
        )

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        item = self.dataset[index]
        if item is None:
            return None
        if self.multilabel:
            return dict(item, mask=self._mask[index].clone())
        return dict(item, label=int(self._true[index]) if self._keep[index] else -1)

    def targets(self) -> torch.Tensor:
        """Targets as the budget shows them (unlabeled items ``-1``; multi-label: all entries,
        see :meth:`masks` for which are observed)."""
        if self.multilabel:
            return self._true
        return torch.where(self._keep, self._true, torch.full_like(self._true, -1))

    def true_targets(self) -> torch.Tensor:
        """The hidden ground truth, for measuring pseudolabel quality only."""
        return self._true

    def masks(self) -> torch.Tensor:
        if self.multilabel:
            return self._mask
        return self._keep[:, None]

    def labeled_indices(self) -> torch.Tensor:
        if self.multilabel:
            return self._mask.any(1).nonzero().flatten()
        return self._keep.nonzero().flatten()

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "budget", "_true", "_mask", "_keep", "multilabel"):
            raise AttributeError(name)
        return getattr(self.dataset, name)
