"""Data: readers, the built-in shapes world, data modules, label budgets and the embedding cache."""

from vlweak.data.budget import Budgeted, LabelBudget
from vlweak.data.cache import EmbeddingCache, image_embeddings
from vlweak.data.datamodule import (
    FeatureDataset,
    ImageFolderDataModule,
    ManifestDataModule,
    ShapesWorldDataModule,
    VLDataModule,
)
from vlweak.data.datasets import (
    ImageLoadError,
    LabeledImages,
    ShapesWorldDataset,
    VocabularyError,
    clean_classname,
)
from vlweak.data.world import ShapesWorld

__all__ = [
    "Budgeted",
    "CocoDataModule",
    "EmbeddingCache",
    "FeatureDataset",
    "ImageFolderDataModule",
    "ImageLoadError",
    "LabelBudget",
    "LabeledImages",
    "ManifestDataModule",
    "ShapesWorld",
    "ShapesWorldDataModule",
    "ShapesWorldDataset",
    "VLDataModule",
    "VocDataModule",
    "VocabularyError",
    "clean_classname",
    "image_embeddings",
]
# last: the multi-label modules build on the data modules above
from vlweak.data.multilabel import CocoDataModule, VocDataModule  # noqa: E402


def __getattr__(name: str):
    # the artifact-labelled data module lives beside CDUL's targets (vlweak.methods imports vlweak.data)
    if name == "PseudoLabeledDataModule":
        from vlweak.methods.cdul_targets import PseudoLabeledDataModule

        return PseudoLabeledDataModule
    raise AttributeError(f"module 'vlweak.data' has no attribute {name!r}")
