"""CDUL: CLIP-driven unsupervised multi-label classification (Abdelfattah et al., ICCV 2023).

Three stages, no human labels anywhere:

1. **Initialization** (:mod:`vlweak.methods.cdul_snippets`): CLIP similarity of the whole image
   (global) and of each snippet of a ``grid × grid`` lattice (local) to every class prompt; the
   global–local aggregator (per class: the max snippet score when it reaches ``ζ``, else the min) and
   the mean with the global vector give soft initial pseudolabels ``Y⁰ ∈ [0, 1]^{N×C}`` of the train
   split, written as a pseudolabel artifact (``pseudolabels-train-init.safetensors``).
2. **Gradient-alignment training**: a classifier ``f(·; θ)`` (a linear/MLP head on the frozen CLIP
   image embedding, or any image network given as ``network``) is trained against the soft
   pseudolabels, which are latent variables refined alternately with the network:

   * θ-step (``Y`` fixed): ``θ ← θ − η ∇_θ L(Y, f(X; θ))`` with
     ``L = Σ_c KL(Bern(y_c) ‖ Bern(σ(z_c)))`` (soft-label binary KL, ``z = f(x; θ)``);
   * Y-step (θ fixed, unobserved entries only): the pseudolabels are latent variables
     ``y = σ(ỹ)``, and ``ỹ ← ỹ − ψ(y) ∇_y L`` (the paper's Sec. 3.2) with ``∇_y L = logit(y) − z``
     and ``ψ`` the Gaussian density of mean 0.5 and standard deviation ``label_sigma``:
     labels near 0.5, the uncertain ones, move most. Since ``ỹ = logit(y)``, the step is the blend
     ``ỹ ← (1 − ψ) ỹ + ψ z`` in logit space: each label moves a fraction ψ (0.35–0.40 at
     σ = 1) of the way to the network's current prediction, never past it.

   The refined pseudolabels are written at the end of fit (``pseudolabels-train-refined.safetensors``).
3. **Inference**: the classifier alone (``inference: classifier``); ``inference: init`` scores a
   split with the training-free initialization instead (global / local / aggregated, see ``init``),
   which is how ``vlweak test``/``predict`` produce initial pseudolabels for any split.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from vlweak.backbones import Backbone
from vlweak.distributed import fill_once_per_node
from vlweak.methods.base import DEFAULT_BACKBONE, VLMethod, check_options
from vlweak.methods.cdul_snippets import (
    INIT_MODES,
    SNIPPET_FITS,
    InitMode,
    SnippetFit,
    aggregate_snippets,
    class_similarities,
    initial_scores,
    snippet_embeddings,
)
from vlweak.metrics import multilabel_report
from vlweak.prompts import text_classifier

LABEL_EPS = 1e-4


# ---------------------------------------------------------------------------- gradient alignment
def soft_label_kl(y: Tensor, logits: Tensor) -> Tensor:
    """Per-entry ``KL(Bern(y) ‖ Bern(σ(z)))`` of soft labels ``y`` against logits ``z``."""
    entropy = torch.xlogy(y, y) + torch.xlogy(1 - y, 1 - y)
    return entropy + y * F.softplus(-logits) + (1 - y) * F.softplus(logits)


def label_gradient(y: Tensor, logits: Tensor) -> Tensor:
    """``∂ KL(Bern(y) ‖ Bern(σ(z))) / ∂y = logit(y) − z`` (per entry)."""
    return torch.logit(y.clamp(LABEL_EPS, 1 - LABEL_EPS)) - logits


def label_step_size(y: Tensor, sigma: float, scale: float = 1.0) -> Tensor:
    """ψ(y) of the Y-step: ``scale`` times the Gaussian density of mean 0.5 and standard deviation
    ``sigma`` at each label (the paper's ψ; ``scale`` 1)."""
    return scale * torch.exp(-0.5 * ((y - 0.5) / sigma) ** 2) / (sigma * math.sqrt(2 * math.pi))


def align_labels(
    y: Tensor, logits: Tensor, sigma: float = 1.0, scale: float = 1.0, fixed: Tensor | None = None, eps: float = LABEL_EPS
) -> Tensor:
    """One Y-step on the latent labels: ``σ(ỹ − ψ(y) ∇_y L)`` with ``ỹ = logit(y)`` (Sec. 3.2), kept
    inside ``[eps, 1 − eps]``; entries where ``fixed`` is True (observed labels) stay as they are."""
    inside = y.clamp(eps, 1 - eps)
    step = label_step_size(inside, sigma, scale) * label_gradient(inside, logits)
    new = torch.sigmoid(torch.logit(inside) - step).clamp(eps, 1 - eps)
    return new if fixed is None else torch.where(fixed, y, new)


class CDUL(VLMethod):
    """CDUL unsupervised multi-label classification: global–local CLIP pseudolabels, then a classifier
    trained with gradient-alignment pseudolabel refinement.

    Args:
        backbone: the CLIP-family model (default: the shipped ``vlweak-shapes`` model).
        classnames: class vocabulary; set by the CLI from the data module.
        multilabel: must be true (set by the CLI from the data module).
        templates: prompt templates (``simple``, ``imagenet80``, a list with one ``{}`` each, or a file of them).
        grid: snippets per side; the image is split into ``grid × grid`` crops (paper: 3×3).
        overlap: fraction shared by neighbouring snippets, in [0, 1) (paper: 0, a plain grid).
        snippet_fit: what the grid tiles: ``stretch`` (the whole image resized to a square, as the
            paper splits the image: objects at the borders of a non-square image get snippets
            too) or ``crop`` (the centre square, the part CLIP's preprocessing keeps).
        snippet_threshold: ζ of the aggregator: a class takes its max snippet score when that
            reaches ζ, else its min snippet score (paper: 0.5).
        init: initial pseudolabels: ``aggregated`` (paper: mean of global and aggregated local),
            ``global`` (whole image only) or ``local`` (aggregated snippets only).
        temperature: softmax temperature of the CLIP similarities; ``null`` uses ``logit_scale``.
        head: classifier on the frozen CLIP image embeddings: ``linear`` or ``mlp``.
        features: what the head sees: ``global`` (the whole-image embedding) or ``snippets`` (the
            whole image and every snippet as instances of a bag; per class the max over instances,
            so small objects seen by one snippet count). Both are cached CLIP embeddings; inference
            is still the classifier alone.
        hidden_dim: hidden width of the ``mlp`` head.
        network: an image classifier ``[B, 3, H, W] → [B, C]`` logits (e.g. a timm/torchvision model
            with ``num_classes`` set) trained instead of the head; it gets the data module's images.
        lr: learning rate of the classifier (AdamW).
        weight_decay: weight decay of the classifier.
        label_sigma: standard deviation of ψ, the Gaussian (mean 0.5) that sizes each label's step
            ``ỹ ← ỹ − ψ(y) ∇_y L``; at least 0.4, so that no step passes the classifier's
            prediction.
        label_scale: a factor on ψ (paper: 1; 0 keeps the labels fixed).
        label_warmup_epochs: epochs of θ-steps only before the pseudolabels start to move.
        threshold: a class is a hard pseudolabel in the artifacts when its score reaches this.
        inference: ``classifier`` (the trained classifier alone, the paper's inference) or ``init``
            (training-free initial pseudolabels of the split, for ``vlweak test``/``predict``).
        snippet_batch_size: images per batch of the snippet pass (``grid²`` crops each).
        cache_dir: embedding cache folder (default: the data module's, else ``$VLWEAK_CACHE``).
        artifact_path: where test/predict write the pseudolabel artifact (default
            ``<log dir>/pseudolabels-<stage>.safetensors``); a folder (an existing one, or a path ending in
            ``/``) holds ``pseudolabels-<stage>.safetensors``; ``""`` writes none.
    """

    def __init__(
        self,
        backbone: Backbone = DEFAULT_BACKBONE,
        classnames: list[str] | None = None,
        multilabel: bool = True,
        templates: str | list[str] = "simple",
        grid: int = 3,
        overlap: float = 0.0,
        snippet_fit: SnippetFit = "stretch",
        snippet_threshold: float = 0.5,
        init: InitMode = "aggregated",
        temperature: float | None = None,
        head: Literal["linear", "mlp"] = "linear",
        features: Literal["global", "snippets"] = "global",
        hidden_dim: int = 512,
        network: nn.Module | None = None,
        lr: float = 1e-3,
        weight_decay: float = 1e-4,
        label_sigma: float = 1.0,
        label_scale: float = 1.0,
        label_warmup_epochs: int = 1,
        threshold: float = 0.5,
        inference: Literal["classifier", "init"] = "classifier",
        snippet_batch_size: int = 64,
        cache_dir: str | None = None,
        artifact_path: str | None = None,
    ) -> None:
        super().__init__(backbone, classnames, multilabel, artifact_path)
        if init not in INIT_MODES:
            raise ValueError(f"init must be one of {INIT_MODES}, got {init!r}")
        if head not in ("linear", "mlp"):
            raise ValueError(f"head must be 'linear' or 'mlp', got {head!r}")
        if features not in ("global", "snippets"):
            raise ValueError(f"features must be 'global' or 'snippets', got {features!r}")
        if inference not in ("classifier", "init"):
            raise ValueError(f"inference must be 'classifier' or 'init', got {inference!r}")
        if int(grid) != grid or grid < 1:
            raise ValueError(f"grid must be a positive integer, got {grid!r}")
        if not 0.0 <= overlap < 1.0:
            raise ValueError(f"overlap must lie in [0, 1), got {overlap!r}")
        if snippet_fit not in SNIPPET_FITS:
            raise ValueError(f"snippet_fit must be one of {SNIPPET_FITS}, got {snippet_fit!r}")
        check_options(
            templates=templates, temperature=temperature, threshold=threshold, label_scale=(label_scale, 0, None),
            snippet_threshold=(snippet_threshold, 0.0, 1.0), hidden_dim=(hidden_dim, 1, None),
            snippet_batch_size=(snippet_batch_size, 1, None), weight_decay=(weight_decay, 0.0, None), positive={"lr": lr},
        )
        if not label_sigma > 0 or label_scale * float(label_step_size(torch.tensor(0.5), label_sigma)) > 1:
            raise ValueError(
                f"label_sigma={label_sigma!r} with label_scale={label_scale!r} gives steps ψ above 1, which pass "
                "the classifier's prediction: use label_sigma >= 0.4 (paper: ψ a Gaussian density; 1.0 by default)"
            )
        self.templates, self.grid, self.overlap = templates, int(grid), float(overlap)
        self.snippet_fit = snippet_fit
        self.snippet_threshold, self.init, self.temperature = snippet_threshold, init, temperature
        self.lr, self.weight_decay = lr, weight_decay
        self.label_sigma, self.label_scale, self.label_warmup_epochs = label_sigma, label_scale, label_warmup_epochs
        self.threshold, self.inference, self.features = threshold, inference, features
        self.snippet_batch_size, self.cache_dir = snippet_batch_size, cache_dir
        self.save_hyperparameters(ignore=["backbone", "network"])
        self.network = network
        self.head: nn.Module | None = None
        if network is None and self.classnames:
            self.head = self._make_head(head, hidden_dim)
        self.register_buffer("fitted", torch.tensor(False))
        self.register_buffer("classifier", torch.empty(0), persistent=False)
        self.register_buffer("pseudo", torch.empty(0), persistent=False)
        self.register_buffer("fixed", torch.empty(0, dtype=torch.bool), persistent=False)
        # the label tables ([N, C]) are kept equal on every rank by the epoch-end exchange of Y-steps:
        # DDP need not broadcast them from rank 0 before every forward (26 MB a step at COCO's size)
        self._ddp_params_and_buffers_to_ignore = ["pseudo", "fixed"]
        self.init_scores: dict[str, Tensor] = {}
        self.init_metrics: dict[str, float] = {}
        self._split_scores: Tensor | None = None
        self._snippet_tables: dict[str, Tensor] = {}
        self._label_updates: list[dict[str, Tensor]] = []

    @property
    def evaluates_what_a_fit_trains(self) -> bool:
        return self.inference == "classifier"  # ``init`` scores with CLIP alone

    def trains_per_class(self) -> bool:
        return True  # the classifier's outputs are the classes

    def _make_head(self, kind: str, hidden: int) -> nn.Module:
        d, c = self.backbone.embed_dim, len(self.classnames)
        if kind == "linear":
            return nn.Linear(d, c)
        return nn.Sequential(nn.Linear(d, hidden), nn.GELU(), nn.Dropout(0.1), nn.Linear(hidden, c))

    def setup(self, stage: str) -> None:
        """The class vocabulary from the data module when none was given (see ``VLMethod.setup``),
        and the classifier head for it, before the optimizer and any checkpoint need it."""
        super().setup(stage)
        if self.network is None and self.head is None and self.classnames:
            self.head = self._make_head(self.hparams.head, self.hparams.hidden_dim).to(self.device)

    # ---------------------------------------------------------------- checks and helpers
    def _require_multilabel(self) -> None:
        self.require_classnames()
        if not self.multilabel:
            raise ValueError("CDUL is a multi-label method: use a multi-label data module (e.g. multilabel: true)")
        if self.network is None and self.head is None:
            raise ValueError("CDUL has no classifier: give classnames (or a data module) or a network")

    def _require_datamodule(self) -> Any:
        """The trainer's data module, which must be vlweak's (CDUL reads a split's raw images)."""
        dm = self.datamodule
        if dm is None or not hasattr(dm, "raw"):
            raise RuntimeError("CDUL needs a vlweak data module (it reads the raw images of a split)")
        return dm

    def _cache(self) -> Any:
        from vlweak.data.cache import EmbeddingCache

        return EmbeddingCache(self.cache_dir) if self.cache_dir is not None else self.embedding_cache()

    def scale(self) -> Tensor:
        return self.backbone.logit_scale if self.temperature is None else torch.tensor(1.0 / self.temperature)

    def build_classifier(self) -> Tensor:
        self.classifier = text_classifier(self.backbone, self.require_classnames(), self.templates).to(self.device)
        return self.classifier

    # ---------------------------------------------------------------- stage 1: initialization
    @torch.no_grad()
    def initialize(self, split: str) -> dict[str, Tensor]:
        """Global, local and the configured initial scores of a split: ``{"global", "local",
        "aggregated", "init", "index", "target"?, "mask"?}``, rows ordered by dataset index (``[N, C]``)."""
        from vlweak.data.budget import Budgeted
        from vlweak.data.cache import image_embeddings

        dm = self._require_datamodule()
        raw = dm.raw(split)
        if raw is None:
            raise RuntimeError(f"the data module has no {split!r} split to pseudolabel")
        base = raw.dataset if isinstance(raw, Budgeted) else raw
        cache = self._cache()
        workers = getattr(dm, "num_workers", 0)
        glob = image_embeddings(self.backbone, base, self.backbone.transform, cache, 256, workers, f"encoding {split}")
        snip = snippet_embeddings(
            self.backbone, base, self.grid, self.overlap, cache, self.snippet_batch_size, workers, f"snippets of {split}",
            self.snippet_fit,
        )
        if not torch.equal(glob["index"], snip["index"]):
            raise RuntimeError(f"global and snippet embeddings of {split!r} cover different images")
        w = self.build_classifier()
        scale = self.scale().to(self.device)
        s_global = class_similarities(glob["features"].to(self.device), w, scale).cpu()
        s_local = class_similarities(snip["features"].to(self.device), w, scale).cpu()
        out = {
            "global": s_global,
            "local": aggregate_snippets(s_local, self.snippet_threshold),
            "aggregated": initial_scores(s_global, s_local, "aggregated", self.snippet_threshold),
            "index": glob["index"].long(),
        }
        out["init"] = out[self.init]
        out["snippets"] = snip["features"]
        if hasattr(base, "targets") and getattr(base, "multilabel", False):
            out["target"] = base.targets()[out["index"]]  # evaluation only, never used for training
            if hasattr(base, "masks"):  # unknown entries (an unlabeled row, a VOC "difficult" object)
                out["mask"] = base.masks()[out["index"]]
        return out

    def _initialize_ranks(self, split: str) -> dict[str, Tensor]:
        """:meth:`initialize` with rank 0 encoding first (filling the cache), then each other node's
        first rank, then the others (or every rank stopping with the error)."""
        return fill_once_per_node(self.trainer_strategy, lambda: self.initialize(split))

    def _snippet_table(self, split: str, init: dict[str, Tensor] | None = None) -> Tensor:
        """Snippet embeddings ``[N, G, D]`` of a split on the device, rows by dataset index (cached)."""
        if split not in self._snippet_tables:
            from vlweak.data.budget import Budgeted

            if init is not None:
                feats, index = init["snippets"], init["index"]
            else:
                dm = self._require_datamodule()
                raw = dm.raw(split)
                base = raw.dataset if isinstance(raw, Budgeted) else raw
                got = snippet_embeddings(
                    self.backbone, base, self.grid, self.overlap, self._cache(), self.snippet_batch_size,
                    getattr(dm, "num_workers", 0), f"snippets of {split}", self.snippet_fit,
                )
                feats, index = got["features"], got["index"]
            table = torch.zeros(int(index.max()) + 1, *feats.shape[1:])
            table[index] = feats
            self._snippet_tables[split] = table.to(self.device)
        return self._snippet_tables[split]

    def _current_split(self) -> str:
        t = self.trainer
        if t.training:
            return "train"
        if t.validating or t.sanity_checking:
            return "val"
        return self.split_of("predict" if t.predicting else "test")

    def _log_init(self, prefix: str, init: dict[str, Tensor], use_self_log: bool = False) -> dict[str, float]:
        """mAP of the global / local / aggregated initial scores against the split's true targets
        (evaluation only; Lightning forbids ``self.log`` in the fit-start and predict hooks)."""
        if "target" not in init:
            return {}
        res = {f"{prefix}/mAP_{m}": float(multilabel_report(init[m], init["target"], init.get("mask"))["mAP"])
               for m in INIT_MODES}
        if use_self_log:
            for k, v in res.items():
                self.log(k, v, rank_zero_only=True)
        elif self._trainer is not None and self.trainer.logger is not None and self.global_rank == 0:
            self.trainer.logger.log_metrics(res, step=self.global_step)
        self.init_metrics.update(res)
        return res

    def _write_split_artifact(self, name: str, split: str, scores: Tensor, index: Tensor, **prov: Any) -> Path | None:
        if self.artifact_path == "" or self._trainer is None:
            return None
        path = self.save_pseudolabels(f"pseudolabels-{split}-{name}.safetensors", split, scores, index,
                                      stage=name, **prov)
        if path is not None:  # rank 0: a W&B run keeps the train split's pseudolabels too (e.g. for DualCoOp)
            self.publish_artifact([path], f"pseudolabels-{split}-{name}", stage=name, split=split)
        return path

    # ---------------------------------------------------------------- stage 2: training
    def on_fit_start(self) -> None:
        self._require_multilabel()
        init = self._initialize_ranks("train")
        self.init_scores = init
        self._snippet_tables = {}
        if self.features == "snippets":
            self._snippet_table("train", init)
        n = int(init["index"].max()) + 1
        pseudo = torch.full((n, len(self.classnames)), 0.5)
        pseudo[init["index"]] = init["init"].float()
        self.pseudo = pseudo.clamp(LABEL_EPS, 1 - LABEL_EPS).to(self.device)
        # Unsupervised: every entry is unobserved, hence refined. (Observed entries would be fixed.)
        self.fixed = torch.zeros_like(self.pseudo, dtype=torch.bool)
        self._log_init("init", init)
        self._write_split_artifact("init", "train", init["init"], init["index"], init=self.init)

    def classify(self, batch: dict[str, Any]) -> Tensor:
        """Classifier logits ``[B, C]`` of a batch (image network, or head on CLIP features)."""
        if self.network is not None:
            if "image" not in batch:
                raise ValueError("a CDUL network classifier needs images: set the data module's embeddings: false")
            return self.network(batch["image"])
        with torch.no_grad():
            feats = self.image_features(batch)
            if self.features == "snippets":
                snippets = self._snippet_table(self._current_split())[batch["index"].to(self.device)]
                feats = torch.cat([feats[:, None], snippets.to(feats.dtype)], 1)  # [B, 1 + G, D]
        logits = self.head(feats)
        return logits.max(1).values if logits.ndim == 3 else logits

    def forward(self, images: Tensor) -> Tensor:
        """Class probabilities of a batch of preprocessed images (the classifier alone; with
        ``features: snippets`` the images are cut into snippets here, from the preprocessed image,
        which for a non-square photo is its centre square: ``snippet_fit: crop``'s tiling. ``vlweak
        test`` / ``predict`` read the split's snippets as training did, ``stretch`` included)."""
        if self.network is None and self.features == "snippets":
            from vlweak.methods.cdul_snippets import encode_snippets

            feats = torch.cat([self.backbone.encode_image(images)[:, None], encode_snippets(self.backbone, images, self.grid, self.overlap)], 1)
            return torch.sigmoid(self.head(feats).max(1).values)
        return torch.sigmoid(self.classify({"image": images}))

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor | None:
        if not batch:
            return self.empty_step()
        y = self.pseudo[batch["index"]]
        loss = soft_label_kl(y, self.classify(batch)).sum(1).mean()
        self.log("train/loss", loss, prog_bar=True, on_step=False, on_epoch=True, batch_size=len(y))
        return loss

    def on_train_batch_end(self, outputs: Any, batch: dict[str, Any], batch_idx: int) -> None:
        # Y-step with θ fixed (after this batch's θ-step).
        if not batch or not self._label_steps():
            return
        idx = batch["index"]
        # the classifier's prediction in eval mode: no dropout noise in the label targets, and a
        # network's batch-norm statistics move once per batch (the θ-step's forward), not twice
        classifier = self.network if self.network is not None else self.head
        training = classifier.training
        classifier.eval()
        try:
            with torch.no_grad():
                logits = self.classify(batch)
                new = align_labels(self.pseudo[idx], logits, self.label_sigma, self.label_scale, self.fixed[idx])
        finally:
            classifier.train(training)
        self.pseudo[idx] = new
        if self.trainer.world_size > 1:
            self._label_updates.append({"index": idx.detach(), "labels": new.detach()})

    def _label_steps(self) -> bool:
        """Whether this epoch takes Y-steps (label alignment) after its θ-steps."""
        return self.label_scale != 0 and self.current_epoch >= self.label_warmup_epochs

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()  # an epoch of unreadable images alone is an error
        if self.trainer.world_size > 1 and self._label_steps():
            # share every rank's Y-steps so all ranks hold the same labels; every rank joins, also
            # one whose batches were all skipped as unreadable
            parts, self._label_updates = self._label_updates, []
            local = {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}
            got = self._all_gather_ragged(local)
            if got:
                self.pseudo[got["index"].long()] = got["labels"].to(self.pseudo.dtype)
        if "target" in self.init_scores:
            idx = self.init_scores["index"]
            m = multilabel_report(self.pseudo[idx.to(self.device)].cpu(), self.init_scores["target"],
                                  self.init_scores.get("mask"))["mAP"]
            self.log_metrics({"train/pseudolabel_mAP": float(m)})  # of the gathered labels: no sync needed

    def on_train_start(self) -> None:
        self.fitted.fill_(True)

    def on_fit_end(self) -> None:
        if self.init_scores:
            idx = self.init_scores["index"]
            self._write_split_artifact(
                "refined", "train", self.pseudo[idx.to(self.device)].cpu(), idx, init=self.init
            )

    def configure_optimizers(self):
        params = [p for p in (self.network or self.head).parameters() if p.requires_grad]
        return torch.optim.AdamW(params, lr=self.lr, weight_decay=self.weight_decay)

    # ---------------------------------------------------------------- stage 3: inference
    def _start(self, split: str) -> None:
        self._require_multilabel()
        self._split_scores = None
        self._snippet_tables.pop(split, None)
        if self.inference == "init":
            init = self._initialize_ranks(split)
            stage = self.trainer.state.stage
            self._log_init(f"{stage.value if stage else split}_init", init, use_self_log=stage is not None and stage.value == "test")
            n = int(init["index"].max()) + 1
            table = torch.full((n, len(self.classnames)), float("nan"))
            table[init["index"]] = init["init"].float()
            self._split_scores = table
        elif self.network is None and not bool(self.fitted):
            raise RuntimeError(
                "CDUL's classifier is untrained: run `vlweak fit` first (or pass --ckpt_path), "
                "or set model.init_args.inference: init to score with the CLIP initialization"
            )

    def prepare_eval(self, stage: str) -> None:
        if stage == "val":  # validation scores the classifier being trained
            self._require_multilabel()
        else:
            self._start(self._current_split())

    def _scores(self, batch: dict[str, Any]) -> Tensor:
        if self._split_scores is not None:
            return self._split_scores[batch["index"].cpu()].to(self.device)
        return torch.sigmoid(self.classify(batch))

    def eval_step(self, batch: dict[str, Any], stage: str) -> dict[str, Tensor] | None:
        truth = self.targets_of(batch)
        if stage == "val" and not truth:
            return None
        with torch.no_grad():
            scores = torch.sigmoid(self.classify(batch)) if stage == "val" else self._scores(batch)
        return {"scores": scores, "index": batch["index"], **truth}

    def artifact_provenance(self) -> dict[str, Any]:
        return {"inference": self.inference, "init": self.init}
