"""Shared fixtures: tiny models, an isolated embedding cache, a tiny image folder on disk."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from PIL import Image

from vlweak.backbones import SHIPPED_WEIGHTS, OpenCLIPBackbone

REPO = Path(__file__).resolve().parents[1]
requires_shipped = pytest.mark.skipif(
    not all(p.is_file() for p in SHIPPED_WEIGHTS.values()), reason="shipped weights not built yet"
)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # runs without a logger write into the working directory: keep that out of the repository
    monkeypatch.chdir(tmp_path_factory.mktemp("cwd"))
    monkeypatch.setenv("VLWEAK_CACHE", str(tmp_path_factory.getbasetemp() / "vlweak-cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")


@pytest.fixture(scope="session")
def tiny_backbone() -> OpenCLIPBackbone:
    torch.manual_seed(0)
    return OpenCLIPBackbone("vlweak-tiny", pretrained=None)


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory) -> str:
    """A random-init ``vlweak-tiny`` saved to a file: the same weights in every process of a test."""
    from safetensors.torch import save_file

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("w") / "tiny.safetensors"
    save_file(OpenCLIPBackbone("vlweak-tiny", pretrained=None).model.state_dict(), str(path))
    return str(path)


@pytest.fixture(scope="session")
def shapes_backbone() -> OpenCLIPBackbone:
    if not SHIPPED_WEIGHTS["vlweak-shapes"].is_file():
        pytest.skip("shipped vlweak-shapes weights not built yet")
    return OpenCLIPBackbone("vlweak-shapes", pretrained="vlweak-shapes")


@pytest.fixture(scope="session")
def noisy_backbone() -> OpenCLIPBackbone:
    """The shipped model pretrained on noisy captions: zero-shot biased on the shifted domain."""
    if not SHIPPED_WEIGHTS["vlweak-shapes-noisy"].is_file():
        pytest.skip("shipped vlweak-shapes-noisy weights not built yet")
    return OpenCLIPBackbone("vlweak-shapes", pretrained="vlweak-shapes-noisy")


def write_image_folder(root: Path, classes: dict[str, int], size: int = 16, seed: int = 0, ext: str = "png") -> Path:
    """``root/<class>/<k>.<ext>`` with ``classes[c]`` random images each."""
    rng = np.random.default_rng(seed)
    for c, n in classes.items():
        (root / c).mkdir(parents=True, exist_ok=True)
        for k in range(n):
            Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(root / c / f"{k}.{ext}")
    return root


def write_caption_manifest(root: Path, n: int, bad: int = 0, size: int = 32) -> Path:
    """``root/pairs.csv`` (``path``, ``caption``) of ``n`` built-in-world scenes saved as PNG files,
    the last ``bad`` of them unreadable (truncated bytes), as a scraped image-caption set has."""
    from vlweak.data.world import ShapesWorld

    world = ShapesWorld(seed=3, image_size=size)
    root.mkdir(parents=True, exist_ok=True)
    rows = ["path,caption"]
    for i in range(n):
        scene = world.scene("train", i)
        name = f"{i:03d}.png"
        if i >= n - bad:
            (root / name).write_bytes(b"\x89PNG\r\n\x1a\n truncated")
        else:
            Image.fromarray(scene.image).save(root / name)
        rows.append(f'{name},"{scene.caption}"')
    (root / "pairs.csv").write_text("\n".join(rows) + "\n")
    return root / "pairs.csv"


class PowerCut(L.Callback):
    """Stops a fit as training step ``at_step`` starts: ``KeyboardInterrupt`` (Ctrl-C, a power cut),
    or with ``error`` a ``RuntimeError``."""

    def __init__(self, at_step: int = 4, error: bool = False) -> None:
        self.at_step, self.error = at_step, error

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.at_step:
            raise RuntimeError("disk full") if self.error else KeyboardInterrupt("power cut")
