"""Training targets from a pseudolabel artifact, so that any multi-label method (DualCoOp, the
single-positive losses, ...) trains from CDUL's pseudolabels with no human labels.

:class:`PseudoLabelTargets` replaces a dataset's ``target``/``mask`` by those of an artifact (matched by
sample id); :class:`PseudoLabeledDataModule` wraps any vlweak data module and applies it to the train
split (val/test keep their annotations, used for evaluation only)::

    data:
      class_path: vlweak.methods.cdul_targets.PseudoLabeledDataModule
      init_args:
        pseudolabels: runs/.../pseudolabels-train-refined.safetensors
        targets: hard
        data: {class_path: vlweak.data.ShapesWorldDataModule, init_args: {multilabel: true}}
"""

from __future__ import annotations

import os
from typing import Any, Literal, get_args

import torch
from torch import Tensor
from torch.utils.data import Dataset

from vlweak.data.datamodule import VLDataModule
from vlweak.labels.artifact import PseudoLabels

TargetMode = Literal["soft", "hard", "confident", "single_positive"]
TARGET_MODES = get_args(TargetMode)


def artifact_targets(
    scores: Tensor, mode: str = "hard", threshold: float = 0.5, negative: float = 0.1
) -> tuple[Tensor, Tensor]:
    """``(target [N, C] float, mask [N, C] bool)`` from pseudolabel scores:

    * ``soft``: the scores themselves, every entry observed;
    * ``hard``: ``scores ≥ threshold`` as 0/1, every entry observed;
    * ``confident``: positives ``≥ threshold``, negatives ``≤ negative``, the rest unknown;
    * ``single_positive``: the top class of each image is its one observed positive, the rest unknown.
    """
    scores = scores.float()
    if mode == "soft":
        return scores.clone(), torch.ones_like(scores, dtype=torch.bool)
    if mode == "hard":
        return (scores >= threshold).float(), torch.ones_like(scores, dtype=torch.bool)
    if mode == "confident":
        pos, neg = scores >= threshold, scores <= negative
        return pos.float(), pos | neg
    if mode == "single_positive":
        top = torch.zeros_like(scores, dtype=torch.bool)
        top.scatter_(1, scores.argmax(1, keepdim=True), True)
        return top.float(), top
    raise ValueError(f"targets must be one of {TARGET_MODES}, got {mode!r}")


class PseudoLabelTargets(Dataset):
    """A multi-label dataset whose ``target``/``mask`` come from a pseudolabel artifact.

    Args:
        dataset: the raw dataset (items with ``image`` and ``index``; ``sample_ids`` and
            ``classnames`` attributes).
        artifact: a :class:`PseudoLabels` or its path; it must cover every sample of ``dataset``
            with the same class vocabulary.
        targets: see :func:`artifact_targets`.
        threshold: positive threshold of ``hard`` / ``confident``.
        negative: negative threshold of ``confident``.
    """

    multilabel = True

    def __init__(
        self,
        dataset: Any,
        artifact: PseudoLabels | str | os.PathLike,
        targets: TargetMode = "hard",
        threshold: float = 0.5,
        negative: float = 0.1,
    ) -> None:
        self.dataset = dataset
        labels = artifact if isinstance(artifact, PseudoLabels) else PseudoLabels.load(artifact, list(dataset.classnames))
        if list(labels.classnames) != list(dataset.classnames):
            raise ValueError("pseudolabel artifact and dataset have different class vocabularies")
        labels = labels.aligned_to(list(dataset.sample_ids))
        self.provenance = labels.provenance
        self.target_, self.mask_ = artifact_targets(labels.scores, targets, threshold, negative)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> dict[str, Any] | None:
        item = self.dataset[index]
        if item is None:
            return None
        item = {k: v for k, v in item.items() if k != "label"}
        item["target"], item["mask"] = self.target_[index], self.mask_[index]
        return item

    def targets(self) -> Tensor:
        return self.target_

    def masks(self) -> Tensor:
        return self.mask_

    def __getattr__(self, name: str) -> Any:
        if name in ("dataset", "target_", "mask_", "provenance"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


class PseudoLabeledDataModule(VLDataModule):
    """Any vlweak data module, with the train split's targets taken from a pseudolabel artifact
    (e.g. CDUL's ``pseudolabels-train-refined.safetensors``); val/test keep their annotations.

    Args:
        data: the wrapped data module (its batch size, workers, embeddings, cache, transform and
            augmentation are used).
        pseudolabels: path of the artifact; it must cover every train sample.
        targets: ``hard`` (scores ≥ threshold), ``soft`` (the scores), ``confident`` (≥ threshold
            positive, ≤ negative negative, the rest unknown) or ``single_positive`` (top class only).
        threshold: positive threshold of ``hard`` / ``confident``.
        negative: negative threshold of ``confident``.
    """

    def __init__(
        self,
        data: VLDataModule,
        pseudolabels: str,
        targets: TargetMode = "hard",
        threshold: float = 0.5,
        negative: float = 0.1,
    ) -> None:
        if targets not in TARGET_MODES:
            raise ValueError(f"targets must be one of {TARGET_MODES}, got {targets!r}")
        if not data.multilabel:
            raise ValueError("PseudoLabeledDataModule needs a multi-label data module")
        super().__init__(
            batch_size=data.batch_size,
            num_workers=data.num_workers,
            embeddings=data.embeddings,
            cache_dir=str(data.cache.root),
            predict_split=data.predict_split,
            transform=data.transform,
            augment=data.augment,
        )
        self.data, self.pseudolabels = data, pseudolabels
        self.target_mode, self.threshold, self.negative = targets, threshold, negative

    @property
    def classnames(self) -> list[str]:
        return self.data.classnames

    @property
    def multilabel(self) -> bool:
        return True

    def build_split(self, split: str) -> Dataset | None:
        ds = self.data.raw(split)
        if ds is not None and split == "train":
            ds = PseudoLabelTargets(ds, self.pseudolabels, self.target_mode, self.threshold, self.negative)
        return ds
