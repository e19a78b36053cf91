"""Learning from one positive label per image: entropy maximization (EM) with asymmetric
pseudo-labeling (APL), Zhou et al. 2022, "Acknowledging the Unknown for Multi-label Learning with
Single Positive Labels".

Unannotated labels are treated as *unknown*, not as negatives:

* observed positives: ``−log p`` (observed negatives, if a budget has any: ``−log(1 − p)``);
* unknown entries: ``−α H(p)``, with ``H(p) = −p log p − (1 − p) log(1 − p)`` — maximizing the
  entropy keeps unknown predictions away from confident, unsupported decisions (EM, Sec. 3.2);
* pseudo-negatives (APL, Sec. 3.3): after a warm-up, each epoch marks, per class, the unknown
  entries the model scores lowest as negatives, with their predicted probability at that moment as
  a *soft* target (the asymmetric tolerance: negatives only, soft, so wrong ones cost little), and a
  self-paced schedule that labels ``neg_proportion`` of each class's unknown entries by the last
  epoch; they are trained with ``β · BCE(p, soft target)``.

The loss is averaged over all ``B × C`` entries. Any multi-label method can use it: it takes logits
(``[B, C]`` or DualCoOp's ``[B, C, 2]`` pairs), the targets, the observation mask and the optional
pseudo-label tensor held by :class:`AsymmetricPseudoLabeler`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlweak.labels.selection import first_occurrences
from vlweak.losses.asymmetric import pair_to_margin


def em_apl_loss(
    logits: Tensor,
    targets: Tensor,
    mask: Tensor,
    pseudo: Tensor | None = None,
    alpha: float = 0.1,
    beta: float = 0.9,
) -> Tensor:
    """EM loss with (optional) APL pseudo-negatives.

    Args:
        logits: ``[B, C]`` logits or ``[B, C, 2]`` (positive, negative) pairs.
        targets: ``[B, C]`` multi-hot targets (only observed entries are read).
        mask: ``[B, C]`` bool, ``True`` = observed.
        pseudo: ``[B, C]`` soft pseudo-negative targets for unknown entries, ``NaN`` where none.
        alpha: weight ``α`` of the entropy term on unknown entries.
        beta: weight ``β`` of the pseudo-negative term.
    """
    z = pair_to_margin(logits).float()
    if targets.shape != z.shape or mask.shape != z.shape:
        raise ValueError(
            f"logits give {tuple(z.shape)}, targets {tuple(targets.shape)}, mask {tuple(mask.shape)}: shapes must match"
        )
    mask = mask.bool()
    y = torch.where(mask, torch.nan_to_num(targets.float()), 0.0)  # unknown entries are never read
    log_p, log_not_p = F.logsigmoid(z), F.logsigmoid(-z)
    p = torch.sigmoid(z)
    observed = -(y * log_p + (1 - y) * log_not_p)
    entropy = -(p * log_p + (1 - p) * log_not_p)
    unknown = -alpha * entropy
    if pseudo is not None:
        if pseudo.shape != z.shape:
            raise ValueError(f"pseudo has shape {tuple(pseudo.shape)}, expected {tuple(z.shape)}")
        has = ~mask & ~torch.isnan(pseudo)
        soft = torch.nan_to_num(pseudo.float(), nan=0.0)
        pseudo_loss = -beta * (soft * log_p + (1 - soft) * log_not_p)
        unknown = torch.where(has, pseudo_loss, unknown)
    loss = torch.where(mask, observed, unknown)
    return loss.sum() / z.numel()


class EntropyMaximizationLoss(nn.Module):
    """Module form of :func:`em_apl_loss` (defaults: ``α = 0.1``, ``β = 0.9``, the paper's COCO setting).

    Args:
        alpha: weight of the entropy maximization on unknown entries.
        beta: weight of the soft pseudo-negative term.
    """

    def __init__(self, alpha: float = 0.1, beta: float = 0.9) -> None:
        super().__init__()
        if alpha < 0 or beta < 0:
            raise ValueError(f"alpha and beta must be >= 0, got alpha={alpha}, beta={beta}")
        self.alpha, self.beta = alpha, beta

    def forward(self, logits: Tensor, targets: Tensor, mask: Tensor, pseudo: Tensor | None = None) -> Tensor:
        return em_apl_loss(logits, targets, mask, pseudo, self.alpha, self.beta)


class AsymmetricPseudoLabeler(nn.Module):
    """APL's self-paced pseudo-negatives for a train set of ``num_samples`` items.

    ``pseudo`` (a buffer, saved in checkpoints) holds, per item and class, the soft negative target
    assigned to an unknown entry, ``NaN`` where none. After each epoch from ``warmup_epochs`` on,
    :meth:`update` labels, per class, the lowest-scoring still-unlabeled unknown entries, as many as
    bring the class's total to ``round(neg_proportion · U_c · j / (max_epochs − warmup_epochs))``
    after the ``j``-th labeling epoch (``U_c``: the class's unknown entries at the start), so that
    ``neg_proportion`` of them are labeled when the last epoch starts (a per-epoch quota rounded down
    would fall short of it). Repeated items (a distributed sampler pads with repeats) count once.

    Args:
        num_samples: size of the train set (rows are addressed by the items' ``index``).
        num_classes: number of classes.
        neg_proportion: fraction of each class's unknown entries labeled negative by the end.
        warmup_epochs: epochs of EM alone before pseudo-labeling starts (the paper's 5 on COCO/VOC).
        max_epochs: total epochs of the run (spreads the labeling over the epochs after warm-up).
    """

    def __init__(
        self, num_samples: int, num_classes: int, neg_proportion: float = 0.9, warmup_epochs: int = 5, max_epochs: int = 10
    ) -> None:
        super().__init__()
        if not 0 <= neg_proportion <= 1:
            raise ValueError(f"neg_proportion must lie in [0, 1], got {neg_proportion}")
        if warmup_epochs < 1:  # labels come from an epoch's predictions: the first after epoch 0
            raise ValueError(f"warmup_epochs must be >= 1, got {warmup_epochs}")
        self.neg_proportion, self.warmup_epochs, self.max_epochs = neg_proportion, warmup_epochs, max_epochs
        self.register_buffer("pseudo", torch.full((num_samples, num_classes), float("nan")))
        self.register_buffer("unknown_count", torch.full((num_classes,), -1, dtype=torch.long))

    def forward(self, index: Tensor) -> Tensor:
        """Pseudo-negative targets ``[B, C]`` of the items ``index`` (``NaN`` = none)."""
        return self.pseudo[index.to(self.pseudo.device)]

    def labels_after(self, epoch: int) -> bool:
        """Whether :meth:`update` labels entries after ``epoch`` (0-based)."""
        return self.warmup_epochs <= epoch + 1 < self.max_epochs

    def target(self, epoch: int) -> Tensor:
        """Per class, how many entries are pseudo-labeled once :meth:`update` has run for ``epoch``."""
        span = max(1, self.max_epochs - self.warmup_epochs)
        done = min(span, max(0, epoch + 2 - self.warmup_epochs))
        return (self.neg_proportion * self.unknown_count.clamp(min=0).double() * done / span).round().long()

    @torch.no_grad()
    def update(self, probs: Tensor, index: Tensor, mask: Tensor, epoch: int) -> int:
        """Label the next pseudo-negatives from this epoch's predictions; returns how many were added.

        Args:
            probs: ``[N, C]`` predicted probabilities of train items.
            index: ``[N]`` their indices in the train set.
            mask: ``[N, C]`` their observation masks.
            epoch: the epoch just finished (0-based); labels are added after epochs
                ``warmup_epochs - 1`` to ``max_epochs - 2`` (none after the last one, nothing would use them).
        """
        index, mask = index.to(self.pseudo.device).long(), mask.to(self.pseudo.device).bool()
        probs = probs.to(self.pseudo.device).float()
        keep = first_occurrences(index)
        index, mask, probs = index[keep], mask[keep], probs[keep]
        if (self.unknown_count < 0).all():
            self.unknown_count.copy_((~mask).sum(0))
        if not self.labels_after(epoch):
            return 0
        current = self.pseudo[index]
        free = ~mask & torch.isnan(current)
        added = 0
        labeled = (~torch.isnan(self.pseudo)).sum(0)
        for c, k in enumerate((self.target(epoch) - labeled).tolist()):
            cand = free[:, c].nonzero().flatten()
            k = min(k, len(cand))
            if k <= 0:
                continue
            low = probs[cand, c].topk(k, largest=False).indices
            rows = cand[low]
            self.pseudo[index[rows], c] = probs[rows, c]
            added += k
        return added

    def extra_repr(self) -> str:
        n, c = self.pseudo.shape
        labeled = int((~torch.isnan(self.pseudo)).sum())
        return f"num_samples={n}, num_classes={c}, neg_proportion={self.neg_proportion}, labeled={labeled}"
