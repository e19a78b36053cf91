"""What every vlweak method shares: a backbone, the class vocabulary, evaluation, pseudolabel
artifacts, and collecting per-sample outputs across ranks.

A method collects per-sample tensors during an epoch with :meth:`VLMethod.collect`; at the epoch's
end :meth:`VLMethod.gathered` returns them from *all* ranks, de-duplicated by sample index (the
distributed sampler repeats samples to even out ranks) and sorted, so evaluation and artifacts are
the same on one device and on many. Artifacts are written by rank 0 only.
"""

from __future__ import annotations

import csv
import os
import re
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch
from jsonargparse import lazy_instance
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from vlweak.backbones import Backbone, CheckpointMismatchError, OpenCLIPBackbone
from vlweak.data.cache import EmbeddingCache
from vlweak.data.datasets import VocabularyError, data_loader, load_classnames, vocabulary_difference
from vlweak.distributed import gather_ragged, rank_zero_first
from vlweak.labels.artifact import PseudoLabels
from vlweak.labels.selection import first_occurrences
from vlweak.metrics import multiclass_report, multilabel_report
from vlweak.progress import follow_trainer, show_progress
from vlweak.prompts.templates import resolve_templates
from vlweak.runs import log_wandb_artifact, run_folder

DEFAULT_BACKBONE = lazy_instance(OpenCLIPBackbone, model_name="vlweak-shapes", pretrained="vlweak-shapes")


def has_training_step(model: L.LightningModule) -> bool:
    """Whether a module has a training step (training-free methods only evaluate)."""
    return type(model).training_step is not L.LightningModule.training_step


def own_backbone(backbone: Any) -> Any:
    """The backbone a method keeps: a default given as a jsonargparse lazy instance (what the CLI
    shows and instantiates anew) is built here as a backbone of the method's own, so methods made
    in Python (a notebook's ``ZeroShot()``) neither share one module nor meet the lazy stand-in."""
    init = getattr(backbone, "lazy_get_init_args", None)
    if init is None:
        return backbone
    cls = next(c for c in type(backbone).__mro__[1:] if not hasattr(c, "lazy_get_init_args"))
    return cls(**init().as_dict())


def check_options(
    *, templates: Any = None, temperature: float | None = None, threshold: float | None = None,
    positive: dict[str, float] | None = None, **ranges: Any
) -> None:
    """Early checks of options several methods share, so a bad value fails at construction rather
    than after the data is encoded: ``templates`` resolve, ``temperature`` is positive,
    ``threshold`` lies in [0, 1], each of ``positive`` (name: value, e.g. a learning rate) is > 0,
    and each ``name=(value, low, high)`` lies in [low, high] (``None`` for an open end)."""
    for name, value in (positive or {}).items():
        if not value > 0:
            raise ValueError(f"{name} must be > 0, got {value}")
    if templates is not None:
        resolve_templates(templates)
    if temperature is not None and not temperature > 0:
        raise ValueError(f"temperature must be > 0 (or null for the backbone's logit_scale), got {temperature}")
    if threshold is not None:
        ranges["threshold"] = (threshold, 0.0, 1.0)
    for name, (value, low, high) in ranges.items():
        if (low is not None and not value >= low) or (high is not None and not value <= high):
            if low is None:
                bounds = f"<= {high}"
            elif high is None:
                bounds = f">= {low}"
            else:
                bounds = f"in [{low}, {high}]"
            raise ValueError(f"{name} must be {bounds}, got {value}")


def has_known_labels(targets: Tensor, mask: Tensor | None = None) -> bool:
    """Whether any label is known: a single-label target other than ``-1``, or an observed
    multi-label entry."""
    if targets.ndim == 1:
        return bool((targets >= 0).any())
    return bool(mask.any()) if mask is not None else targets.numel() > 0


def dedup_by_index(outputs: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keep the first occurrence of each ``index`` and sort by it."""
    keep = first_occurrences(outputs["index"])
    return {k: v[keep] for k, v in outputs.items()}


#: Metric names logged from gathered results (see :meth:`VLMethod.log_metrics`).
_GATHERED: set[str] = set()


class ResumedStepNumbers:
    """Mixin of a ``LightningModule``: a fit continued from a checkpoint logs its steps under the
    numbers an uninterrupted fit gives them. Lightning counts one more stepped batch on a restart,
    which is right for a checkpoint written as a batch ended, before its count went up, and one too
    many for one written at an epoch's end or by :class:`~vlweak.callbacks.CheckpointOnInterrupt`;
    with one optimizer, the loggers' step is the number of optimizer steps taken."""

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        super().on_load_checkpoint(checkpoint)
        self._resumed = True

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        if self.__dict__.pop("_resumed", False) and self.automatic_optimization and len(self.trainer.optimizers) == 1:
            self.trainer.fit_loop.epoch_loop._batches_that_stepped = self.trainer.global_step


class StopsOnUnreadableEpochs:
    """Mixin of a training ``LightningModule``: an epoch whose every batch came empty (each image
    skipped as unreadable, ``skip_bad``) trained nothing, and the fit stops there with an error
    rather than export or keep an untrained model."""

    def on_train_epoch_start(self) -> None:
        super().on_train_epoch_start()
        self._batches_seen = self._batches_fed = 0

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(batch, batch_idx)
        self._batches_seen = getattr(self, "_batches_seen", 0) + 1
        self._batches_fed = getattr(self, "_batches_fed", 0) + bool(batch)  # {}: every image of it skipped

    def on_train_epoch_end(self) -> None:
        super().on_train_epoch_end()
        seen, fed = getattr(self, "_batches_seen", 0), getattr(self, "_batches_fed", 0)
        if self.trainer.world_size > 1:  # every rank: one sum, one verdict
            both = self.trainer.strategy.reduce(torch.tensor([seen, fed], dtype=torch.float, device=self.device), reduce_op="sum")
            seen, fed = int(both[0]), int(both[1])
        if seen and not fed:
            raise ValueError(
                f"epoch {self.current_epoch}: every image of the train split was skipped as unreadable "
                f"({seen} batches; skip_bad names each above): nothing was trained; check the image paths"
            )


def _built_words(built: dict[str, str]) -> str:
    return f"{built.get('class', 'backbone')}({built.get('model', '')!r}, weights {built.get('weights', '')!r})"


class VLMethod(ResumedStepNumbers, StopsOnUnreadableEpochs, L.LightningModule):
    """Base of vlweak's methods.

    Args:
        backbone: the CLIP-family model (default: the shipped ``vlweak-shapes`` model).
        classnames: class vocabulary (a list, or a ``.txt`` / ``.json`` / ``.yaml`` file holding
            one); set by the CLI from the data module.
        multilabel: multi-label task; set by the CLI from the data module.
        artifact_path: where test/predict write the pseudolabel artifact; default
            ``<log dir>/pseudolabels-<stage>.safetensors``; a folder (an existing one, or a path ending in
            ``/``) holds ``pseudolabels-<stage>.safetensors``; ``""`` writes none.
    """

    #: whether the method builds per-class parts (prompt learners) as it is constructed, so needs the
    #: class vocabulary then; the others take the data module's under a trainer (``setup``)
    classnames_at_construction = False

    def __init__(
        self,
        backbone: Backbone = DEFAULT_BACKBONE,
        classnames: list[str] | str | None = None,
        multilabel: bool = False,
        artifact_path: str | None = None,
    ) -> None:
        super().__init__()
        self.backbone = own_backbone(backbone)
        names = load_classnames(classnames)
        self.classnames = list(names.values() if isinstance(names, dict) else names) if names else []
        self.multilabel = multilabel
        self.artifact_path = artifact_path
        self._collected: list[dict[str, Tensor]] = []
        self.last_artifact: Path | None = None
        self.last_metrics: dict[str, float] = {}
        #: the last evaluated / pseudolabelled epoch's gathered outputs (``stage``, ``scores``,
        #: ``target``, ``mask``, ``index`` as available), for callbacks such as the figures.
        self.last_outputs: dict[str, Any] = {}

    # ---------------------------------------------------------------- checkpoints
    def _backbone_rebuilt_by_the_recipe(self) -> bool:
        """Whether the backbone is frozen and its weights come from a file or a tag: the recipe builds
        it again, so a checkpoint need not carry it (hundreds of MB every epoch, beside a prompt of
        a few thousand numbers). Random or trained weights stay in the checkpoint."""
        bb = self.backbone
        if bb is None or not getattr(bb, "freeze", False) or any(p.requires_grad for p in bb.parameters()):
            return False
        return bb.fingerprint_parts().get("weights") not in (None, "random-init")

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A frozen backbone of a weights file or tag is left out of the checkpoint; what identifies
        those weights is kept instead, and checked when it is read back."""
        if self._backbone_rebuilt_by_the_recipe():
            state = checkpoint["state_dict"]
            for key in [k for k in state if k.startswith("backbone.")]:
                del state[key]
            checkpoint["vlweak_backbone"] = dict(self.backbone.fingerprint_parts())
            checkpoint["vlweak_backbone_built"] = self._backbone_built()

    def _backbone_built(self) -> dict[str, str]:
        """How the backbone was built, in the constructor's words: its class, architecture and weights."""
        b = self.backbone
        return {"class": type(b).__name__, "model": str(getattr(b, "model_name", getattr(b, "model_id", ""))),
                "weights": str(getattr(b, "weights", ""))}

    def _trained_per_class(self) -> bool:
        """Whether this method holds per-class parameters already (built or trained for its classes)."""
        return self.trains_per_class() and any(p.requires_grad for p in self.parameters())

    def trains_per_class(self) -> bool:
        """Whether what a fit trains holds one entry per class (class-specific prompts, a classifier
        head): a checkpoint of it serves its own class vocabulary, in its own order, and no other."""
        return False

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """A checkpoint without its frozen backbone takes this run's (built from the recipe's weights);
        weights other than those it was trained with are named. A checkpoint whose per-class
        parameters are for another class vocabulary (or order), or whose tensors do not fit this
        model, is refused naming what differs."""
        self._check_checkpoint_vocabulary(checkpoint)
        saved, why = checkpoint.get("vlweak_backbone"), ""
        if saved is not None:
            ours = dict(self.backbone.fingerprint_parts())
            if ours != saved:
                built, here = checkpoint.get("vlweak_backbone_built"), self._backbone_built()
                theirs_said = _built_words(built) if built else str(saved)
                why = f" (it was trained with the backbone {theirs_said}; this run's is {_built_words(here)})"
                rank_zero_warn(
                    f"this checkpoint was trained with the backbone {theirs_said}; this run's is {_built_words(here)}: "
                    "its prompts or heads meet other weights. Build the fit's backbone: on the command line its "
                    "class_path and init_args, as in the fit's config.yaml; in Python "
                    f"{type(self).__name__}.load_from_checkpoint(path, backbone=...)"
                )
            state = checkpoint["state_dict"]
            for key, value in self.backbone.state_dict().items():
                state.setdefault(f"backbone.{key}", value)
        self._check_checkpoint_shapes(checkpoint, why)
        super().on_load_checkpoint(checkpoint)

    def _check_checkpoint_vocabulary(self, checkpoint: dict[str, Any]) -> None:
        theirs = (checkpoint.get("hyper_parameters") or {}).get("classnames")
        ours = self.classnames
        if not theirs or not ours or list(theirs) == list(ours) or not self.trains_per_class():
            return
        name = type(self).__name__
        if sorted(theirs) == sorted(ours):
            raise CheckpointMismatchError(
                f"this {name} checkpoint's per-class parameters are for its classes in the order {list(theirs)[:8]}"
                f"{' ...' if len(theirs) > 8 else ''}; this run's data lists them as {list(ours)[:8]}"
                f"{' ...' if len(ours) > 8 else ''}: give the data's classnames in the checkpoint's order"
            )
        missing = [c for c in ours if c not in theirs]
        raise CheckpointMismatchError(
            f"this {name} checkpoint was trained for {len(theirs)} classes ({list(theirs)[:6]}"
            f"{' ...' if len(theirs) > 6 else ''}); this run has {len(ours)}"
            f"{f', {len(missing)} of them not among its classes ({missing[:6]})' if missing else ''}: its per-class "
            "parameters serve its own classes only (shared prompts, class_specific: false, transfer to new ones)"
        )

    def _check_checkpoint_shapes(self, checkpoint: dict[str, Any], why: str = "") -> None:
        ours = self.state_dict()
        given = checkpoint.get("state_dict", {})
        only_there = [k for k in given if k not in ours]
        only_here = [k for k in ours if k not in given]
        if (only_there or only_here) and getattr(self, "strict_loading", True):
            said = "; ".join(part for part in (
                f"{', '.join(only_there[:3])}{' ...' if len(only_there) > 3 else ''} in the checkpoint only" if only_there else "",
                f"{', '.join(only_here[:3])}{' ...' if len(only_here) > 3 else ''} in this model only" if only_here else "",
            ) if part)
            raise CheckpointMismatchError(
                f"the checkpoint's parameters are not this {type(self).__name__}'s ({said}){why}: it was trained with "
                "other settings (another prompt type or method); evaluate it with the --config files of its fit, "
                "or give the checkpoint file by path (the model is then built with the checkpoint's settings)"
            )
        bad = [(k, tuple(v.shape), tuple(ours[k].shape)) for k, v in checkpoint.get("state_dict", {}).items()
               if k in ours and hasattr(v, "shape") and tuple(v.shape) != tuple(ours[k].shape)]
        if bad:
            listed = "; ".join(f"{k} {a} there, {b} here" for k, a, b in bad[:3])
            raise CheckpointMismatchError(
                f"the checkpoint's tensors do not fit this {type(self).__name__}: {listed}"
                f"{f' (and {len(bad) - 3} more)' if len(bad) > 3 else ''}{why}"
            )

    # ---------------------------------------------------------------- the trainer's data
    def setup(self, stage: str) -> None:
        """Take the class vocabulary (and whether it is multi-label) from the trainer's data module
        when none was given, as the CLI links them: ``trainer.test(ZeroShot(), datamodule=dm)``
        works in a notebook. A method built for the other kind of labels than the data's is named."""
        if self._trainer is not None:
            follow_trainer(self.trainer)  # vlweak's own progress bars (encoding, kNN) as the trainer's
        if self._trainer is not None and self.trainer.world_size > 1:
            # evaluation gathers every rank's rows and keeps one per sample index, so the distributed
            # sampler's padding is not scored twice, whatever Lightning's generic advice says
            warnings.filterwarnings("ignore", message=r"Using `DistributedSampler` with the dataloaders\. During `trainer\.(test|validate|predict)\(\)`")
        dm = self.datamodule
        if dm is None or not getattr(dm, "classnames", None):
            return
        theirs = list(dm.classnames)
        if not self.classnames or (self.__dict__.get("_linked_classnames") and theirs != self.classnames
                                   and not self._trained_per_class()):
            # none given, or taken from an earlier data module (a notebook testing one method on another data set)
            self.classnames, self._linked_classnames = theirs, True
            self.multilabel = bool(getattr(dm, "multilabel", self.multilabel))
        elif theirs != self.classnames:
            raise VocabularyError(
                f"{type(self).__name__} was built for {len(self.classnames)} classes and the data module has "
                f"{len(theirs)} ({vocabulary_difference(self.classnames, theirs)}): its scores would be paired "
                "with the wrong classes; build it with the data module's (classnames=dm.classnames; the CLI "
                "links them)"
            )
        elif bool(getattr(dm, "multilabel", self.multilabel)) != self.multilabel:
            kind = "multi-label" if dm.multilabel else "single-label"
            raise ValueError(
                f"the data module's labels are {kind} but {type(self).__name__} was built with "
                f"multilabel={self.multilabel}: build it with multilabel={bool(dm.multilabel)} (the CLI links it "
                "from the data module)"
            )

    def teardown(self, stage: str) -> None:
        show_progress(True)  # the trainer's choice of progress bars held for its run only

    @property
    def datamodule(self) -> Any:
        """The data module of the trainer this method runs under (``None`` outside a trainer, or
        when the trainer was given loaders instead of a data module)."""
        return getattr(self.trainer, "datamodule", None) if self._trainer is not None else None

    @property
    def trainer_strategy(self) -> Any:
        """The trainer's strategy (``None`` outside a trainer: one process)."""
        return self.trainer.strategy if self._trainer is not None else None

    @property
    def evaluates_what_a_fit_trains(self) -> bool:
        """Whether ``test`` / ``predict`` score with what ``fit`` trains (the CLI warns when such a run
        has no ``--ckpt_path``): every method with a training step, unless a subclass says otherwise."""
        return has_training_step(self)

    @property
    def train_augment(self) -> str | None:
        """The data module's training augmentation (``None``: none, or no data module)."""
        return getattr(self.datamodule, "augment", None)

    def scan_loader(self, dataset: Any) -> Any:
        """A loader over ``dataset`` in order, with the data module's batch size and workers: what a
        method's own pass over a split (pool scans, scoring) reads."""
        dm = self.datamodule
        return data_loader(dataset, getattr(dm, "num_workers", 0), batch_size=getattr(dm, "batch_size", 64))

    # ---------------------------------------------------------------- vocabulary
    def require_classnames(self) -> list[str]:
        """The class vocabulary, or an error saying how to give one: a method building per-class
        parts as it is constructed (prompt learners) asks for it then, before any data module."""
        if not self.classnames:
            name = type(self).__name__
            if self._trainer is not None and self.datamodule is not None:
                raise ValueError(f"{name} has no class names and the data module has none either: give them to the "
                                 "data module (classnames) or to the method")
            given = f"{name}(classnames=dm.classnames, ...) in Python; the CLI links the data module's"
            raise ValueError(
                f"{name} has no class names: it builds its prompts for them as it is constructed ({given})"
                if self.classnames_at_construction else
                f"{name} has no class names: give them ({given}), or run it under a trainer with a data module"
            )
        if len(self.classnames) == 1 and not self.multilabel:
            raise ValueError(
                f"{type(self).__name__} has one class ({self.classnames[0]!r}): single-label classification "
                "needs at least two to choose between (an image folder needs a folder per class)"
            )
        return self.classnames

    # ---------------------------------------------------------------- features
    def image_features(self, batch: dict[str, Any]) -> Tensor:
        """Unit-norm image features of a batch: the cached ``features`` if the data module serves
        embeddings, else the backbone applied to ``image``."""
        if "features" in batch:
            return torch.nn.functional.normalize(batch["features"].float(), dim=-1)
        return self.backbone.encode_image(batch["image"])

    # ---------------------------------------------------------------- collecting across ranks
    def collect(self, **tensors: Tensor) -> None:
        """Keep per-sample tensors (one row per sample; must include ``index``) for the epoch end."""
        self._collected.append({k: v.detach() for k, v in tensors.items()})

    def gathered(self) -> dict[str, Tensor]:
        """Everything collected this epoch on every rank, de-duplicated and sorted by index (CPU)."""
        parts, self._collected = self._collected, []
        keys = parts[0].keys() if parts else ()
        local = {k: torch.cat([p[k] for p in parts]) for k in keys}
        world = self.trainer.world_size if self._trainer is not None else 1
        if world > 1:
            local = self._all_gather_ragged(local)
        if not local:
            return {}
        return {k: v.cpu() for k, v in dedup_by_index(local).items()}

    def _all_gather_ragged(self, local: dict[str, Tensor]) -> dict[str, Tensor]:
        """:func:`vlweak.distributed.gather_ragged` over this module's ranks (a rank may hold no rows)."""
        return gather_ragged(self.trainer.strategy, local, self.device)

    def empty_step(self) -> Tensor | None:
        """What ``training_step`` returns for a batch whose images were all skipped as unreadable.

        One process: ``None`` (Lightning skips the step). Several: the other ranks hold real
        batches and wait in DDP's gradient all-reduce, which this rank must join, so it returns a
        zero loss that reaches every trainable parameter (its gradients are zero)."""
        if self._trainer is None or self.trainer.world_size == 1:
            return None
        params = [p for p in self.parameters() if p.requires_grad]
        return sum((p.sum() * 0.0 for p in params), torch.zeros((), device=self.device)) if params else None

    # ---------------------------------------------------------------- evaluation and artifacts
    def evaluate(
        self, stage: str, scores: Tensor, targets: Tensor, mask: Tensor | None = None, rank_scores: Tensor | None = None
    ) -> dict[str, float]:
        """Log accuracy metrics (single-label) or mAP/F1 (multi-label); per-class values go to a CSV.
        Multi-label: ``rank_scores`` (default ``scores``) are what the per-class APs rank by."""
        names = self.require_classnames()
        if self.multilabel:
            report = multilabel_report(scores, targets, mask, getattr(self, "threshold", 0.5), rank_scores=rank_scores)
        else:
            report = multiclass_report(scores, targets)
        per_class = report.pop("per_class")
        self.last_outputs = {"stage": stage, "scores": scores, "target": targets, "per_class": per_class}
        if mask is not None:
            self.last_outputs["mask"] = mask
        self.last_metrics = {f"{stage}/{k}": float(v) for k, v in report.items()}
        run_dir = self.run_dir()  # a collective under DDP: every rank calls it
        self.log_metrics(self.last_metrics)
        if not (self._trainer is not None and self.trainer.sanity_checking):  # a few batches: no per-class file
            self._write_per_class(run_dir, stage, names, per_class)
        return self.last_metrics

    def log_metrics(self, metrics: dict[str, float]) -> None:
        """Log already-gathered metrics from rank 0, in any loop (predict hooks cannot ``self.log``:
        there they go to the loggers directly)."""
        if self._trainer is not None and self.trainer.predicting:
            if self.global_rank == 0:
                for logger in self.loggers:
                    logger.log_metrics(metrics)
                    logger.save()
        else:
            for k, v in metrics.items():
                if self.trainer.world_size > 1 and k not in _GATHERED:
                    # computed from every rank's samples already: Lightning's advice to sync a
                    # per-rank value across ranks does not apply (it would warn once per metric)
                    _GATHERED.add(k)
                    warnings.filterwarnings("ignore", message=rf"It is recommended to use `self\.log\({re.escape(repr(k))}")
                self.log(k, v, sync_dist=False, rank_zero_only=True)

    def embedding_cache(self) -> EmbeddingCache:
        """The data module's embedding cache (its ``cache_dir``), else the default one (``$VLWEAK_CACHE``)."""
        return getattr(self.datamodule, "cache", None) or EmbeddingCache()

    def rank_zero_first(self, work: Any, *, share: bool = False) -> Any:
        """:func:`vlweak.distributed.rank_zero_first` over this module's ranks (``work`` just runs
        without a trainer). A collective under DDP: call it on every rank."""
        return rank_zero_first(self.trainer_strategy, work, share=share)

    def run_dir(self) -> Path:
        """The run's log folder. Under DDP this broadcasts: call it on every rank."""
        if self._trainer is None:
            return Path(".")
        return run_folder(self.trainer)

    def _write_per_class(self, log_dir: Path, stage: str, names: list[str], values: Tensor) -> None:
        if self.global_rank != 0:
            return
        log_dir.mkdir(parents=True, exist_ok=True)
        metric = "ap" if self.multilabel else "accuracy"
        with open(log_dir / f"per_class_{stage}.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["class", metric])
            for n, v in zip(names, values.tolist()):
                w.writerow([n, f"{v:.6f}"])

    def provenance(self, run_dir: Path | None = None) -> dict[str, Any]:
        b = self.backbone
        info: dict[str, Any] = {
            "method": type(self).__name__,
            "backbone": type(b).__name__,
            "model": getattr(b, "model_name", getattr(b, "model_id", "")),
            "weights": getattr(b, "weights", ""),
            "backbone_fingerprint": b.fingerprint(),
            "hparams": {k: v for k, v in self.hparams.items() if k not in ("backbone", "classnames")},
        }
        if run_dir is not None:
            config = run_dir / "config.yaml"
            info["recipe"] = str(config.absolute()) if config.is_file() else ""
        return info

    def sample_ids(self, split: str, indices: Tensor) -> list[str]:
        dm = self.datamodule
        ids = dm.sample_ids(split) if dm is not None and hasattr(dm, "sample_ids") else None
        if not ids:
            return [str(int(i)) for i in indices]
        return [ids[int(i)] for i in indices]

    def split_of(self, stage: str) -> str:
        """The data split a loop reads: ``val`` for validation, the data module's ``predict_split``
        under ``predict`` (``test`` without one), else the stage's own name."""
        if stage == "predict":
            return getattr(self.datamodule, "predict_split", "test")
        return {"validate": "val"}.get(stage, stage)

    def save_pseudolabels(
        self, file_name: str | Path, split: str, scores: Tensor, indices: Tensor, /, **provenance: Any
    ) -> Path | None:
        """Save ``scores`` of the samples ``indices`` of ``split`` as a pseudolabel artifact from rank 0
        (returns its path there; a relative ``file_name`` lies in the run folder). Call it on every
        rank (finding the run folder is a collective under DDP)."""
        run_dir = self.run_dir()
        if self.global_rank != 0:
            return None
        labels = PseudoLabels.from_scores(
            scores,
            self.require_classnames(),
            self.sample_ids(split, indices),
            indices,
            multilabel=self.multilabel,
            threshold=getattr(self, "threshold", 0.5),
            provenance={**self.provenance(run_dir), "split": split, **provenance},
        )
        path = labels.save(run_dir / file_name)
        fitting = self._trainer is not None and self.trainer.state.fn == "fit"
        if not (fitting and (self.trainer.validating or self.trainer.sanity_checking)):  # not once per epoch
            rank_zero_info(f"pseudolabels of the {split} split ({len(indices):,} samples x {scores.shape[1]} classes) -> {path}")
        return path

    def write_artifact(self, stage: str, scores: Tensor, indices: Tensor, **extra_provenance: Any) -> Path | None:
        """Write the pseudolabel artifact of ``stage`` (``artifact_path``, or
        ``pseudolabels-<stage>.safetensors`` in the run folder) from rank 0 (returns its path there).
        Call it on every rank (finding the run folder is a collective under DDP)."""
        if self.last_outputs.get("stage") != stage or len(self.last_outputs.get("scores", ())) != len(scores):
            self.last_outputs = {"stage": stage, "scores": scores}
        self.last_outputs["index"] = indices
        if self.artifact_path == "":
            return None
        # artifact_path is relative to the working directory, the default name to the run folder
        name = Path(self.artifact_path).absolute() if self.artifact_path else f"pseudolabels-{stage}.safetensors"
        if self.artifact_path and (self.artifact_path.endswith(("/", os.sep)) or Path(name).is_dir()):
            name = Path(name) / f"pseudolabels-{stage}.safetensors"  # a folder: the artifact goes in it
        path = self.save_pseudolabels(name, self.split_of(stage), scores, indices, stage=stage, **extra_provenance)
        if path is not None:
            self.last_artifact = self.last_outputs["artifact"] = path
        return path

    # ---------------------------------------------------------------- the evaluation loops
    # validate / test / predict have one shape in every method: prepare once per epoch
    # (``prepare_eval``), score each batch (``eval_step``, its rows collected), then, on the
    # outputs of all ranks, evaluate and write the artifact (``finish``). Methods override the three.
    def prepare_eval(self, stage: str) -> None:
        """Called at the start of a ``val`` / ``test`` / ``predict`` epoch (e.g. build the text classifier)."""

    def eval_step(self, batch: dict[str, Any], stage: str) -> dict[str, Tensor] | None:
        """Per-sample outputs of one non-empty batch (``scores``, ``index`` and, when the batch has
        ground truth, ``target`` / ``mask``), or ``None`` to collect nothing."""
        raise NotImplementedError(f"{type(self).__name__} does not evaluate batches")

    def finish(self, stage: str, out: dict[str, Tensor]) -> None:
        """At the epoch's end, on every rank, with the outputs of all ranks: evaluate when there is
        ground truth, and write the pseudolabel artifact of ``test`` / ``predict``."""
        if "target" in out:
            self.evaluate(stage, out["scores"], out["target"], out.get("mask"))
        if stage != "val":
            self.write_artifact(stage, out["scores"], out["index"], **self.artifact_provenance())

    def artifact_provenance(self) -> dict[str, Any]:
        """Method-specific provenance written into the artifact beside :meth:`provenance`."""
        return {}

    @staticmethod
    def targets_of(batch: dict[str, Any]) -> dict[str, Tensor]:
        """The batch's ground truth as collected outputs: ``target`` (single-label ``label``, or the
        multi-label ``target`` with its ``mask``), or nothing when the batch is unlabeled."""
        if "label" in batch:
            return {"target": batch["label"]}
        if "target" in batch:
            return {"target": batch["target"], "mask": batch["mask"]}
        return {}

    def _eval_batch(self, batch: dict[str, Any], stage: str) -> None:
        out = self.eval_step(batch, stage) if batch else None
        if out is not None:
            self.collect(**out)

    def _end_eval(self, stage: str) -> None:
        out = self.gathered()  # a collective under DDP: every rank calls it
        if out and "target" in out and not has_known_labels(out["target"], out.get("mask")):
            # an unlabeled split (a manifest without labels, a pool under a label budget) is
            # pseudolabelled all the same; there is just nothing to score
            rank_zero_info(f"the {self.split_of(stage)} split has no known labels: no metrics for {stage}")
            out = {k: v for k, v in out.items() if k not in ("target", "mask")}
        if out:
            self.finish(stage, out)
            if stage != "val":
                self.artifact_to_wandb(stage)
        elif stage != "val":  # (a fit's validation may be cut to nothing on purpose)
            raise ValueError(
                f"the {self.split_of(stage)} split gave no image to {stage}: every one was skipped as "
                "unreadable (skip_bad), or the split is empty; nothing to score or pseudolabel"
            )

    def artifact_to_wandb(self, stage: str) -> None:
        """With a W&B logger, the artifact ``stage`` wrote (and the ones written beside it, e.g. CHiLS's
        sub-class artifact) becomes a W&B artifact of type ``pseudolabels``, with the stage's metrics."""
        out = self.last_outputs
        if self._trainer is None or self.global_rank != 0 or out.get("stage") != stage or not out.get("artifact"):
            return
        self.publish_artifact([out["artifact"], *out.get("companions", [])], f"pseudolabels-{stage}",
                              stage=stage, **self.last_metrics)

    def publish_artifact(self, files: list, name: str, **metadata: Any) -> None:
        """With a W&B logger, ``files`` (pseudolabel artifacts this rank 0 wrote) as one W&B artifact
        ``<name>-<run id>``, its metadata the method, the class count and ``metadata``."""
        log_wandb_artifact(self.trainer, files, name,
                           {"method": type(self).__name__, "classes": len(self.classnames), **metadata})

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_batch(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_batch(batch, "test")

    def predict_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._eval_batch(batch, "predict")

    def _start_eval(self, stage: str) -> None:
        self.last_metrics = {}  # this evaluation's, or none when its split has no labels
        self.prepare_eval(stage)

    def on_validation_epoch_start(self) -> None:
        self._start_eval("val")

    def on_test_epoch_start(self) -> None:
        self._start_eval("test")

    def on_predict_epoch_start(self) -> None:
        self._start_eval("predict")

    def on_validation_epoch_end(self) -> None:
        self._end_eval("val")

    def on_test_epoch_end(self) -> None:
        self._end_eval("test")

    def on_predict_epoch_end(self) -> None:
        self._end_eval("predict")

    def configure_optimizers(self):  # training-free methods have nothing to optimize
        return None
