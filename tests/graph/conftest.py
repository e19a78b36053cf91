"""Fixtures for the graph tests: a clustered toy embedding space."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor
from torch.nn.functional import normalize


def clustered(
    n: int = 600, d: int = 32, c: int = 6, *, spread: float = 0.9, text_noise: float = 0.7, seed: int = 0
) -> tuple[Tensor, Tensor, Tensor]:
    """``(images [n, d], text [c, d], labels [n])``, all features L2-normalised.

    Image features scatter around unit class means; each class's text embedding is its mean plus a
    shared offset (a modality gap) plus its own noise, so nearest-text zero-shot is mediocre while
    the clusters stay well separated: the situation where propagation helps.
    """
    g = torch.Generator().manual_seed(seed)
    means = normalize(torch.randn(c, d, generator=g), dim=1)
    labels = torch.arange(n) % c
    images = normalize(means[labels] + spread * torch.randn(n, d, generator=g) / d**0.5, dim=1)
    gap = normalize(torch.randn(1, d, generator=g), dim=1)
    text = normalize(means + 0.8 * gap + text_noise * torch.randn(c, d, generator=g) / d**0.5, dim=1)
    return images, text, labels


@pytest.fixture
def clustered_data():
    """The :func:`clustered` factory."""
    return clustered

