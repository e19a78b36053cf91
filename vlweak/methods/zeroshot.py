"""Zero-shot pseudolabeling (Radford et al. 2021).

Class names × prompt templates → a text classifier ``W`` (prompt ensembling, see
:func:`vlweak.prompts.text_classifier`); an image's class scores are
``softmax(logit_scale · f_img · Wᵀ)``. ``vlweak test`` reports top-1 / top-5 / per-class accuracy
(mAP / F1 for multi-label data) and writes the pseudolabel artifact of the test split;
``vlweak predict`` writes the artifact of the data module's ``predict_split``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vlweak.backbones import Backbone
from vlweak.methods.base import DEFAULT_BACKBONE, VLMethod, check_options
from vlweak.prompts import cached_text_classifier


class ZeroShot(VLMethod):
    """CLIP zero-shot classification and pseudolabeling.

    Args:
        backbone: the CLIP-family model (default: the shipped ``vlweak-shapes`` model).
        classnames: class vocabulary; set by the CLI from the data module.
        multilabel: multi-label task; set by the CLI from the data module.
        templates: prompt templates: ``simple`` ("a photo of a {}."), ``imagenet80`` (CLIP's 80
            ImageNet templates), a list of strings with one ``{}``, or a ``.txt`` (one per line) /
            ``.json`` / ``.yaml`` file of them.
        temperature: softmax temperature; ``null`` uses the backbone's learned ``logit_scale``.
        threshold: multi-label only: a class is a hard pseudolabel when its score reaches this.
        artifact_path: where test/predict write the pseudolabel artifact (default
            ``<log dir>/pseudolabels-<stage>.safetensors``); a folder (an existing one, or a path ending in
            ``/``) holds ``pseudolabels-<stage>.safetensors``; ``""`` writes none.
    """

    def __init__(
        self,
        backbone: Backbone = DEFAULT_BACKBONE,
        classnames: list[str] | None = None,
        multilabel: bool = False,
        templates: str | list[str] = "simple",
        temperature: float | None = None,
        threshold: float = 0.5,
        artifact_path: str | None = None,
    ) -> None:
        super().__init__(backbone, classnames, multilabel, artifact_path)
        check_options(templates=templates, temperature=temperature, threshold=threshold)
        self.templates = templates
        self.temperature = temperature
        self.threshold = threshold
        self.save_hyperparameters(ignore=["backbone"])
        self.register_buffer("classifier", torch.empty(0), persistent=False)

    # ---------------------------------------------------------------- model
    def build_classifier(self) -> Tensor:
        """(Re)compute the text classifier ``[C, D]`` on the backbone's device."""
        names = self.require_classnames()
        cache = self.embedding_cache() if self._trainer is not None else None  # a sweep encodes each prompt set once
        self.classifier = cached_text_classifier(self.backbone, names, self.templates, cache).to(self.device)
        self._built_for = self._classifier_inputs()
        return self.classifier

    def _classifier_inputs(self) -> tuple[Any, ...]:
        return tuple(self.classnames), repr(self.templates)

    def scale(self) -> Tensor:
        return self.backbone.logit_scale if self.temperature is None else torch.tensor(1.0 / self.temperature)

    def logits(self, features: Tensor) -> Tensor:
        # built once, again when the classes or templates change (``model.templates = ...`` in a notebook)
        if self.classifier.numel() == 0 or self.__dict__.get("_built_for") != self._classifier_inputs():
            self.build_classifier()
        return self.scale() * features @ self.classifier.T

    def forward(self, images: Tensor) -> Tensor:
        """Class probabilities of a batch of preprocessed images."""
        return self.scores(self.logits(self.backbone.encode_image(images)))

    def scores(self, logits: Tensor) -> Tensor:
        if self.multilabel:
            return torch.sigmoid(logits - logits.mean(1, keepdim=True))
        return logits.softmax(-1)

    # ---------------------------------------------------------------- loops
    def prepare_eval(self, stage: str) -> None:
        self.build_classifier()

    def eval_step(self, batch: dict[str, Any], stage: str) -> dict[str, Tensor]:
        scores = self.scores(self.logits(self.image_features(batch)))
        return {"scores": scores, "index": batch["index"], **self.targets_of(batch)}
