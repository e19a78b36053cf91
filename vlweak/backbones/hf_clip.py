"""Hugging Face transformers CLIP behind the Backbone interface (being written)."""

from vlweak.backbones.base import Backbone


class HFCLIPBackbone(Backbone):  # placeholder until the HF backbone lands
    pass
