"""CoOp: few-shot prompt learning (Zhou, Yang, Loy, Liu, IJCV 2022, *Learning to Prompt for
Vision-Language Models*).

A frozen CLIP model and ``M`` learnable context vectors in place of a hand-written template,
``[SOS] v_1 … v_M <class name> . [EOS]``, trained with cross-entropy on the labeled images only:

    L = Σ_{(x, y) ∈ X_L} CE(s · f(x) · g([v_1 … v_M, name_c])ᵀ_{c=1..C}, y),      s = logit_scale.

The labels are the data module's budget (``shots: 16`` is the paper's main setting; 1, 2, 4, 8
complete its curve) or a fully labelled train split. The paper's defaults are the constructor's: 16
context vectors drawn from N(0, 0.02) and shared by every class, the class name at the end, SGD with
learning rate 0.002, momentum 0.9, weight decay 5e-4, one warm-up epoch at 1e-5, then cosine decay
over 200 epochs, batch size 32. Variants from the paper: ``ctx_init`` ("a photo of a"),
``class_specific`` contexts (CSC) and the class name's ``position``.

CoOp is pseudolabel prompt tuning (:class:`~vlweak.methods.PromptTuning`) without pseudolabels: one
round on the labeled images, so it shares its prompts, evaluation, feature caching, DDP and
resumable checkpoints; only the labeled images of the train split are read.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from vlweak.backbones import Backbone
from vlweak.methods.base import DEFAULT_BACKBONE
from vlweak.methods.prompt_tuning import PromptTuning
from vlweak.prompts.learners import Position


class CoOp(PromptTuning):
    """CoOp few-shot prompt learning on the labeled images (Zhou et al., IJCV 2022).

    Args:
        backbone: the frozen CLIP-family model (default: the shipped ``vlweak-shapes`` model).
        classnames: class vocabulary; set by the CLI from the data module.
        multilabel: set by the CLI from the data module; must be false (single-label method).
        n_ctx: context vectors (paper: 16; ignored when ``ctx_init`` is given).
        ctx_init: phrase initialising the context (paper's variant: ``a photo of a``); ``null``
            draws N(0, 0.02).
        class_specific: one context per class (the paper's CSC) instead of one shared context.
        position: the class name's place in the prompt: ``end`` (paper's default), ``middle`` or
            ``front``.
        epochs: training epochs (paper: 200 for 8 and 16 shots, 100 for 2 and 4, 50 for 1).
        lr: SGD learning rate (paper: 0.002).
        momentum: SGD momentum (paper: 0.9).
        weight_decay: SGD weight decay (paper: 5e-4).
        warmup_epochs: epochs at ``warmup_lr`` before the cosine decay (paper: 1).
        warmup_lr: learning rate of the warm-up epochs (paper: 1e-5).
        cache_features: image features never change: the labeled images are encoded once and
            training steps reuse their features (``embeddings: true`` in the data module also skips
            loading images). Not used when the data module augments the train split (``augment:
            crop_flip``, the paper's): each step then encodes its augmented images.
        rounds_dir: folder of the run's checkpoint of its labeled set and trained prompt (default
            ``<logger save_dir>/<logger name>/rounds/<hash of the configuration>``); a finished run
            started again restores its prompt instead of training again.
        resume: reuse ``rounds_dir`` when it holds this run's files.
        seed: seed of the context initialisation and of the data order.
        artifact_path: where test/predict write the pseudolabel artifact (default
            ``<log dir>/pseudolabels-<stage>.safetensors``); a folder (an existing one, or a path ending in
            ``/``) holds ``pseudolabels-<stage>.safetensors``; ``""`` writes none.
    """

    def __init__(
        self,
        backbone: Backbone = DEFAULT_BACKBONE,
        classnames: list[str] | None = None,
        multilabel: bool = False,
        n_ctx: int = 16,
        ctx_init: str | None = None,
        class_specific: bool = False,
        position: Position = "end",
        epochs: int = 200,
        lr: float = 0.002,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        warmup_epochs: int = 1,
        warmup_lr: float = 1e-5,
        cache_features: bool = True,
        rounds_dir: str | None = None,
        resume: bool = True,
        seed: int = 0,
        artifact_path: str | None = None,
    ) -> None:
        if multilabel:
            raise ValueError("CoOp is single-label: use a single-label data module (multilabel: false), or DualCoOp")
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        if warmup_epochs >= epochs:
            raise ValueError(f"warmup_epochs ({warmup_epochs}) must be below epochs ({epochs}): every epoch would train at warmup_lr")
        super().__init__(
            backbone, classnames, multilabel, prompt="textual", strategy="fpl", k=0, rounds=1,
            n_ctx=n_ctx, ctx_init=ctx_init, class_specific=class_specific, position=position,
            epochs_per_round=epochs, lr=lr, momentum=momentum, weight_decay=weight_decay,
            warmup_epochs=warmup_epochs, warmup_lr=warmup_lr, cache_features=cache_features,
            rounds_dir=rounds_dir, resume=resume, holdout=0.0, seed=seed, artifact_path=artifact_path,
        )

    def pool_positions(self, dm: Any) -> Tensor | None:
        """The labeled images of a budgeted train split (the unlabeled rest is never read)."""
        raw = dm.raw("train") if hasattr(dm, "raw") else None
        if raw is None or not hasattr(raw, "labeled_indices"):
            return None  # no budget: every labeled image of the split trains
        index = raw.labeled_indices()
        if not len(index):
            raise ValueError(_NO_LABELS)
        pos = self._positions(index)
        return pos[pos >= 0]  # an image skipped as unreadable has no position

    def setup_pool(self, trainer: Any) -> None:
        super().setup_pool(trainer)
        labeled = self.pool_label >= 0
        if not labeled.any():
            raise ValueError(_NO_LABELS)
        if not labeled.all():  # a split with unlabeled items and no budget: they take no part
            self.set_pool(self.pool_index[labeled], self.pool_label[labeled], self._pool_features[labeled])

    @torch.no_grad()
    def score_unlabeled(self, source: bool) -> Tensor:
        """No unlabeled pool: nothing to score."""
        return torch.empty(0, len(self.require_classnames()))

    def epochs_hint(self) -> tuple[str, str]:
        return f"epochs={self.epochs_per_round} epochs", "model.init_args.epochs"


_NO_LABELS = (
    "CoOp learns from labels and the train split has none: give data.init_args.shots (the paper's 1 to 16 "
    "per class) or a labelled train split; to learn without labels, PromptTuning pseudolabels the images"
)
