"""CLIP-family models behind one interface (:class:`Backbone`): open_clip and Hugging Face CLIP."""

from vlweak.backbones.base import Backbone
from vlweak.backbones.errors import (
    BackboneError,
    CheckpointMismatchError,
    UnknownArchitectureError,
    VisualPromptError,
    WeightsUnavailableError,
)
from vlweak.backbones.hf_clip import HFCLIPBackbone
from vlweak.backbones.open_clip import SHIPPED_WEIGHTS, OpenCLIPBackbone

__all__ = [
    "Backbone",
    "BackboneError",
    "CheckpointMismatchError",
    "HFCLIPBackbone",
    "OpenCLIPBackbone",
    "SHIPPED_WEIGHTS",
    "UnknownArchitectureError",
    "VisualPromptError",
    "WeightsUnavailableError",
]
