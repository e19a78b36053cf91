"""Training augmentation: the presets, the train split alone augmented, scans of it not."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vlweak.data import ShapesWorldDataModule
from vlweak.data.augment import AUGMENTATIONS, train_transform

MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)


def _picture(w: int = 48, h: int = 40) -> Image.Image:
    """Left half red, right half blue, a green stripe at the top: every flip and crop shows."""
    a = np.zeros((h, w, 3), np.uint8)
    a[:, : w // 2, 0] = 255
    a[:, w // 2 :, 2] = 255
    a[:4, :, 1] = 255
    return Image.fromarray(a)


@pytest.mark.parametrize("augment", AUGMENTATIONS)
def test_presets_give_normalized_squares_from_pil_and_tensors(augment):
    tf = train_transform(augment, 32, MEAN, STD)
    pic = _picture()
    for image in (pic, torch.from_numpy(np.asarray(pic)).permute(2, 0, 1).contiguous()):
        torch.manual_seed(0)
        outs = torch.stack([tf(image) for _ in range(8)])
        assert outs.shape == (8, 3, 32, 32) and outs.dtype == torch.float32
        # normalized with the given statistics, channel by channel: each lies in [-m/s, (1-m)/s] ...
        low = torch.tensor([-m / s for m, s in zip(MEAN, STD)]).view(1, 3, 1, 1)
        high = torch.tensor([(1 - m) / s for m, s in zip(MEAN, STD)]).view(1, 3, 1, 1)
        assert ((outs >= low - 1e-4) & (outs <= high + 1e-4)).all()
        # ... and pure red's red channel, (1 - 0.5) / 0.2 = 2.5, is in some draw (CLIP's statistics
        # would give 1.93, unnormalized pixels 1.0)
        assert ((outs[:, 0] - 2.5).abs() < 1e-3).any()


def test_flip_mirrors_about_half_the_draws_and_changes_nothing_else():
    torch.manual_seed(0)
    tf = train_transform("flip", 32, MEAN, STD)
    outs = [tf(_picture(32, 32)) for _ in range(40)]
    left_red = [bool(o[0, 16, 2] > 0) for o in outs]
    assert 10 < sum(left_red) < 30  # both orientations occur
    a = next(o for o, lr in zip(outs, left_red) if lr)
    b = next(o for o, lr in zip(outs, left_red) if not lr)
    assert torch.allclose(a, b.flip(-1), atol=1e-5)


def test_crop_flip_varies_scale_and_multilabel_keeps_the_whole_image_square(monkeypatch):
    torch.manual_seed(0)
    crop = train_transform("crop_flip", 32, MEAN, STD)
    # a random resized crop of a 48x40 picture: the green top stripe is in some crops, not in others
    has_stripe = [bool((crop(_picture())[1] > 0).any()) for _ in range(40)]
    assert 0 < sum(has_stripe) < 40
    # the multi-label preset squashes the whole picture to a square (RandAugment's own shears and
    # colour changes left out here): every draw without a cutout keeps both halves and the stripe
    from vlweak.data import augment

    monkeypatch.setattr(augment.v2, "RandAugment", augment.v2.Identity)
    multi = train_transform("multilabel", 32, MEAN, STD)
    erased = 0
    for _ in range(40):
        out = multi(_picture())
        zero = (out == 0).all(0)  # the cutout is the mean colour, 0 after normalization
        if zero.sum() == 16 * 16:
            erased += 1
            continue
        red, blue = out[0, 6:, :14] > 2, out[2, 6:, 18:] > 2  # below the stripe: red left, blue right
        if not red.all():  # flipped
            red, blue = out[0, 6:, 18:] > 2, out[2, 6:, :14] > 2
        assert red.all() and blue.all()
        assert (out[1, :2] > 2).all() and (out[1, 5:] < 0).all()  # the stripe: 4 of 40 rows -> 3.2 of 32
    assert 5 < erased < 35  # a quarter-area cutout in about half the draws


def test_unknown_preset_and_cached_features_are_refused():
    assert ShapesWorldDataModule(augment="none", embeddings=True).augment is None  # a sweep's "off"
    with pytest.raises(ValueError, match=r"augment must be one of flip, crop_flip, multilabel.*'rotate'"):
        ShapesWorldDataModule(augment="rotate")
    with pytest.raises(ValueError, match="augment: flip needs images, but embeddings: true"):
        ShapesWorldDataModule(augment="flip", embeddings=True)


def test_only_the_train_split_is_augmented(tiny_backbone, monkeypatch):
    dm = ShapesWorldDataModule(n_train=6, n_val=4, n_test=4, augment="crop_flip")
    monkeypatch.setattr(dm, "_model_backbone", lambda: tiny_backbone)
    dm.setup("fit")
    dm.setup("test")
    torch.manual_seed(0)
    train = dm.datasets["train"]
    draws = torch.stack([train[0]["image"] for _ in range(5)])
    assert not all(torch.equal(draws[0], d) for d in draws[1:])
    assert draws.shape[-1] == tiny_backbone.image_size
    # the evaluation view of the train split, val and test read the backbone's transform
    scan = dm.eval_dataset("train")
    raw = dm.raw("train")
    assert torch.equal(scan[0]["image"], tiny_backbone.transform(raw[0]["image"]))
    assert not any(torch.equal(scan[0]["image"], d) for d in draws)
    for split in ("val", "test"):
        assert torch.equal(dm.datasets[split][1]["image"], tiny_backbone.transform(dm.raw(split)[1]["image"]))
    # nothing augmented: the evaluation view is the train split itself
    plain = ShapesWorldDataModule(n_train=6, n_val=0, n_test=0)
    monkeypatch.setattr(plain, "_model_backbone", lambda: tiny_backbone)
    plain.setup("fit")
    assert plain.eval_dataset("train") is plain.datasets["train"]
