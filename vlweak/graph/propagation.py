"""Label propagation on the ZLaP graph: transductive, inductive (dual) and sparse-inductive.

Propagation solves ``(I - alpha W̄) X = Y`` (Zhou et al. 2004 in closed form; Stojnić et al. 2024,
Eq. 2) by conjugate gradient, for all right-hand sides at once.

* Transductive: ``Y`` has one column per class, a 1 on that class's text node. The score of image
  ``i`` for class ``c`` is ``X[C + i, c]``.
* Inductive, dual solution: a new image ``q`` is not in the graph; its right-hand side ``y_q`` holds
  its ZLaP-weighted similarities to its neighbours (images and text nodes), and its class scores are
  the text-node entries of ``(I - alpha W̄)^-1 y_q`` — one solve per test image (batched here as
  columns of one multi-right-hand-side solve). Since ``I - alpha W̄`` is symmetric this equals
  ``sum_j y_q[j] X[j, :]`` with ``X`` the transductive solution including the text rows.
* Sparse-inductive: keep only the largest ``topk`` entries of each row of that full solution
  ``X [C + N, C]``, and score ``q`` by the sparse product ``y_q · X_sparse`` — no solve at test time.

The paper (and its code) puts ``q``'s similarities into ``y_q`` as they are. ``query_norm="degree"``
divides each by the square root of the neighbour's degree instead, so ``q`` joins the graph the way
the symmetric normalisation ``D^-1/2 W D^-1/2`` treats the graph's own edges: ``q``'s score is then
the first-order propagation to ``q`` as a node (up to a factor per query, which leaves its ranking of
the classes alone). A hub, which gathers propagated mass from many nodes, no longer outvotes the
query's other neighbours.
"""

from __future__ import annotations


from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from vlweak.graph.build import ZLaPGraph, build_zlap_graph, query_edges
from vlweak.graph.cg import CGResult, conjugate_gradient
from vlweak.graph.knn import Engine

QueryNorm = Literal["none", "degree"]
QUERY_NORMS = ("none", "degree")

__all__ = [
    "SparseSolution",
    "ZLaPPropagator",
    "class_solutions",
    "dual_inductive_scores",
    "propagation_operator",
    "transductive_scores",
]

# Paper / public reference defaults: k = 5, gamma = 5.0, alpha = 0.3; CG tol 1e-6, at most 50 steps.
# vlweak's k counts neighbours other than the image itself, as the paper defines the graph (a search
# of k that includes the query and then drops the diagonal keeps k - 1).
DEFAULT_K = 5
DEFAULT_GAMMA = 5.0
DEFAULT_ALPHA = 0.3


def warn_unconverged(result: CGResult, what: str) -> None:
    """Warn when conjugate gradient stopped at ``maxiter`` before reaching its tolerance."""
    bad = int((~result.converged).sum())
    if bad:
        rank_zero_warn(
            f"ZLaP {what}: {bad} of {result.converged.numel()} right-hand sides did not reach the CG tolerance "
            f"in {result.iterations} iterations (raise maxiter, or lower alpha); scores may be inexact",
            category=RuntimeWarning,
            stacklevel=3,
        )


def propagation_operator(graph: ZLaPGraph, alpha: float) -> Callable[[Tensor], Tensor]:
    """``X -> (I - alpha W̄) X``: one sparse-dense product per call."""
    if not 0.0 <= alpha < 1.0:
        raise ValueError(f"alpha must be in [0, 1), got {alpha}")
    adjacency = graph.adjacency
    def apply(x: Tensor) -> Tensor:
        return torch.sparse.mm(adjacency, x).mul_(-alpha).add_(x)

    return apply


def default_chunk(device: torch.device) -> int | None:
    """Right-hand sides per CG run: all at once on an accelerator; 16 on CPU, where a narrow block
    of columns stays in cache (measured fastest at N = 50,000)."""
    return None if device.type == "cuda" else 16


def class_solutions(
    graph: ZLaPGraph,
    alpha: float = DEFAULT_ALPHA,
    *,
    tol: float = 1e-6,
    maxiter: int = 50,
    chunk_size: int | None = -1,
) -> CGResult:
    """Solve for every class: ``X [C + N, C]`` with each class's text node as the source.

    Args:
        chunk_size: classes per multi-right-hand-side CG run; ``None`` for all at once, ``-1`` for
            :func:`default_chunk`. Columns are independent, so chunking never changes the result.
    """
    c, device = graph.num_classes, graph.device
    chunk = default_chunk(device) if chunk_size == -1 else chunk_size
    chunk = c if chunk is None else max(1, chunk)
    operator = propagation_operator(graph, alpha)
    x = torch.empty(graph.num_nodes, c, dtype=graph.adjacency.dtype, device=device)
    residuals, converged, iterations = [], [], 0
    for start in range(0, c, chunk):
        width = min(chunk, c - start)
        y = torch.zeros(graph.num_nodes, width, dtype=x.dtype, device=device)
        y[torch.arange(start, start + width), torch.arange(width)] = 1.0
        result = conjugate_gradient(operator, y, tol=tol, maxiter=maxiter)
        x[:, start : start + width] = result.x
        residuals.append(result.residual_norms)
        converged.append(result.converged)
        iterations = max(iterations, result.iterations)
    return CGResult(x=x, iterations=iterations, residual_norms=torch.cat(residuals), converged=torch.cat(converged))


def transductive_scores(
    graph: ZLaPGraph, alpha: float = DEFAULT_ALPHA, *, tol: float = 1e-6, maxiter: int = 50
) -> Tensor:
    """Class scores ``[N, C]`` of the graph's images."""
    return class_solutions(graph, alpha, tol=tol, maxiter=maxiter).x[graph.num_classes :]


def _rhs(graph: ZLaPGraph, nodes: Tensor, weights: Tensor) -> Tensor:
    """Dense right-hand sides ``[C + N, M]`` from per-query edges ``[M, K]``."""
    m = nodes.shape[0]
    y = torch.zeros(graph.num_nodes, m, dtype=graph.adjacency.dtype, device=graph.device)
    cols = torch.arange(m, device=graph.device).unsqueeze(1).expand_as(nodes)
    y.index_put_((nodes.reshape(-1), cols.reshape(-1)), weights.reshape(-1).to(y.dtype), accumulate=True)
    return y


def dual_inductive_scores(
    graph: ZLaPGraph,
    nodes: Tensor,
    weights: Tensor,
    alpha: float = DEFAULT_ALPHA,
    *,
    tol: float = 1e-6,
    maxiter: int = 50,
    batch_size: int | None = None,
) -> Tensor:
    """Dual-solution scores ``[M, C]`` for new images given their edges into the graph.

    Args:
        graph: the base graph.
        nodes, weights: ``[M, K]`` from :func:`vlweak.graph.build.query_edges`.
        alpha, tol, maxiter: propagation and CG settings.
        batch_size: queries per multi-right-hand-side solve (memory ``5·(C+N)·batch``); by default
            about 2^25 solution entries per batch.
    """
    m = nodes.shape[0]
    batch = batch_size or max(1, (1 << 25) // graph.num_nodes)
    operator = propagation_operator(graph, alpha)
    out = torch.empty(m, graph.num_classes, dtype=graph.adjacency.dtype, device=graph.device)
    for start in range(0, m, batch):
        y = _rhs(graph, nodes[start : start + batch], weights[start : start + batch])
        result = conjugate_gradient(operator, y, tol=tol, maxiter=maxiter)
        warn_unconverged(result, "dual inductive solves")
        out[start : start + batch] = result.x[: graph.num_classes].T
    return out


@dataclass
class SparseSolution:
    """The full solution ``X [C + N, C]`` with only the ``topk`` largest entries of each row kept.

    Attributes:
        values: ``[C + N, topk]``.
        classes: ``[C + N, topk]`` column (class) of each kept value.
        num_classes: ``C``.
    """

    values: Tensor
    classes: Tensor
    num_classes: int

    @classmethod
    def from_dense(cls, solution: Tensor, topk: int = 1) -> SparseSolution:
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        values, classes = solution.topk(min(topk, solution.shape[1]), dim=1)
        return cls(values=values, classes=classes, num_classes=solution.shape[1])

    def scores(self, nodes: Tensor, weights: Tensor) -> Tensor:
        """``y_q · X_sparse`` for every query: ``[M, C]``."""
        m = nodes.shape[0]
        vals = self.values[nodes] * weights.to(self.values.dtype).unsqueeze(-1)  # [M, K, topk]
        cls_ = self.classes[nodes]
        out = torch.zeros(m, self.num_classes, dtype=self.values.dtype, device=self.values.device)
        return out.scatter_add_(1, cls_.reshape(m, -1), vals.reshape(m, -1))


class ZLaPPropagator:
    """ZLaP on tensors: build the graph once, then score transductively or inductively.

    Args:
        k: neighbours per image among images and among text nodes (paper default 5).
        gamma: power on image–text similarities (paper default 5.0).
        alpha: propagation weight in ``(I - alpha W̄)`` (paper default 0.3).
        tol: CG relative residual tolerance per class.
        maxiter: CG iteration cap.
        sparse_topk: entries per row kept for sparse-inductive inference (paper: 1).
        knn_engine: one of :data:`vlweak.graph.knn.ENGINES` (see :func:`vlweak.graph.knn.knn`).
        batch_size: queries per dual solve (see :func:`dual_inductive_scores`).
        query_norm: how a new image's edges enter the inductive scores: ``"none"`` (its
            similarities, the paper's) or ``"degree"`` (each divided by the square root of the
            neighbour's degree, as the graph's own edges are normalised; see the module notes).
        progress: progress bars over large kNN searches.
    """

    def __init__(
        self,
        k: int = DEFAULT_K,
        gamma: float = DEFAULT_GAMMA,
        alpha: float = DEFAULT_ALPHA,
        tol: float = 1e-6,
        maxiter: int = 50,
        sparse_topk: int = 1,
        knn_engine: Engine = "auto",
        batch_size: int | None = None,
        query_norm: QueryNorm = "none",
        progress: bool = False,
    ) -> None:
        if query_norm not in QUERY_NORMS:
            raise ValueError(f"query_norm must be one of {QUERY_NORMS}, got {query_norm!r}")
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}")
        if gamma <= 0:
            raise ValueError(f"gamma must be > 0, got {gamma}")
        if not 0.0 < alpha < 1.0:
            raise ValueError(f"alpha must be in (0, 1) (at 0 nothing propagates from the text nodes), got {alpha}")
        if sparse_topk < 1:
            raise ValueError(f"sparse_topk must be >= 1, got {sparse_topk}")
        self.k, self.gamma, self.alpha = k, gamma, alpha
        if not tol >= 0 or maxiter < 1:
            raise ValueError(f"need tol >= 0 and maxiter >= 1, got tol={tol}, maxiter={maxiter}")
        self.tol, self.maxiter = tol, maxiter
        self.sparse_topk = sparse_topk
        self.knn_engine: Engine = knn_engine
        self.batch_size = batch_size
        self.query_norm: QueryNorm = query_norm
        self.progress = progress
        self.images: Tensor | None = None
        self.text: Tensor | None = None
        self.graph: ZLaPGraph | None = None
        self._solution: Tensor | None = None
        self._sparse: SparseSolution | None = None

    def fit(self, images: Tensor, text: Tensor) -> ZLaPPropagator:
        """Build the graph over ``images [N, d]`` and class ``text [C, d]`` (both L2-normalised)."""
        if self.k >= len(images):
            rank_zero_warn(
                f"ZLaP k={self.k} but the graph has {len(images)} images: each links to all {len(images) - 1} others "
                "(a graph of fewer images than k + 1 propagates little; give a larger pool or a smaller k)",
                stacklevel=2,
            )
        self.images, self.text = images, text
        self.graph = build_zlap_graph(images, text, self.k, self.gamma, engine=self.knn_engine, progress=self.progress)
        self._solution = self._sparse = None
        return self

    def _need_graph(self) -> ZLaPGraph:
        if self.graph is None:
            raise RuntimeError("call fit(images, text) first")
        return self.graph

    def solution(self) -> Tensor:
        """The full solution ``[C + N, C]`` (computed once)."""
        graph = self._need_graph()
        if self._solution is None:
            result = class_solutions(graph, self.alpha, tol=self.tol, maxiter=self.maxiter)
            warn_unconverged(result, "class solutions")
            self._solution = result.x
        return self._solution

    def transductive(self) -> Tensor:
        """Scores ``[N, C]`` of the fitted images."""
        return self.solution()[self._need_graph().num_classes :]

    def edges(self, queries: Tensor) -> tuple[Tensor, Tensor]:
        """ZLaP-weighted edges from new images into the graph (scaled by ``query_norm``)."""
        graph = self._need_graph()
        nodes, weights = query_edges(queries, self.images, self.text, self.k, self.gamma, engine=self.knn_engine,
                                     progress=self.progress)
        if self.query_norm == "degree":
            weights = weights * graph.degree.to(weights.dtype)[nodes].rsqrt()
        return nodes, weights

    def inductive(self, queries: Tensor) -> Tensor:
        """Dual-solution scores ``[M, C]`` for new images (one solve per image, batched)."""
        nodes, weights = self.edges(queries)
        return dual_inductive_scores(
            self._need_graph(), nodes, weights, self.alpha, tol=self.tol, maxiter=self.maxiter,
            batch_size=self.batch_size,
        )

    def sparse_inductive(self, queries: Tensor) -> Tensor:
        """Sparsified-solution scores ``[M, C]`` for new images (no solve at test time)."""
        if self._sparse is None:
            self._sparse = SparseSolution.from_dense(self.solution(), self.sparse_topk)
        nodes, weights = self.edges(queries)
        return self._sparse.scores(nodes, weights)
