"""Training augmentation presets for the train split.

Only the images a method *trains* on are augmented. Validation, test and predict splits, and every
scan of the train split that scores or pseudolabels it (prompt tuning's pool, zero-shot, ZLaP,
CHiLS, CDUL), read the evaluation transform, so pseudolabels never depend on a random crop.

Presets (``augment:`` of every vlweak data module):

* ``flip``: the evaluation transform plus a random horizontal flip. Safe for any data whose classes
  do not depend on left and right.
* ``crop_flip``: random resized crop (scale 0.08-1, any aspect in 3/4-4/3) and a random flip, the
  single-label recipe of CoOp and the prompt-tuning papers that follow it.
* ``multilabel``: the whole image resized to a square (no crop, so no labelled object is cut out),
  a random flip, RandAugment, and a cutout of half the side (a quarter of the area, at the mean
  colour) with probability 1/2, the augmentation of the multi-label recipes DualCoOp trains with.
"""

from __future__ import annotations

from typing import Literal

import torch
from torchvision.transforms import v2

Augment = Literal["none", "flip", "crop_flip", "multilabel"]
AUGMENTATIONS: tuple[str, ...] = ("flip", "crop_flip", "multilabel")

_BICUBIC = v2.InterpolationMode.BICUBIC


def check_augment(augment: str | None) -> str | None:
    """The preset ``augment`` names (``None`` for ``none``, which a sweep can list beside the
    presets); an unknown preset is an error naming the presets."""
    if augment is None or augment == "none":
        return None
    if augment not in AUGMENTATIONS:
        raise ValueError(f"augment must be one of {', '.join(AUGMENTATIONS)} (or none), got {augment!r}")
    return augment


def train_transform(
    augment: str, image_size: int, mean: tuple[float, float, float], std: tuple[float, float, float]
) -> v2.Compose:
    """The training transform of preset ``augment`` for a model taking ``image_size`` pixel squares
    normalized by ``mean`` / ``std``. Works on PIL images and uint8 ``[C, H, W]`` tensors alike."""
    if check_augment(augment) is None:
        raise ValueError(f"train_transform needs a preset ({', '.join(AUGMENTATIONS)}), got {augment!r}")
    if augment == "flip":
        geometry = [
            v2.Resize(image_size, interpolation=_BICUBIC, antialias=True),
            v2.CenterCrop(image_size),
            v2.RandomHorizontalFlip(),
        ]
    elif augment == "crop_flip":
        geometry = [
            v2.RandomResizedCrop(image_size, scale=(0.08, 1.0), interpolation=_BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(),
        ]
    else:
        geometry = [
            v2.Resize((image_size, image_size), interpolation=_BICUBIC, antialias=True),
            v2.RandomHorizontalFlip(),
            v2.RandAugment(),
        ]
    tail = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean=list(mean), std=list(std))]
    if augment == "multilabel":
        # after normalization, 0 is the mean colour
        tail.append(v2.RandomErasing(p=0.5, scale=(0.25, 0.25), ratio=(1.0, 1.0), value=0.0))
    return v2.Compose([v2.ToImage(), *geometry, *tail])
