"""ZLaP: label propagation for zero-shot classification (Stojnić, Kalantidis, Tolias, CVPR 2024).

1. Nodes: unlabeled image features (the data module's ``pool_split``, by default ``train``, read
   through the embedding cache) and one text node per class (the zero-shot text classifier).
2. Edges: each image to its ``k`` nearest images and its ``k`` nearest text nodes; negative
   similarities clipped to 0, image–text similarities raised to ``gamma``; ``W + Wᵀ``; symmetric
   normalisation ``W̄ = D^-1/2 W D^-1/2`` (:mod:`vlweak.graph.build`).
3. Propagation: ``(I - alpha W̄) X = Y`` by conjugate gradient, all classes at once (Eq. 2).
4. Scores, by ``mode``:

   * ``transductive``: the evaluated images join the graph (with the pool; ``pool_split: null``
     gives the paper's graph of the evaluated images alone) and read their rows of ``X``;
   * ``inductive``: the graph is the pool; each evaluated image is scored by the dual solution,
     one solve per image with its neighbour similarities as the right-hand side;
   * ``sparse-inductive``: the pool's full solution with only its top ``sparse_topk`` entries per
     row kept; an evaluated image is scored by a sparse product, no solve.

   ``query_norm: degree`` (beyond the paper) scales an evaluated image's edges in both inductive
   modes by its neighbours' inverse root degrees, as the graph's own edges are scaled.

5. Sub-class text nodes (beyond the paper, after CHiLS): with a ``hierarchy`` the text nodes are the
   classes' sub-classes, one node and one right-hand side each, and a class's score is the sum (or
   the max) of its sub-classes' columns of ``X``. Coarse class names are poor text nodes the way
   they are poor prompts; their sub-classes anchor the propagation where the images are.

Under DDP every rank collects its batches' features; at the epoch's end the features are gathered
from all ranks (de-duplicated by sample index), rank 0 solves once, the scores are broadcast, and
rank 0 writes the pseudolabel artifact. Scores are normalised to sum to one per image (single-label)
or to a maximum of one (multi-label) for the artifact's confidences. A multi-label split's logged APs
(and mAP) rank each class's images by the raw propagation scores, which the per-image rescaling
does not keep comparable across images; the APs of the artifact's scores are lower.
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from vlweak.backbones import Backbone
from vlweak.graph import ZLaPPropagator
from vlweak.graph.knn import Engine
from vlweak.graph.propagation import QueryNorm
from vlweak.labels.hierarchy import LabelHierarchy
from vlweak.methods.base import DEFAULT_BACKBONE, VLMethod, check_options
from vlweak.methods.chils import best_per_parent, sum_per_parent
from vlweak.prompts import cached_text_classifier

Mode = Literal["transductive", "inductive", "sparse-inductive"]
MODES = ("transductive", "inductive", "sparse-inductive")
SUBCLASS_REDUCTIONS = ("sum", "max")


def normalise_scores(scores: Tensor, multilabel: bool = False) -> Tensor:
    """Non-negative propagation scores as confidences: rows sum to 1 (single-label) or peak at 1
    (multi-label); an all-zero row (an image the graph never reached) becomes uniform / zero."""
    s = scores.clamp_min(0)
    if multilabel:
        return s / s.amax(1, keepdim=True).clamp_min(torch.finfo(s.dtype).tiny)
    total = s.sum(1, keepdim=True)
    uniform = torch.full_like(s, 1.0 / s.shape[1])
    return torch.where(total > 0, s / total.clamp_min(torch.finfo(s.dtype).tiny), uniform)


class ZLaP(VLMethod):
    """Zero-shot label propagation, transductive or inductive.

    Args:
        backbone: the CLIP-family model (default: the shipped ``vlweak-shapes`` model).
        classnames: class vocabulary; set by the CLI from the data module.
        multilabel: multi-label task; set by the CLI from the data module.
        mode: ``transductive``, ``inductive`` (dual solution) or ``sparse-inductive``.
        k: neighbours per image among images and among text nodes (paper: 5), the image itself not
            counted. The paper's public code searches ``k`` images with the image itself among them
            and then drops it, so its pool images link to ``k - 1`` others (and ``k`` text nodes).
        gamma: power on image–text similarities (paper: 5.0).
        alpha: propagation weight (paper: 0.3).
        tol: conjugate-gradient relative tolerance per class.
        maxiter: conjugate-gradient iteration cap.
        sparse_topk: entries kept per row of the solution for ``sparse-inductive`` (paper: 1).
        query_norm: inductive modes: ``none`` puts an evaluated image's similarities to its
            neighbours into the dual right-hand side as they are (the paper's); ``degree`` divides
            each by the square root of the neighbour's degree, so the image joins the graph the way
            the graph's own edges are normalised. Measure before choosing: on the shifted world with
            ``vlweak-shapes-noisy`` it takes inductive from 0.700 to 0.822 and sparse-inductive from
            0.740 to 0.834 (transductive 0.818); with ``vlweak-shapes`` it changes nothing; on
            Gaussian clusters it costs about 2 points.
        templates: prompt templates of the text classifier (see :class:`~vlweak.methods.ZeroShot`).
        pool_split: the data module's split of unlabeled images the graph is built on; ``null``
            (transductive only) builds it on the evaluated images alone.
        knn_engine: ``auto``, ``faiss`` (CPU), ``torch``, ``torch-bf16`` (bfloat16 screening, verified
            exact; ``auto`` takes it on CPUs with fast bfloat16 for large pools), or the approximate
            ``faiss-ivf`` (CPU; large pools).
        hierarchy: sub-class text nodes instead of one node per class, as CHiLS takes them (an
            inline mapping ``{class: [sub-class, ...]}``, a built-in name such as ``shapes`` or
            ``cifar100``, or a file; see :class:`~vlweak.labels.LabelHierarchy`); ``null``: the
            class names are the text nodes (the paper's).
        hierarchy_level: tree level whose nodes are the classes (0 = the roots).
        duplicates: a sub-class listed under several classes: an error (``error``) or one sub-class
            per class, named ``<sub-class> <class>`` (``qualify``; built-in sets are qualified already).
        clean: CHiLS's label-set cleaning (the class name kept as a sub-class, appended to
            sub-class names lacking it).
        missing: a vocabulary class absent from the hierarchy is an error (``error``) or its own
            single sub-class (``self``).
        subclass_reduce: a class's score from its sub-classes' propagated scores: ``sum`` (the
            label mass that reached the image from all of them) or ``max``.
        threshold: multi-label only: a class is a hard pseudolabel when its confidence reaches this.
        artifact_path: where test/predict write the pseudolabel artifact (default
            ``<log dir>/pseudolabels-<stage>.safetensors``); a folder (an existing one, or a path ending in
            ``/``) holds ``pseudolabels-<stage>.safetensors``; ``""`` writes none.
    """

    def __init__(
        self,
        backbone: Backbone = DEFAULT_BACKBONE,
        classnames: list[str] | None = None,
        multilabel: bool = False,
        mode: Mode = "transductive",
        k: int = 5,
        gamma: float = 5.0,
        alpha: float = 0.3,
        tol: float = 1e-6,
        maxiter: int = 50,
        sparse_topk: int = 1,
        query_norm: QueryNorm = "none",
        templates: str | list[str] = "simple",
        pool_split: str | None = "train",
        knn_engine: Engine = "auto",
        hierarchy: dict[str, Any] | str | None = None,
        hierarchy_level: int = 0,
        duplicates: Literal["error", "qualify"] = "error",
        clean: bool = False,
        missing: Literal["error", "self"] = "error",
        subclass_reduce: Literal["sum", "max"] = "sum",
        threshold: float = 0.5,
        artifact_path: str | None = None,
    ) -> None:
        super().__init__(backbone, classnames, multilabel, artifact_path)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode != "transductive" and pool_split is None:
            raise ValueError(f"mode {mode!r} needs a pool_split of unlabeled images to build the graph on")
        if subclass_reduce not in SUBCLASS_REDUCTIONS:
            raise ValueError(f"subclass_reduce must be one of {SUBCLASS_REDUCTIONS}, got {subclass_reduce!r}")
        if missing not in ("error", "self"):
            raise ValueError(f"missing must be 'error' or 'self', got {missing!r}")
        check_options(templates=templates, threshold=threshold)
        self.tree = None if hierarchy is None else LabelHierarchy.resolve(hierarchy, level=hierarchy_level, duplicates=duplicates)
        if self.tree is not None and clean:
            self.tree = self.tree.cleaned()
        self.missing, self.subclass_reduce = missing, subclass_reduce
        self._vocabulary_tree: LabelHierarchy | None = None
        if self.tree is not None and self.classnames:
            self.vocabulary_hierarchy()  # a class the hierarchy lacks: named now
        self.mode = mode
        self.templates = templates
        self.pool_split = pool_split
        self.threshold = threshold
        self.propagator = ZLaPPropagator(
            k=k, gamma=gamma, alpha=alpha, tol=tol, maxiter=maxiter, sparse_topk=sparse_topk, knn_engine=knn_engine,
            query_norm=query_norm,
        )
        self.save_hyperparameters(ignore=["backbone"])
        self._pool: Tensor | None = None
        self._pool_index: Tensor | None = None

    def setup(self, stage: str) -> None:
        """Each run builds its graph on its own data module's pool: the features kept from an earlier
        run (another data module, in a notebook) are dropped; the embedding cache serves them again."""
        super().setup(stage)
        self._pool = self._pool_index = None

    # ---------------------------------------------------------------- inputs
    def vocabulary_hierarchy(self) -> LabelHierarchy:
        """The ``hierarchy`` over the dataset's vocabulary (classes in dataset order), kept until the
        vocabulary changes."""
        names = self.require_classnames()
        if self._vocabulary_tree is None or self._vocabulary_tree.parents != names:
            self._vocabulary_tree = self.tree.for_vocabulary(names, self.missing)
        return self._vocabulary_tree

    def text_node_names(self) -> list[str]:
        """Names of the text nodes: the classes, or with a ``hierarchy`` their sub-classes."""
        return self.require_classnames() if self.tree is None else self.vocabulary_hierarchy().subclasses

    def classifier(self) -> Tensor:
        """Text nodes: the zero-shot text classifier ``[T, D]`` (unit norm) of :meth:`text_node_names`."""
        # kept in the embedding cache: thousands of sub-class nodes times 80 templates are encoded once
        return cached_text_classifier(self.backbone, self.text_node_names(), self.templates,
                                      self.embedding_cache()).to(self.device)

    def class_scores(self, node_scores: Tensor) -> Tensor:
        """Scores ``[M, C]`` of the classes from the propagated scores ``[M, T]`` of the text nodes
        (the same tensor without a hierarchy; else each class's sub-classes summed or maxed)."""
        if self.tree is None:
            return node_scores
        parent = self.vocabulary_hierarchy().subclass_to_parent().to(node_scores.device)
        reduce = sum_per_parent if self.subclass_reduce == "sum" else best_per_parent
        return reduce(node_scores, parent, len(self.require_classnames()))

    def _pool_dataset(self) -> Any:
        """The data module's unlabeled pool dataset (unbudgeted), or a clear error when it has none."""
        from vlweak.data.budget import Budgeted

        dm = self.datamodule
        if dm is None or not hasattr(dm, "raw"):
            raise RuntimeError("ZLaP needs a vlweak data module to read the unlabeled pool from")
        raw = dm.raw(self.pool_split)
        if raw is None or len(raw) == 0:
            raise RuntimeError(
                f"the data module has no {self.pool_split!r} split to build the graph on "
                "(give data n_train/train, or pool_split: null for a transductive graph of the evaluated images)"
            )
        return raw.dataset if isinstance(raw, Budgeted) else raw

    def pool_features(self) -> Tensor:
        """Unit-norm features of the unlabeled pool, through the embedding cache (computed once),
        in the order of their sample index (:attr:`_pool_index`)."""
        if self._pool is None:
            from vlweak.data.cache import image_embeddings

            base = self._pool_dataset()
            dm = self.trainer.datamodule
            transform = dm.resolve_transform() if hasattr(dm, "resolve_transform") else self.backbone.transform
            out = image_embeddings(
                self.backbone, base, transform, self.embedding_cache(),
                getattr(dm, "batch_size", 256), getattr(dm, "num_workers", 0), f"encoding {self.pool_split}",
            )
            order = torch.argsort(out["index"])
            self._pool_index = out["index"][order].cpu()
            self._pool = torch.nn.functional.normalize(out["features"][order].float(), dim=-1)
        return self._pool

    def prepare_eval(self, stage: str) -> None:
        # every rank checks the pool exists (so all fail alike); the rank that solves encodes it
        # now, before the batches, instead of inside the end-of-epoch collective
        if self.pool_split is None:
            return
        if self._trainer is not None and self.trainer.world_size > 1:
            self._pool_dataset()  # before the collective: a missing pool stops every rank alike
        self.rank_zero_first(self.pool_features)

    # ---------------------------------------------------------------- propagation
    @torch.no_grad()
    def propagate(self, features: Tensor, split: str | None = None, index: Tensor | None = None) -> Tensor:
        """Class scores ``[M, C]`` (raw, non-negative) of evaluated images with unit-norm ``features``.

        When the evaluated split *is* the pool, the graph is the whole pool and the rows of the
        evaluated samples (``index``, their sample indices; all of the pool when ``None``) are returned.
        """
        return self.class_scores(self.propagate_nodes(features, split, index))

    @torch.no_grad()
    def propagate_nodes(self, features: Tensor, split: str | None = None, index: Tensor | None = None) -> Tensor:
        """:meth:`propagate` before the classes: one column per text node ``[M, T]``."""
        text = self.classifier().float()
        feats = features.to(self.device).float()
        pool = None if self.pool_split is None else self.pool_features().to(self.device)
        prop = self.propagator
        prop.progress = self._trainer is not None and self.trainer.progress_bar_callback is not None
        if pool is None:  # the evaluated images are the graph
            return prop.fit(feats, text).transductive()
        if split == self.pool_split:
            scores = prop.fit(pool, text).transductive()
            if index is None:
                return scores
            rows = torch.searchsorted(self._pool_index, index.cpu())
            rows = rows.clamp_max(len(self._pool_index) - 1)
            if not torch.equal(self._pool_index[rows], index.cpu()):
                raise RuntimeError(f"evaluated samples of the {split!r} split are missing from its pool features")
            return scores[rows.to(scores.device)]
        if self.mode == "transductive":
            scores = prop.fit(torch.cat([pool, feats]), text).transductive()
            return scores[pool.shape[0] :]
        prop.fit(pool, text)
        return prop.inductive(feats) if self.mode == "inductive" else prop.sparse_inductive(feats)

    # ---------------------------------------------------------------- loops
    def eval_step(self, batch: dict[str, Any], stage: str) -> dict[str, Tensor]:
        # the graph needs every image first: collect features, propagate in ``finish``
        return {"features": self.image_features(batch), "index": batch["index"], **self.targets_of(batch)}

    def finish(self, stage: str, out: dict[str, Tensor]) -> None:
        # every rank holds all ranks' samples, de-duplicated and sorted by index
        raw = self.rank_zero_first(
            lambda: self.propagate(out["features"], self.split_of(stage), out["index"]).cpu(), share=True
        )
        scores = normalise_scores(raw, self.multilabel)
        if "target" in out:
            # multi-label APs rank images per class: by the raw propagation scores, not by the
            # per-image rescaled confidences (which the F1 values read)
            self.evaluate(stage, scores, out["target"], out.get("mask"), rank_scores=raw if self.multilabel else None)
        if stage != "val":
            self.write_artifact(stage, scores, out["index"], mode=self.mode)
