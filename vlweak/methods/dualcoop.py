"""DualCoOp (Sun, Hu, Saenko, NeurIPS 2022): "DualCoOp: Fast Adaptation to Multi-Label Recognition
with Limited Annotations".

1. **Dual prompts** (Sec. 3.1): a learnable positive and a learnable negative context,
   ``[v⁺_1 … v⁺_M] <class>`` and ``[v⁻_1 … v⁻_M] <class>``, class-specific or shared, run through the
   frozen text encoder in one pass for all classes: ``t⁺_c, t⁻_c``.
2. **Class-specific region feature aggregation** (Sec. 3.2): every spatial token of the frozen image
   encoder is projected into the joint space (ResNet: the attention pool's value/output projections;
   ViT: the patch tokens through ``ln_post`` and the final projection; spatial tokens only, the
   authors' ResNet code also counts the pool's mean token as a region), ``r_i``. Per region and class
   ``s⁺_{i,c} = ⟨r_i, t⁺_c⟩``, ``s⁻_{i,c} = ⟨r_i, t⁻_c⟩``; the regions are weighted by a softmax over
   regions of the positive similarities, ``w_{i,c} = softmax_i(s⁺_{i,c} / τ_s)``, and both are aggregated
   with the same weights: ``S^±_c = Σ_i w_{i,c} s^±_{i,c}``.
3. **Prediction and loss** (Sec. 3.3): ``p_c = softmax(λ S⁺_c, λ S⁻_c)₁ = σ(λ (S⁺_c − S⁻_c))``, trained
   with the asymmetric loss (:mod:`vlweak.losses.asymmetric`) on the observed labels only; with one
   positive per image, EM + APL (:mod:`vlweak.losses.single_positive`) instead.

Settings: partial labels (the data module's ``label_fraction``; the drawn mask is saved in the log
dir), single positive (``single_positive``), and zero-shot multi-label: train on the seen classes,
evaluate on the unseen ones and on all (``unseen_classes``).
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor
from torch.utils.data import Subset

from vlweak.backbones import Backbone
from vlweak.data.datamodule import FeatureDataset
from vlweak.data.datasets import LabelsOfKept
from vlweak.losses import AsymmetricPseudoLabeler, asymmetric_loss, em_apl_loss
from vlweak.methods.base import DEFAULT_BACKBONE, VLMethod, check_options
from vlweak.metrics import multilabel_report
from vlweak.prompts.learners import DualPromptLearner
from vlweak.runs import run_folder

log = logging.getLogger(__name__)

LossName = Literal["auto", "asl", "em_apl"]


def region_aggregate(dense: Tensor, pos: Tensor, neg: Tensor, spatial_temperature: float) -> Tensor:
    """Class-specific region feature aggregation (DualCoOp Sec. 3.2).

    Args:
        dense: ``[B, R, D]`` unit-norm region features.
        pos: ``[C, D]`` unit-norm positive prompt features.
        neg: ``[C, D]`` unit-norm negative prompt features.
        spatial_temperature: ``τ_s`` of the softmax over regions.

    Returns ``[B, C, 2]`` in float32: the aggregated positive and negative similarities ``(S⁺, S⁻)``.
    Computed in float32 whatever the autocast: the logits are these similarities times a scale
    near 100, where bf16 rounding would move the positive-negative margin by a tenth of a logit.
    """
    c = pos.shape[0]
    with torch.autocast(dense.device.type, enabled=False):
        sims = dense.float() @ torch.cat([pos, neg]).float().T  # [B, R, 2C], one matmul for both prompts
        s_pos, s_neg = sims[..., :c], sims[..., c:]
        weights = torch.softmax(s_pos / spatial_temperature, dim=1)  # over regions, per class
        return torch.stack([(weights * s_pos).sum(1), (weights * s_neg).sum(1)], dim=-1)


def resolve_unseen(classnames: list[str], unseen: list[str] | float | None, seed: int = 0) -> list[int]:
    """Indices of the unseen classes: the named ones, or a seeded random ``fraction`` of the classes."""
    if unseen is None:
        return []
    if isinstance(unseen, (int, float)) and not isinstance(unseen, bool):
        if not 0 < unseen < 1:
            raise ValueError(f"unseen_classes as a fraction must lie in (0, 1), got {unseen}")
        k = max(1, round(unseen * len(classnames)))
        if k >= len(classnames):
            raise ValueError(f"unseen fraction {unseen} leaves no seen class among {len(classnames)}")
        g = torch.Generator().manual_seed(seed)
        return sorted(torch.randperm(len(classnames), generator=g)[:k].tolist())
    names = list(unseen)
    missing = [n for n in names if n not in classnames]
    if missing:
        raise ValueError(f"unseen classes {missing} are not in the class vocabulary ({classnames[:8]}...)")
    idx = sorted(classnames.index(n) for n in names)
    if len(idx) >= len(classnames):
        raise ValueError("unseen_classes names every class: nothing is left to train on")
    return idx


def check_train_classes(loss: str, train_classes: int | None) -> None:
    """``train_classes`` samples the asymmetric loss's classes; EM + APL needs every seen class."""
    if loss == "em_apl" and train_classes is not None:
        raise ValueError("train_classes samples the classes of the asymmetric loss; EM + APL (single positive) "
                         "labels every seen class each epoch: leave train_classes unset")


class DualCoOp(VLMethod):
    """DualCoOp: positive/negative prompt tuning with class-specific region aggregation.

    Args:
        backbone: the frozen CLIP-family model (ResNet or ViT image tower).
        classnames: class vocabulary; set by the CLI from the data module.
        multilabel: must be true (set by the CLI from the data module).
        n_ctx: context tokens of each prompt (16, as CoOp/DualCoOp with partial labels; the paper's
            code takes 64 for unseen classes, which fits CLIP's 77-token context but not the
            built-in models' 32).
        init_pos: phrase initialising the positive context (``None``: N(0, 0.02), the paper's).
        init_neg: phrase initialising the negative context.
        class_specific: class-specific contexts (``None``: yes for partial labels, the paper's choice;
            shared when ``unseen_classes`` is set, since unseen classes need a shared context). With
            very few labels observed the paper's authors advise shared contexts (``false``).
        spatial_temperature: ``τ_s`` of the softmax over regions (0.05, i.e. similarities × 20).
        logit_scale: ``λ`` of the positive-vs-negative softmax; ``None`` uses the backbone's learned
            CLIP scale (100 for OpenAI's CLIP, the paper's value).
        loss: ``asl`` (asymmetric loss), ``em_apl`` (single positive), ``auto`` (``em_apl`` when the
            data module's budget is ``single_positive``, else ``asl``).
        gamma_pos: ASL focusing exponent of positives ``γ⁺``.
        gamma_neg: ASL focusing exponent of negatives ``γ⁻``.
        clip: ASL probability margin ``m`` on negatives.
        loss_reduction: ``sum`` over observed entries (ASL's) or ``mean``.
        detach_focal_weights: ASL's focusing weights ``(1 − p)^γ⁺`` and ``p_m^γ⁻`` carry no gradient
            (as ASL's and DualCoOp's training code: the weights only rescale each entry's
            log-likelihood gradient); ``false`` differentiates through them too.
        loss_weight: factor on the loss (the reference code's ``loss_w``: 0.01-0.03 with the summed
            ASL on COCO, larger for fewer observed labels).
        em_alpha: EM weight ``α`` of the entropy on unknown labels (the default is Zhou et al.'s COCO
            value; on VOC they use 0.2, as ``recipes/dualcoop/voc_single_positive.yaml`` does).
        apl_beta: APL weight ``β`` of the soft pseudo-negatives (COCO's 0.9; VOC 0.02).
        apl_neg_proportion: fraction of each class's unknown labels turned into pseudo-negatives by the end.
        apl_warmup_epochs: epochs of EM alone before APL starts (at least 1; Zhou et al.: 5 of 10
            epochs on COCO and VOC). After each later epoch but the last, APL scores the train
            images whose region features are kept with the epoch-end prompts (Zhou et al. score the
            train set again) and labels the lowest unknown entries; images without kept features
            (augmented training, past ``region_cache_gb``) are read and encoded again for it, without
            augmentation.
        unseen_classes: zero-shot setting: class names held out of training, or a fraction of the
            classes drawn with ``split_seed``; evaluation then also logs ``<stage>/unseen_*`` and
            ``<stage>/seen_*`` metrics next to the metrics on all classes.
        split_seed: seed of a fractional seen/unseen split.
        train_classes: seen classes per training step (the paper's code's ``num_train_cls``, for
            large vocabularies such as NUS-WIDE's 925 seen classes): each step draws this many, the
            text tower encodes only their prompts and the loss covers only their labels; ``None``:
            all. The draw depends on ``split_seed`` and the step alone, so every rank draws the same
            classes and a resumed fit the ones an uninterrupted fit would. Asymmetric loss only.
        lr: SGD learning rate (0.002).
        warmup_epochs: epochs at ``warmup_lr`` before the cosine decay (the paper's code: 1).
        warmup_lr: learning rate of the warm-up epochs (the paper's code: 1e-5).
        momentum: SGD momentum.
        weight_decay: SGD weight decay.
        threshold: probability threshold for F1 and hard pseudolabels.
        save_mask: write the train split's drawn label mask to ``<log dir>/train_label_mask.safetensors``.
        region_cache_gb: the image tower is frozen, so without training augmentation an image's region
            features are the same every epoch: up to this many GiB of them (float32, on the CPU) are
            kept from the first epoch, and later epochs read them instead of encoding those images
            again; the train loader then serves those images' labels alone, without reading or
            decoding the image. The built-in world's 2,000 scenes take 32 MiB; COCO's 82,783 at
            ViT-B/32, 224 px, 7.7 GiB (the first half of them within the default). 0 encodes every step.
        artifact_path: where test/predict write the pseudolabel artifact (default
            ``<log dir>/pseudolabels-<stage>.safetensors``); a folder (an existing one, or a path ending in
            ``/``) holds ``pseudolabels-<stage>.safetensors``; ``""`` writes none.
    """

    classnames_at_construction = True

    def __init__(
        self,
        backbone: Backbone = DEFAULT_BACKBONE,
        classnames: list[str] | None = None,
        multilabel: bool = True,
        n_ctx: int = 16,
        init_pos: str | None = None,
        init_neg: str | None = None,
        class_specific: bool | None = None,
        spatial_temperature: float = 0.05,
        logit_scale: float | None = None,
        loss: LossName = "auto",
        gamma_pos: float = 1.0,
        gamma_neg: float = 2.0,
        clip: float = 0.05,
        loss_reduction: Literal["sum", "mean"] = "sum",
        detach_focal_weights: bool = True,
        loss_weight: float = 1.0,
        em_alpha: float = 0.1,
        apl_beta: float = 0.9,
        apl_neg_proportion: float = 0.9,
        apl_warmup_epochs: int = 5,
        unseen_classes: list[str] | float | None = None,
        split_seed: int = 0,
        train_classes: int | None = None,
        lr: float = 0.002,
        warmup_epochs: int = 1,
        warmup_lr: float = 1e-5,
        momentum: float = 0.9,
        weight_decay: float = 5e-4,
        threshold: float = 0.5,
        save_mask: bool = True,
        region_cache_gb: float = 4.0,
        artifact_path: str | None = None,
    ) -> None:
        super().__init__(backbone, classnames, multilabel, artifact_path)
        if not multilabel:
            raise ValueError("DualCoOp is a multi-label method: use a data module with multilabel: true")
        if loss not in ("auto", "asl", "em_apl"):
            raise ValueError(f"loss must be 'auto', 'asl' or 'em_apl', got {loss!r}")
        check_train_classes(loss, train_classes)
        if spatial_temperature <= 0:
            raise ValueError(f"spatial_temperature must be > 0, got {spatial_temperature}")
        if loss_reduction not in ("sum", "mean"):
            raise ValueError(f"loss_reduction must be 'sum' or 'mean', got {loss_reduction!r}")
        if logit_scale is not None and not logit_scale > 0:
            raise ValueError(f"logit_scale must be > 0 (or null for the backbone's), got {logit_scale}")
        check_options(
            threshold=threshold, n_ctx=(n_ctx, 1, None), gamma_pos=(gamma_pos, 0.0, None), clip=(clip, 0.0, 1.0), gamma_neg=(gamma_neg, 0.0, None),
            em_alpha=(em_alpha, 0.0, None), apl_neg_proportion=(apl_neg_proportion, 0.0, 1.0), momentum=(momentum, 0.0, 1.0),
            apl_beta=(apl_beta, 0.0, None), apl_warmup_epochs=(apl_warmup_epochs, 1, None),
            warmup_epochs=(warmup_epochs, 0, None), warmup_lr=(warmup_lr, 0.0, None),
            **({"train_classes": (train_classes, 1, None)} if train_classes is not None else {}),
            region_cache_gb=(region_cache_gb, 0.0, None), weight_decay=(weight_decay, 0.0, None),
            positive={"lr": lr, "loss_weight": loss_weight},
        )
        names = self.require_classnames()
        self.save_hyperparameters(ignore=["backbone"])
        self.unseen = resolve_unseen(names, unseen_classes, split_seed)
        self.seen = [c for c in range(len(names)) if c not in set(self.unseen)]
        if class_specific is None:
            class_specific = not self.unseen
        elif class_specific and self.unseen:
            raise ValueError("class_specific contexts cannot transfer to unseen classes: set class_specific: false")
        self.prompts = DualPromptLearner(self.backbone, names, n_ctx, init_pos, init_neg, class_specific)
        self.register_buffer("seen_index", torch.tensor(self.seen, dtype=torch.long), persistent=False)
        self.register_buffer("text_cache", torch.empty(0), persistent=False)
        self.loss_name = loss
        self.labeler: AsymmetricPseudoLabeler | None = None
        self._train_outputs: list[dict[str, Tensor]] = []
        self.threshold = threshold
        self._regions: dict[int, Tensor] = {}  # train image index -> its region features (CPU)
        self._kept_flags: Tensor | None = None  # the train loader's LabelsOfKept flags

    # ---------------------------------------------------------------- model
    def text_features(self, classes: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """Unit-norm positive and negative prompt features ``([C', D], [C', D])`` of ``classes``
        (default all), both prompts of every class in one pass of the text tower."""
        pos, neg = self.prompts.positive, self.prompts.negative
        emb_pos, emb_neg = pos.embeddings(), neg.embeddings()
        ids_pos, ids_neg = pos.token_ids, neg.token_ids
        if classes is not None and len(classes) < len(pos.classnames):
            emb_pos, emb_neg, ids_pos, ids_neg = emb_pos[classes], emb_neg[classes], ids_pos[classes], ids_neg[classes]
        with self.backbone.autocast():
            feats = self.backbone.encode_text_embeddings(torch.cat([emb_pos, emb_neg]), torch.cat([ids_pos, ids_neg]))
        feats = F.normalize(feats.float(), dim=-1)
        return feats[: len(emb_pos)], feats[len(emb_pos) :]

    def scale(self) -> Tensor:
        s = self.hparams.logit_scale
        return self.backbone.logit_scale.detach().float() if s is None else torch.tensor(float(s), device=self.device)

    def region_features(self, batch: dict[str, Any]) -> Tensor:
        """Unit-norm region features ``[B, R, D]`` from the frozen image tower (no gradient)."""
        if "image" not in batch:
            raise ValueError(
                "DualCoOp needs images for region features; the batch has none (set the data module's embeddings: false)"
            )
        with torch.no_grad():
            _, dense = self.backbone.dense_features(batch["image"])
        return dense

    def step_classes(self, step: int) -> Tensor:
        """The classes a training step trains: the seen ones, or ``train_classes`` of them drawn
        for ``step`` (sorted)."""
        n = self.hparams.train_classes
        if n is None or n >= len(self.seen):
            return self.seen_index
        generator = torch.Generator().manual_seed(self.hparams.split_seed * 1_000_003 + step)
        pick = torch.randperm(len(self.seen), generator=generator)[:n].sort().values
        return self.seen_index[pick.to(self.seen_index.device)]

    def _keeps_regions(self) -> bool:
        return self.hparams.region_cache_gb > 0 and self.train_augment is None

    def train_region_features(self, batch: dict[str, Any]) -> Tensor:
        """:meth:`region_features` of a training batch: images met in an earlier epoch are read
        from the kept features, the others encoded (and kept while ``region_cache_gb`` allows).
        The batch may carry images for some rows only (``image_rows``): the others must be kept."""
        if not self._keeps_regions():
            return self.region_features(batch)
        index = batch["index"].tolist()
        if "image" not in batch:
            rows = []  # no images: every sample's features must be kept
        elif "image_rows" in batch:
            rows = batch["image_rows"].tolist()  # images of some samples only
        else:
            rows = list(range(len(index)))
        loaded = {r: i for i, r in enumerate(rows)}  # batch row -> its row of batch["image"]
        met = [i for i, k in enumerate(index) if k in self._regions]
        todo = [i for i in rows if index[i] not in self._regions]
        if len(met) + len(todo) < len(index):
            if "image" not in batch:
                return self.region_features(batch)  # says what the batch lacks
            lost = [k for i, k in enumerate(index) if i not in loaded and k not in self._regions]
            raise RuntimeError(f"DualCoOp: samples {lost[:5]} came without their images, and their region features are not kept")
        if len(todo) == len(index):
            dense = fresh = self.region_features(batch)
        else:  # some met before: their features in one copy to the device, the others encoded
            kept = torch.stack([self._regions[index[i]] for i in met]).to(self.device)
            dense = kept.new_empty((len(index), *kept.shape[1:]))
            dense[met] = kept
            if todo:
                dense[todo] = fresh = self.region_features({"image": batch["image"][[loaded[i] for i in todo]]})
        if todo:
            room = int(self.hparams.region_cache_gb * 2**30) // (fresh[0].numel() * fresh.element_size())
            keep = todo[: max(0, room - len(self._regions))]
            rows_kept = fresh[: len(keep)].to("cpu", copy=True)  # one copy off the device
            self._regions.update((index[i], row) for i, row in zip(keep, rows_kept))
            if self._kept_flags is not None:  # the loader stops reading these images
                self._kept_flags[[index[i] for i in keep]] = True
        return dense

    def logits(self, dense: Tensor, pos: Tensor, neg: Tensor) -> Tensor:
        """``[B, C, 2]`` positive/negative logit pairs ``λ (S⁺, S⁻)`` (float32)."""
        return self.scale().float() * region_aggregate(dense, pos, neg, self.hparams.spatial_temperature)

    def forward(self, images: Tensor) -> Tensor:
        """Class probabilities ``[B, C]`` of a batch of preprocessed images."""
        pos, neg = self.text_features()
        z = self.logits(self.region_features({"image": images}), pos, neg)
        return torch.softmax(z, dim=-1)[..., 0]

    # ---------------------------------------------------------------- training
    def setup(self, stage: str) -> None:
        super().setup(stage)
        if stage != "fit":
            return
        self._regions = {}  # kept features belong to one fit's train split
        dm = self.datamodule
        train = dm.raw("train") if dm is not None and hasattr(dm, "raw") else None
        if train is not None and hasattr(train, "masks") and not train.masks().any():
            budget = getattr(dm, "budget", None)
            fraction = getattr(budget, "fraction", None)
            raise ValueError(
                f"the train split has no observed label{f' (label_fraction {fraction})' if fraction is not None else ''}: "
                "DualCoOp learns from observed labels; raise label_fraction, or train on pseudolabels "
                "(recipes/cdul/shapes_to_dualcoop.yaml)"
            )
        self._serve_labels_of_kept(dm)
        budget = getattr(dm, "budget", None)
        if self.loss_name == "auto":
            self.loss_name = "em_apl" if budget is not None and budget.single_positive else "asl"
        check_train_classes(self.loss_name, self.hparams.train_classes)
        if self.loss_name == "em_apl":
            train = dm.raw("train") if dm is not None else None
            if train is None:
                raise ValueError("loss em_apl needs the data module's train split (its size sets the pseudo-label table)")
            max_epochs = self.trainer.max_epochs if self.trainer.max_epochs and self.trainer.max_epochs > 0 else 10
            if self.hparams.apl_warmup_epochs >= max_epochs:
                rank_zero_warn(
                    f"apl_warmup_epochs={self.hparams.apl_warmup_epochs} leaves no epoch of a {max_epochs}-epoch fit "
                    "for asymmetric pseudo-labeling: it trains with EM alone (lower apl_warmup_epochs or raise "
                    "max_epochs)",
                    category=UserWarning,
                    stacklevel=2,
                )
            labeler = AsymmetricPseudoLabeler(
                len(train), len(self.seen), self.hparams.apl_neg_proportion, self.hparams.apl_warmup_epochs, max_epochs
            )
            # Not a sub-module: its table is train-set state, saved under its own checkpoint key, so
            # test/predict load a checkpoint without it.
            object.__setattr__(self, "labeler", labeler)

    def on_fit_start(self) -> None:
        if self.labeler is not None:
            self.labeler.to(self.device)
        if self.hparams.save_mask:
            from vlweak.data.multilabel import save_label_mask

            dm = self.datamodule
            root = run_folder(self.trainer)  # a collective under DDP
            if self.global_rank != 0 or dm is None:
                return
            if save_label_mask(dm, root / "train_label_mask.safetensors") is not None:
                log.info("saved the train label mask to %s", root / "train_label_mask.safetensors")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        if not batch:  # every image of it skipped as unreadable
            if self._global_mean():  # the other ranks count their observed labels: join them
                self.all_gather(torch.zeros((), device=self.device))
            return self.empty_step()
        if "target" not in batch:
            raise ValueError("DualCoOp trains on multi-label batches with 'target' and 'mask'")
        seen = self.step_classes(self.global_step)
        dense = self.train_region_features(batch)
        pos, neg = self.text_features(seen if len(seen) < len(self.prompts.positive.classnames) else None)
        z = self.logits(dense, pos, neg)
        targets, mask = batch["target"][:, seen], batch["mask"][:, seen].bool()
        hp = self.hparams
        if self.loss_name == "em_apl":
            pseudo = self.labeler(batch["index"]) if self.labeler is not None else None
            loss = em_apl_loss(z, targets, mask, pseudo, hp.em_alpha, hp.apl_beta)
            probs = torch.softmax(z.detach(), dim=-1)[..., 0]
            self._train_outputs.append({"probs": probs, "index": batch["index"], "mask": mask})
        elif self._global_mean():
            # the mean over the global batch's observed entries: ranks observe different numbers of
            # labels, so a mean of the ranks' means would weigh them wrongly (DDP averages gradients)
            total = asymmetric_loss(z, targets, mask, hp.gamma_pos, hp.gamma_neg, hp.clip, reduction="sum",
                                    detach_weights=hp.detach_focal_weights)
            observed = self.all_gather(mask.sum().float()).sum().clamp_min(1)
            loss = total / observed * self.trainer.world_size
        else:
            loss = asymmetric_loss(z, targets, mask, hp.gamma_pos, hp.gamma_neg, hp.clip, reduction=hp.loss_reduction,
                                   detach_weights=hp.detach_focal_weights)
        loss = hp.loss_weight * loss
        self.log("train/loss", loss, prog_bar=True, batch_size=len(targets))
        self.log("train/observed", mask.float().mean(), batch_size=len(targets))
        if hp.loss_reduction == "sum" and self.loss_name != "em_apl" and self._trainer is not None:
            # DDP averages the ranks' gradients; a sum over the global batch needs them added
            loss = loss * self.trainer.world_size
        return loss

    def _serve_labels_of_kept(self, dm: Any) -> None:
        """Let the train split serve the labels alone of images whose region features are kept."""
        self._kept_flags = None
        train = getattr(dm, "datasets", {}).get("train")
        images = train is not None and not isinstance(train, FeatureDataset) and hasattr(train, "targets")
        if not (self._keeps_regions() and images and getattr(train, "multilabel", False)):
            return
        if not isinstance(train, LabelsOfKept):
            dm.datasets["train"] = train = LabelsOfKept(train)
        self._kept_flags = train.kept
        self._kept_flags.zero_()

    def on_fit_end(self) -> None:
        self._regions = {}
        self._kept_flags = None
        dm = self.datamodule
        if isinstance(getattr(dm, "datasets", {}).get("train"), LabelsOfKept):
            dm.datasets["train"] = dm.datasets["train"].dataset  # the split as the data module made it

    def _global_mean(self) -> bool:
        """The asymmetric loss averaged over the observed labels of the global batch (several ranks)."""
        return (self.loss_name != "em_apl" and self.hparams.loss_reduction == "mean" and self._trainer is not None
                and self.trainer.world_size > 1)

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()  # an epoch of unreadable images alone is an error
        parts, self._train_outputs = self._train_outputs, []
        if self.labeler is None:
            return
        local = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}
        if local and self.labeler.labels_after(self.current_epoch):
            local["probs"] = self._epoch_end_scores(local["index"], local["probs"])
        if self.trainer.world_size > 1:  # every rank joins, also one whose batches were all skipped
            local = self._all_gather_ragged(local)
        if not local:
            return
        added = self.labeler.update(local["probs"], local["index"], local["mask"], self.current_epoch)
        self.log("train/apl_new_negatives", float(added))

    @torch.no_grad()
    def _epoch_end_scores(self, index: Tensor, probs: Tensor, chunk: int = 256) -> Tensor:
        """The epoch-end prompts' scores of this rank's trained samples ``index`` (rows of ``probs``,
        which hold their training steps' scores), as Zhou et al. score the train set again before
        APL labels: from the kept region features where there are some, else from the images
        under the evaluation transform (no augmentation); an image now unreadable keeps its row."""
        probs = probs.clone()
        pos, neg = self.text_features(self.seen_index if self.unseen else None)

        def score(dense: Tensor) -> Tensor:
            return torch.softmax(self.logits(dense, pos, neg), dim=-1)[..., 0].to(probs.dtype)

        rows: dict[int, list[int]] = {}  # sample -> its rows (a distributed sampler may repeat one)
        for r, i in enumerate(index.tolist()):
            rows.setdefault(i, []).append(r)
        kept = [i for i in rows if i in self._regions]
        for start in range(0, len(kept), chunk):
            part = kept[start : start + chunk]
            scores = score(torch.stack([self._regions[i] for i in part]).to(self.device))
            for i, row in zip(part, scores):
                probs[rows[i]] = row
        rest = sorted(set(rows) - set(kept))
        dm = self.datamodule
        if rest and dm is not None and hasattr(dm, "eval_dataset"):
            for batch in self.scan_loader(Subset(dm.eval_dataset("train"), rest)):
                if not batch or "image" not in batch:
                    continue
                for i, row in zip(batch["index"].tolist(), score(self.region_features(batch))):
                    probs[rows[i]] = row
        return probs

    def trains_per_class(self) -> bool:
        return getattr(self, "prompts", None) is not None and self.prompts.positive.class_specific

    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opt = torch.optim.SGD(self.prompts.parameters(), lr=hp.lr, momentum=hp.momentum, weight_decay=hp.weight_decay)
        steps, per_epoch = 1, 1
        if self._trainer is not None:
            steps = max(1, int(self.trainer.estimated_stepping_batches))
            batches = self.trainer.num_training_batches
            if math.isfinite(batches):
                per_epoch = max(1, int(batches) // max(1, self.trainer.accumulate_grad_batches))
        warm = min(hp.warmup_epochs * per_epoch, steps - 1)  # at least the last step decays
        if hp.warmup_epochs and warm < hp.warmup_epochs * per_epoch:
            rank_zero_warn(f"warmup_epochs={hp.warmup_epochs} fills the whole fit ({steps} steps): it trains at warmup_lr "
                           f"until its last step (lower warmup_epochs or raise max_epochs)")
        span = steps - warm

        def factor(step: int) -> float:  # of lr: warm-up constant, then a cosine over the other steps
            if step < warm:
                return hp.warmup_lr / hp.lr if hp.lr > 0 else 0.0
            return 0.5 * (1 + math.cos(math.pi * (step - warm) / span))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_save_checkpoint(checkpoint)
        if self.labeler is not None:
            checkpoint["apl_pseudo"] = self.labeler.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        state = checkpoint.get("apl_pseudo")
        if state is not None and self.labeler is not None:
            self.labeler.load_state_dict(state)

    # ---------------------------------------------------------------- evaluation
    def _cache_text(self) -> None:
        with torch.no_grad():
            pos, neg = self.text_features()
        self.text_cache = torch.stack([pos, neg])

    def prepare_eval(self, stage: str) -> None:
        self._cache_text()

    def eval_step(self, batch: dict[str, Any], stage: str) -> dict[str, Tensor]:
        if self.text_cache.numel() == 0:
            self._cache_text()
        pos, neg = self.text_cache[0], self.text_cache[1]
        scores = torch.softmax(self.logits(self.region_features(batch), pos, neg), dim=-1)[..., 0]
        return {"scores": scores, "index": batch["index"], **self.targets_of(batch)}

    def _end_eval(self, stage: str) -> None:
        super()._end_eval(stage)
        self.text_cache = torch.empty(0, device=self.device)  # prompts change in training

    def evaluate(self, stage: str, scores: Tensor, targets: Tensor, mask: Tensor | None = None) -> dict[str, float]:
        """mAP / F1 over all classes and, in the unseen-class setting, over the seen and the unseen ones.

        The unseen metrics follow the zero-shot protocol (the paper's ZSL, after the 48 / 17 COCO
        split's literature): they score the images with at least one unseen class present, as the
        unseen test set holds only those. ``<stage>/mAP`` is the generalized setting (GZSL: every
        image, every class); the seen metrics read every image."""
        metrics = super().evaluate(stage, scores, targets, mask)
        known = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask.bool()
        for part, idx in (("unseen", self.unseen), ("seen", self.seen)) if self.unseen else ():
            rows = slice(None)
            if part == "unseen":
                rows = ((targets[:, idx] > 0) & known[:, idx]).any(1)
                if not bool(rows.any()):
                    continue  # no image of an unseen class in this split: nothing to score
            report = multilabel_report(scores[rows][:, idx], targets[rows][:, idx], known[rows][:, idx], self.threshold)
            report.pop("per_class")
            part_metrics = {f"{stage}/{part}_{k}": float(v) for k, v in report.items()}
            self.log_metrics(part_metrics)
            metrics.update(part_metrics)
        self.last_metrics = metrics
        return metrics

    def provenance(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        info = super().provenance(*args, **kwargs)
        names = self.require_classnames()
        info["unseen_classes"] = [names[i] for i in self.unseen]
        return info
