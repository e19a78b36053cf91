"""One ``LightningDataModule`` family for every method.

A data module owns the class vocabulary (``classnames``, linked into the model by the CLI), the
splits (``train`` / ``val`` / ``test`` / ``predict``), the label budget of the train split (k shots
per class, a fraction of labels, one positive per image, partial multi-label masks) and, with
``embeddings: true``, serves cached backbone embeddings instead of images so training-free methods
encode each image once across runs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, Dataset

from vlweak.data.budget import Budgeted, LabelBudget
from vlweak.data.augment import Augment, check_augment, train_transform
from vlweak.data.cache import EmbeddingCache, image_embeddings
from vlweak.data.datasets import (
    ImageFolderReader,
    ManifestReader,
    ShapesWorldDataset,
    Transformed,
    VocabularyError,
    data_loader,
    image_files,
    list_class_folders,
    _nfc,
    load_classnames,
    validate_classnames,
)
from vlweak.data.order import EpochShuffle, ResumableLoader, check_resumable, trained_position
from vlweak.data.world import ShapesWorld, Task, classnames_for
from vlweak.distributed import fill_once_per_node
from vlweak.progress import follow_trainer, show_progress

SPLITS = ("train", "val", "test", "predict")
#: the data splits a data module may have (``predict`` reads one of them, ``predict_split``)
DATA_SPLITS = ("train", "val", "test")


class FeatureDataset(Dataset):
    """Items ``{"features", "index", label/target/mask}`` from precomputed embeddings."""

    def __init__(self, features: torch.Tensor, index: torch.Tensor, source: Any) -> None:
        self.features, self.index, self.source = features, index, source
        self.multilabel = getattr(source, "multilabel", False)
        targets = source.targets() if hasattr(source, "targets") else None
        self.targets_ = targets[index] if targets is not None else None
        self.masks_ = source.masks()[index] if hasattr(source, "masks") else None

    def __len__(self) -> int:
        return len(self.index)

    def __getitem__(self, i: int) -> dict[str, Any]:
        item: dict[str, Any] = {"features": self.features[i], "index": int(self.index[i])}
        if self.targets_ is not None:
            if self.multilabel:
                item["target"] = self.targets_[i]
                item["mask"] = (
                    self.masks_[i] if self.masks_ is not None else torch.ones_like(self.targets_[i], dtype=torch.bool)
                )
            else:
                item["label"] = int(self.targets_[i])
        return item

    def __getattr__(self, name: str) -> Any:
        if name in ("source", "features", "index", "targets_", "masks_", "multilabel"):
            raise AttributeError(name)
        return getattr(self.source, name)


class VLDataModule(L.LightningDataModule):
    """Shared machinery of vlweak's data modules (subclasses say where the data comes from).

    Args:
        batch_size: images per batch.
        num_workers: data-loader worker processes, or ``auto``: the CPU cores this process may use
            less one (at most 16), shared among the node's processes under DDP (resolved at setup).
        shots: label budget for the train split: keep ``shots`` labels per class, the rest unlabeled
            (label ``-1``); a class with fewer train images keeps them all (with a warning naming
            it). Single-label data only.
        label_fraction: keep this fraction of the train labels (single-label: of the images;
            multi-label: of the image-class entries, the rest masked out as unknown).
        single_positive: multi-label train split with exactly one observed positive per image (all
            other entries unknown); an error on single-label data.
        budget_seed: seed of the label budget draw (the drawn mask is saved with the run's artifacts).
        seen_classes: transductive zero-shot learning: only the train images of these classes keep
            their labels (all of them, or ``shots`` per class), the other classes' images are the
            unlabeled pool. A list of class names, or a fraction of the classes drawn with
            ``budget_seed`` (Menghini et al. 2023 use 0.62); an empty list is an error. Single-label
            data only.
        skip_bad: skip unreadable images with a warning instead of failing on the first one.
        embeddings: serve cached backbone embeddings (``features``) instead of images.
        cache_dir: embedding cache folder (default ``$VLWEAK_CACHE`` or ``~/.cache/vlweak``).
        predict_split: which split ``vlweak predict`` pseudolabels.
        transform: override the backbone's preprocessing (default: the model's ``backbone.transform``).
        augment: training augmentation of the train split: ``flip``, ``crop_flip`` (single-label, as
            CoOp) or ``multilabel`` (square resize, flip, RandAugment, cutout, as DualCoOp); see
            :mod:`vlweak.data.augment`; ``none`` or ``null``: no augmentation. Scans that score or
            pseudolabel the train split, and every other split, keep the evaluation transform.
            Needs images (``embeddings: false``).
    """

    def __init__(
        self,
        batch_size: int = 64,
        num_workers: int | Literal["auto"] = 0,
        shots: int | None = None,
        label_fraction: float | None = None,
        single_positive: bool = False,
        budget_seed: int = 0,
        seen_classes: list[str] | float | None = None,
        skip_bad: bool = False,
        embeddings: bool = False,
        cache_dir: str | None = None,
        predict_split: str = "test",
        transform: Any = None,
        augment: Augment | None = None,
    ) -> None:
        super().__init__()
        augment = check_augment(augment)
        if augment is not None and embeddings:
            raise ValueError(
                f"augment: {augment} needs images, but embeddings: true serves cached features of unaugmented "
                "images (set embeddings: false, or leave augment unset)"
            )
        if predict_split not in ("train", "val", "test"):
            raise ValueError(f"predict_split must be train, val or test, got {predict_split!r}")
        if not (isinstance(batch_size, int) and batch_size >= 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if num_workers != "auto" and not (isinstance(num_workers, int) and num_workers >= 0):
            raise ValueError(f"num_workers must be a non-negative integer or 'auto', got {num_workers!r}")
        self.workers_option = num_workers
        self.batch_size, self.num_workers = batch_size, 0 if num_workers == "auto" else num_workers
        self.budget = LabelBudget(shots=shots, fraction=label_fraction, single_positive=single_positive, seed=budget_seed)
        if isinstance(seen_classes, (int, float)) and not 0.0 < float(seen_classes) < 1.0:
            raise ValueError(f"seen_classes as a fraction must lie in (0, 1), got {seen_classes}")
        if seen_classes is not None and not isinstance(seen_classes, (int, float)) and len(seen_classes) == 0:
            raise ValueError(
                "seen_classes is empty: no class would keep its labels (leave it unset for no seen/unseen "
                "split, or give class names or a fraction in (0, 1))"
            )
        self.seen_classes = seen_classes
        self.skip_bad = skip_bad
        self.embeddings = embeddings
        self.cache = EmbeddingCache(cache_dir)
        self.predict_split = predict_split
        self.transform, self.augment = transform, augment
        self.datasets: dict[str, Dataset] = {}
        self._raw: dict[str, Dataset] = {}
        #: ``() -> (seed, epoch)`` set by a method that draws each pass's order itself (pseudolabel
        #: rounds); ``None``: the run's seed and Lightning's epoch
        self.train_order: Callable[[], tuple[int, int]] | None = None
        self._resume_at: tuple[int, int] | None = None
        self._resume_epochs: dict[str, int] | None = None  # what the checkpoint's epochs were made of

    # ---------------------------------------------------------------- for subclasses
    @property
    def classnames(self) -> list[str]:
        raise NotImplementedError

    @property
    def multilabel(self) -> bool:
        return False

    def build_split(self, split: str) -> Dataset | None:
        """The raw dataset of a split (images before the transform), or ``None`` if absent."""
        raise NotImplementedError

    def missing_split_error(self, split: str) -> Exception:
        """The error for a split that a stage needs but this data module does not have (subclasses
        name what is missing: a folder, a manifest)."""
        if split == "predict":
            return RuntimeError(f"{type(self).__name__} has no {self.predict_split!r} split (predict_split)")
        return RuntimeError(f"{type(self).__name__} has no {split!r} split")

    def check_options(self) -> None:
        """Label-budget options that do not fit the data (single- vs multi-label) or the class
        vocabulary are errors before anything is read (subclasses call it once they know both)."""
        multilabel = self.multilabel
        if self.budget.single_positive and not multilabel:
            raise ValueError(
                f"single_positive: true (one observed positive per image) needs multi-label data; "
                f"{type(self).__name__} here is single-label (use shots or label_fraction)"
            )
        if self.budget.shots is not None and multilabel:
            raise ValueError("shots is a single-label budget; use label_fraction or single_positive for multi-label data")
        if self.seen_classes is not None:
            if multilabel:
                raise ValueError("seen_classes (transductive zero-shot) needs single-label data")
            _ = self.seen_class_indices  # unknown names or a fraction leaving no class seen fail here

    @property
    def seen_class_indices(self) -> list[int] | None:
        """Transductive zero-shot learning: sorted indices of the seen classes (``None``: no split)."""
        if self.seen_classes is None:
            return None
        names = self.classnames
        if isinstance(self.seen_classes, (int, float)):
            n = int(len(names) * float(self.seen_classes))
            if not 0 < n < len(names):
                raise ValueError(f"seen_classes={self.seen_classes} leaves {n} of {len(names)} classes seen")
            g = torch.Generator().manual_seed(self.budget.seed)
            return sorted(torch.randperm(len(names), generator=g)[:n].tolist())
        unknown = [c for c in self.seen_classes if c not in names]
        if unknown:
            raise VocabularyError(f"seen_classes {unknown[:5]} are not in the class vocabulary (e.g. {names[:5]})")
        idx = sorted({names.index(c) for c in self.seen_classes})
        if len(idx) == len(names):
            raise ValueError("seen_classes lists every class: no class is left unseen")
        return idx

    # ---------------------------------------------------------------- set-up
    def raw(self, split: str) -> Dataset | None:
        """The raw dataset of ``split`` (built once; the train split carries the label budget)."""
        split = self.predict_split if split == "predict" else split
        if split not in DATA_SPLITS:
            raise ValueError(
                f"{type(self).__name__} has no {split!r} split (splits: {', '.join(DATA_SPLITS)}; "
                "'predict' reads predict_split)"
            )
        if split not in self._raw:
            ds = self.build_split(split)
            budget = self.budget
            seen = self.seen_class_indices if split == "train" else None
            if seen is not None:
                if self.multilabel:
                    raise ValueError("seen_classes (transductive zero-shot) needs single-label data")
                budget = replace(budget, seen=tuple(seen))
            if ds is not None and split == "train" and budget.active:
                ds = Budgeted(ds, budget)
            self._raw[split] = ds
        return self._raw[split]

    def _model_backbone(self) -> Any:
        trainer = getattr(self, "trainer", None)
        module = trainer.lightning_module if trainer is not None else None
        return getattr(module, "backbone", None)

    def resolve_transform(self) -> Any:
        if self.transform is not None:
            return self.transform
        backbone = self._model_backbone()
        if backbone is None:
            raise RuntimeError(
                f"{type(self).__name__} has no transform and no method's backbone to take one from (it takes the "
                "backbone's preprocessing under a trainer): outside one, give it, e.g. "
                f"{type(self).__name__}(..., transform=backbone.transform)"
            )
        return backbone.transform

    def resolve_train_transform(self) -> Any:
        """The train split's transform: the ``augment`` preset at the backbone's image size and
        normalization (the evaluation transform when ``augment`` is unset)."""
        if self.augment is None:
            return self.resolve_transform()
        backbone = self._model_backbone()
        if backbone is None:
            raise RuntimeError(f"augment: {self.augment} takes the image size from the model backbone, and there is none")
        return train_transform(self.augment, backbone.image_size, backbone.image_mean, backbone.image_std)

    def eval_dataset(self, split: str) -> Dataset:
        """``split`` as set up, but with the evaluation transform (what pseudolabel scans of an
        augmented train split read); the set-up dataset itself when nothing is augmented."""
        ds = self.datasets[split]
        if split != "train" or self.augment is None:
            return ds
        return Transformed(self.raw(split), self.resolve_transform())

    def setup(self, stage: str | None = None) -> None:
        follow_trainer(getattr(self, "trainer", None))  # progress bars of the encoding as the trainer's
        needed = {
            "fit": ("train", "val"),
            "validate": ("val",),
            "test": ("test",),
            "predict": ("predict",),
        }.get(stage or "", SPLITS)
        # the split a test / validate / predict loop reads must exist; under fit, train and val may
        # go unused (training-free methods, limit_val_batches: 0), so their absence waits for the loader
        required = {"test": "test", "validate": "val", "predict": "predict"}.get(stage or "")
        self.check_options()
        if self.workers_option == "auto":
            self.num_workers = auto_loader_workers(getattr(self, "trainer", None))
        transform = self.resolve_transform()
        train_tf = self.resolve_train_transform() if "train" in needed else transform
        for split in needed:
            raw = self.raw(split)
            if raw is None:
                if split == required:
                    raise self.missing_split_error(split)
                continue
            if split == "predict" and isinstance(raw, Budgeted):
                # the label budget hides labels from training; pseudolabels are scored against them all
                rank_zero_info(f"predict scores the {self.predict_split} split against all its labels (the label "
                               "budget hides them from training only)")
                raw = raw.dataset
            if self.embeddings:
                self.datasets[split] = self._embedded(raw, transform, split)
            else:
                self.datasets[split] = Transformed(raw, train_tf if split == "train" else transform)

    def _embedded(self, raw: Dataset, transform: Any, split: str) -> FeatureDataset:
        backbone = self._model_backbone()
        if backbone is None:
            raise RuntimeError("embeddings: true needs a model with a backbone")
        trainer = getattr(self, "trainer", None)
        strategy = trainer.strategy if trainer is not None else None
        if strategy is not None and backbone.device != strategy.root_device:
            # setup runs before Lightning moves the model: encode on the run's device (a GPU's
            # precision and decoder), not on the CPU the model was built on
            backbone.to(strategy.root_device)
        base = raw.dataset if isinstance(raw, Budgeted) else raw
        # Rank 0 encodes and stores; then each other node's first rank reads the entry (a shared cache) or
        # encodes into its own disk's cache; the other ranks wait (and stop with the error), then read.
        def encode(workers: int) -> dict[str, torch.Tensor]:
            return image_embeddings(backbone, base, transform, self.cache, self.batch_size, workers, f"encoding {split}")

        out = fill_once_per_node(strategy, lambda: encode(self.num_workers), lambda: encode(0))
        if len(out["index"]) < len(base):  # a cached entry remembers the images it could not read; say so
            rank_zero_warn(f"{len(base) - len(out['index'])} of the {len(base)} images of the {split} split were "
                           "skipped as unreadable when their features were encoded (skip_bad)")
        return FeatureDataset(out["features"], out["index"], raw)

    # ---------------------------------------------------------------- loaders
    def _loader(self, split: str, shuffle: bool = False) -> DataLoader:
        if split not in self.datasets:
            if self._raw.get(self.predict_split if split == "predict" else split) is not None:
                raise RuntimeError(f"the {split!r} split of {type(self).__name__} is not set up (call setup first)")
            err = self.missing_split_error(split)
            trainer = getattr(self, "trainer", None)
            if split == "val" and trainer is not None and trainer.state.fn == "fit":
                # a fit's validation loop asked for it: the fit trains without validation (an empty
                # list of loaders is Lightning's "no validation")
                rank_zero_info(f"{err}: the fit runs without validation")
                return []
            raise err
        ds = self.datasets[split]
        common = dict(batch_size=self.batch_size, persistent_workers=self.num_workers > 0)
        if not shuffle:
            return data_loader(ds, self.num_workers, **common)
        loader = data_loader(ds, self.num_workers, loader=ResumableLoader, sampler=EpochShuffle(ds),
                             plan=self.next_pass, **common)
        if self._resume_at is not None:  # refused here, before Lightning holds a loader it cannot iterate
            check_resumable(self._resume_at[1], len(loader))
            self._check_epochs_as_checkpointed(self._resume_at[1])
        return loader

    def _train_epochs(self) -> dict[str, int]:
        """What a fit's training epoch is made of: its images, batch size and processes."""
        trainer = getattr(self, "trainer", None)
        return {"images": len(self.datasets["train"]), "batch_size": int(self.batch_size),
                "processes": int(trainer.world_size) if trainer is not None else 1}

    def no_epochs_follow(self) -> None:
        """A fit resumed with nothing left to train (a finished one): what its checkpoint's epochs were
        made of is not compared with this run's."""
        self._resume_epochs = None

    def _check_epochs_as_checkpointed(self, skip: int) -> None:
        """A run continued from a checkpoint whose epochs had other images or another global batch
        (batch size x processes): refused in the middle of an epoch (the batches already trained are no longer the
        first ``skip`` of this run's), named at an epoch's end (every epoch after it differs)."""
        before, self._resume_epochs = self._resume_epochs, None
        if not before or "train" not in self.datasets:
            return
        now = self._train_epochs()
        if not all(k in before for k in now):
            return

        def steps(d: dict[str, int]) -> dict[str, int]:
            # a step's global batch is the same images in one process as in several (the ranks'
            # shards interleave), unless the sampler pads a shard: then the processes count too
            out = {"images": d["images"], "global_batch_size": d["batch_size"] * d["processes"]}
            if before["processes"] != now["processes"] and (d["images"] % before["processes"] or d["images"] % now["processes"]):
                out["processes"] = d["processes"]
            return out

        was, is_ = steps(before), steps(now)
        changed = [f"{k.replace('_', ' ')} {was[k]} there, {is_[k]} here" for k in is_ if was[k] != is_[k]]
        if not changed:
            return
        if skip:
            raise ValueError(
                f"the checkpoint stopped after batch {skip} of an epoch made of other batches ({'; '.join(changed)}): "
                "the batches it trained are not this run's first ones; resume with the data, batch size and "
                "devices it was trained with, or from a checkpoint at an epoch's end"
            )
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(f"the run continues with epochs made of other batches than the checkpoint's: {'; '.join(changed)}")

    def train_dataloader(self) -> DataLoader:
        """The train split in an order drawn from the run's seed and the epoch, resumable mid-epoch
        (:class:`~vlweak.data.order.ResumableLoader`)."""
        trainer = getattr(self, "trainer", None)
        world = trainer.world_size if trainer is not None else 1
        n = len(self.datasets.get("train", ()))
        if world > 1 and n % world:
            rank_zero_warn(
                f"the training set's {n} samples do not divide among {world} processes: the distributed sampler "
                f"repeats {world - n % world} of them in every epoch, so this fit differs slightly from one process's"
            )
        return self._loader("train", shuffle=True)

    def next_pass(self) -> tuple[int | None, int, int]:
        """``(seed, epoch, batches to skip)`` of the train loader's next pass: a method's own order
        (``train_order``), else the epoch of the fit's progress, and, once, where a checkpoint
        stopped (seed ``None``: the run's)."""
        resume, self._resume_at = self._resume_at, None
        if self.train_order is not None:
            seed, epoch = self.train_order()  # the method's epoch; the batches trained are the fit's
            return seed, epoch, resume[1] if resume is not None else 0
        if resume is not None:
            return None, resume[0], resume[1]
        trainer = getattr(self, "trainer", None)
        return None, trained_position(trainer)[0] if trainer is not None else 0, 0

    def state_dict(self) -> dict[str, Any]:
        """Written into every Lightning checkpoint: where the fit stands in its training order."""
        trainer = getattr(self, "trainer", None)
        if trainer is None or trainer.state.fn != "fit":
            return {}
        state: dict[str, Any] = {"train_position": list(trained_position(trainer))}
        if "train" in self.datasets:
            state["train_epochs"] = self._train_epochs()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restored from a checkpoint before the fit makes any loader: its first pass starts there."""
        if "train_position" in state:
            self._resume_at = tuple(int(v) for v in state["train_position"])
        self._resume_epochs = state.get("train_epochs")

    def teardown(self, stage: str) -> None:
        self._resume_at = self._resume_epochs = None  # a position not reached (the fit ended first) is not the next fit's
        show_progress(True)  # the trainer's choice held for its run only

    def val_dataloader(self) -> DataLoader:
        return self._loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._loader("test")

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict")

    def sample_ids(self, split: str) -> list[str]:
        ds = self.raw(split)
        return list(ds.sample_ids) if ds is not None else []


class ShapesWorldDataModule(VLDataModule):
    """The built-in shapes world (:mod:`vlweak.data.world`): generated on the fly, nothing to download.

    Args:
        task: single-label task: ``shape`` (12 classes), ``coarse`` (polygon / curved shape /
            symbol), ``colour`` (6) or ``colour_shape`` (72).
        multilabel: multi-object scenes labelled with the shapes present (12 labels).
        n_train: train-split size (the unlabeled pool for transductive methods).
        n_val: validation-split size.
        n_test: test-split size.
        shift: domain shift of every split in [0, 1] (1 = the shifted target domain).
        seed: world seed.
        image_size: image side in pixels.
        max_objects: most objects per multi-label scene.
        misnaming: ``{shape: name}``: captions of shifted-domain images call ``shape`` by another
            shape's ``name`` (pretraining on noisy captions; labels are unchanged). Example:
            ``{ellipse: circle}``; ``vlweak.data.world.MISNAMING`` is the noisy-caption model's.
        misnaming_rate: how often such a caption uses the wrong name.
        **kwargs: see :class:`VLDataModule` (batch size, label budget, embeddings, ...).
    """

    def __init__(
        self,
        task: Task = "shape",
        multilabel: bool = False,
        n_train: int = 2000,
        n_val: int = 500,
        n_test: int = 1000,
        shift: float = 0.0,
        seed: int = 0,
        image_size: int = 64,
        max_objects: int = 4,
        misnaming: dict[str, str] | None = None,
        misnaming_rate: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._classnames = classnames_for("shape") if multilabel else classnames_for(task)
        self.task, self._multilabel = task, multilabel
        self.sizes = {"train": n_train, "val": n_val, "test": n_test}
        self.world = ShapesWorld(
            seed=seed,
            image_size=image_size,
            shift=shift,
            multilabel=multilabel,
            max_objects=max_objects,
            misnaming=misnaming,
            misnaming_rate=misnaming_rate,
        )
        self.check_options()

    @property
    def classnames(self) -> list[str]:
        return self._classnames

    @property
    def multilabel(self) -> bool:
        return self._multilabel

    def build_split(self, split: str) -> Dataset | None:
        if split not in self.sizes:
            raise ValueError(f"ShapesWorldDataModule has no {split!r} split (splits: {', '.join(self.sizes)})")
        n = self.sizes[split]
        return ShapesWorldDataset(self.world, split, n, task=self.task) if n > 0 else None

    def missing_split_error(self, split: str) -> Exception:
        name = self.predict_split if split == "predict" else split
        err = super().missing_split_error(split)
        return type(err)(f"{err} (n_{name}: {self.sizes.get(name)})")


class ImageFolderDataModule(VLDataModule):
    """Image folders, one sub-folder per class (``root/{train,val,test}/<class>/<image>``).

    A root without split folders is used as the test split (zero-shot evaluation of a whole folder).

    A folder of images without class sub-folders (the root, or a split folder such as an unlabeled
    ``train`` pool beside a labelled ``test``) holds unlabeled images, pseudolabelled with the
    vocabulary given as ``classnames``: ``vlweak predict`` on ``root: photos/ classnames: [cat, dog]``
    labels every image in ``photos/``.

    A split folder named other than its default (``test: tst``) must exist; a default one may be
    missing until a stage needs it (``vlweak test`` without ``root/test`` is an error naming the
    folder). A class folder without images is a warning (the class has no examples in that split);
    images in a class folder's sub-folders belong to the class, as torchvision's ``ImageFolder`` reads it.

    Args:
        root: dataset folder.
        classnames: class names in sorted folder order, or a ``{folder: name}`` map (e.g. WordNet ids to
            names), or a file holding either (``.txt``, one name per line; ``.json`` / ``.yaml``);
            default: the folder names with underscores turned into spaces. An empty list or map, or
            a repeated name, is an error.
        train: train sub-folder name (``null`` to skip).
        val: validation sub-folder name.
        test: test sub-folder name.
        **kwargs: see :class:`VLDataModule`.
    """

    def __init__(
        self,
        root: str,
        classnames: list[str] | dict[str, str] | str | None = None,
        train: str | None = "train",
        val: str | None = "val",
        test: str | None = "test",
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self.root = Path(root).expanduser()
        if not self.root.is_dir():
            raise FileNotFoundError(f"image folder not found: {self.root}")
        self.folders = {s: f for s, f in (("train", train), ("val", val), ("test", test)) if f}
        present = {s: self.root / f for s, f in self.folders.items() if (self.root / f).is_dir()}
        # a folder the user named (not the default) must exist: no silent fallback to another layout
        renamed = [self.root / f for s, f in self.folders.items() if f != s and s not in present]
        if renamed:
            s_ = "s" if len(renamed) > 1 else ""
            raise FileNotFoundError(
                f"split folder{s_} {', '.join(map(str, renamed))} not found (found: {self._found()})"
            )
        if present and self._split_names_are_classes(present):
            present = {}  # e.g. CIFAR-100's or VOC's class "train" beside the other class folders
        if not present:
            self._check_flat_layout()
        self.split_dirs = present or {"test": self.root}
        if self.predict_split != "test" and self.predict_split not in self.split_dirs:
            raise self.missing_split_error("predict")
        self.classname_map = classnames = load_classnames(classnames)
        # the vocabulary comes from the first split with class folders (others may hold unlabeled images)
        labelled = [(s, d) for s, d in self.split_dirs.items() if list_class_folders(d)]
        split, first = (labelled or list(self.split_dirs.items()))[0]
        probe = ImageFolderReader.read(first, classnames, skip_bad=self.skip_bad)
        self._classnames = probe.classnames
        self._class_folders, self._first_split = list_class_folders(first), first
        self._read = {split: probe}  # build_split reuses it instead of listing the folder again
        self.check_options()

    def _found(self) -> str:
        return ", ".join(list_class_folders(self.root)) or "no sub-folders"

    def _split_names_are_classes(self, present: dict[str, Path]) -> bool:
        """Whether the folders named like splits are classes of a folder without split folders: each
        holds images and no sub-folder, as do the root's other folders (a class vocabulary with a
        class "train", "val" or "test")."""
        others = [self.root / n for n in list_class_folders(self.root) if n not in {d.name for d in present.values()}]
        def class_like(d: Path) -> bool:
            return bool(image_files(d)) and not list_class_folders(d)

        if not others or not all(class_like(d) for d in present.values()) or not all(class_like(d) for d in others):
            return False
        rank_zero_info(f"{self.root}: {', '.join(sorted(d.name for d in present.values()))} hold images as its other "
                       "class folders do: read as classes of a folder without split folders (the test split)")
        return True

    def _check_flat_layout(self) -> None:
        """No split folder: the root must hold the class folders itself (used whole as the test
        split). Sub-folders that hold only folders are split folders under other names."""
        subs = [self.root / name for name in list_class_folders(self.root)]

        if subs and not any(image_files(d) for d in subs) and any(any(x.is_dir() for x in d.iterdir()) for d in subs):
            expected = ", ".join(str(self.root / f) for f in self.folders.values()) or "none named"
            raise FileNotFoundError(
                f"split folders ({expected}) not found (found: {self._found()}); the sub-folders of "
                f"{self.root} hold folders, not images: name the split folders with train/val/test"
            )

    def missing_split_error(self, split: str) -> Exception:
        name = self.predict_split if split == "predict" else split
        note = f" for predict_split {name!r}" if split == "predict" else ""
        if name in getattr(self, "split_dirs", {}):  # the folder is there: the split was not set up
            return RuntimeError(f"the {name!r} split of {self.root} is not set up (call setup first)")
        folder = self.folders.get(name)
        if folder is None:
            return FileNotFoundError(f"ImageFolderDataModule has no {name!r} split{note}: {name} is null (root {self.root})")
        msg = f"split folder {self.root / folder} not found (found: {self._found()}){note}"
        if getattr(self, "split_dirs", None) == {"test": self.root}:
            msg += f"; {self.root} has no split folders, so it is used whole as the test split"
        return FileNotFoundError(msg)

    @property
    def classnames(self) -> list[str]:
        return self._classnames

    def build_split(self, split: str) -> Dataset | None:
        path = self.split_dirs.get(split)
        if path is None:
            return None
        ds = self._read.pop(split, None)
        if ds is None:
            # compared before reading: a classnames list given for fewer folders would fail on the count
            folders = list_class_folders(path)
            # a split of unlabeled images (no class folders) takes the vocabulary as given
            if [_nfc(f) for f in folders] != [_nfc(f) for f in self._class_folders] and folders and self._class_folders:
                raise ValueError(self._class_mismatch(path, folders))
            ds = ImageFolderReader.read(path, self.classname_map if folders else self._classnames, skip_bad=self.skip_bad)
        if ds.classnames != self._classnames:
            raise ValueError(f"class names of {path} ({ds.classnames}) differ from those of {self._first_split}")
        return ds

    def _class_mismatch(self, path: Path, folders: list[str]) -> str:
        """Which class folders ``path`` lacks, or has that the first split lacks."""
        ref = self._class_folders
        have, had = {_nfc(g) for g in folders}, {_nfc(g) for g in ref}
        missing = [f for f in ref if _nfc(f) not in have]
        extra = [f for f in folders if _nfc(f) not in had]
        details = []
        if missing:
            details.append(f"{path} lacks {missing} (present in {self._first_split})")
        if extra:
            details.append(f"{path} has {extra}, which {self._first_split} lacks")
        return (
            f"class folders of {path} differ from those of {self._first_split}: {'; '.join(details)} (every "
            "split needs the same class folders; leave a folder empty for a class without images in a split)"
        )


class ManifestDataModule(VLDataModule):
    """CSV/JSONL/JSON manifests (``path`` plus ``label`` or ``labels``) per split.

    Args:
        train: manifest of the train split.
        val: manifest of the validation split.
        test: manifest of the test split.
        classnames: the class vocabulary (a list, or a ``.txt`` / ``.json`` / ``.yaml`` file holding
            one); default: the sorted labels of the first manifest (needed when the labels are class
            indices).
        root: folder that relative image paths resolve against (default: each manifest's folder).
        multilabel: force multi-label (default: when the manifest has a ``labels`` column).
        captions: the manifest column holding each image's caption: image-caption pairs for
            contrastive training (``CLIPPretrain``); the label columns are then optional. A row
            without a caption is an error naming it.
        **kwargs: see :class:`VLDataModule`.
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        test: str | None = None,
        classnames: list[str] | str | None = None,
        root: str | None = None,
        multilabel: bool | None = None,
        captions: str | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        classnames = load_classnames(classnames)
        if isinstance(classnames, dict):
            raise ValueError("ManifestDataModule's classnames is a list of names in class order, not a map")
        self.captions = captions
        self.manifests = {s: m for s, m in (("train", train), ("val", val), ("test", test)) if m}
        if not self.manifests:
            raise ValueError("ManifestDataModule needs at least one of train, val, test")
        self.root = root
        first = next(iter(self.manifests.values()))
        probe = ManifestReader.read(first, classnames, root, multilabel, self.skip_bad, captions)
        names = probe.classnames if classnames is None else classnames
        self._classnames = validate_classnames(names) if names or not captions else []
        self._multilabel = probe.multilabel
        # the first manifest, read for the vocabulary, is its split's dataset (read once, warned once)
        self._read = {next(iter(self.manifests)): probe} if list(probe.classnames) == self._classnames else {}
        self.check_options()

    def missing_split_error(self, split: str) -> Exception:
        err = super().missing_split_error(split)
        return type(err)(f"{err}: no manifest given for it (given: {', '.join(self.manifests)})")

    @property
    def classnames(self) -> list[str]:
        return self._classnames

    @property
    def multilabel(self) -> bool:
        return self._multilabel

    def build_split(self, split: str) -> Dataset | None:
        path = self.manifests.get(split)
        if path is None:
            return None
        if split in self._read:
            return self._read.pop(split)
        return ManifestReader.read(path, self._classnames, self.root, self._multilabel, self.skip_bad, self.captions)


def auto_loader_workers(trainer: Any = None) -> int:
    """``num_workers: auto``: this process's share of the machine's cores (see
    :func:`vlweak.data.extract.auto_workers`), divided among the trainer's processes on this node."""
    from vlweak.data.extract import auto_workers

    per_node = max(1, int(getattr(trainer, "num_devices", 1) or 1)) if trainer is not None else 1
    return auto_workers() // per_node
