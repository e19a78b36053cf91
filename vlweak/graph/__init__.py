"""kNN graphs and label-propagation solvers (GPU first, CPU fallback)."""

from vlweak.graph.build import ZLaPGraph, build_zlap_graph, query_edges
from vlweak.graph.cg import CGResult, conjugate_gradient
from vlweak.graph.knn import knn, self_knn
from vlweak.graph.propagation import (
    SparseSolution,
    ZLaPPropagator,
    class_solutions,
    dual_inductive_scores,
    propagation_operator,
    transductive_scores,
)

__all__ = [
    "CGResult",
    "SparseSolution",
    "ZLaPGraph",
    "ZLaPPropagator",
    "build_zlap_graph",
    "class_solutions",
    "conjugate_gradient",
    "dual_inductive_scores",
    "knn",
    "propagation_operator",
    "query_edges",
    "self_knn",
    "transductive_scores",
]
