"""The ZLaP graph: unlabeled images plus one text node per class.

Node numbering: text nodes ``0 .. C-1`` (class ``c`` is node ``c``), image ``i`` is node ``C + i``.

Edges (Stojnić et al. 2024, Sec. 3):

* image → its ``k`` nearest images (inner product, self excluded), weight ``max(s, 0)``;
* image → its ``k`` nearest text nodes, weight ``max(s, 0) ** gamma`` — image–text similarities
  live on a lower, narrower range than image–image ones, and the power sharpens them;
* ``W + Wᵀ``, then ``W̄ = D^-1/2 W D^-1/2`` with ``D`` the degrees (an isolated node keeps
  degree 1, i.e. stays isolated).

The adjacency is a torch sparse CSR matrix with ``2·N·(k + k_text)`` stored entries at most:
memory O(N·k), on the features' device.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
from torch import Tensor

from vlweak.graph.knn import Engine, knn

__all__ = ["ZLaPGraph", "build_zlap_graph", "query_edges"]


@dataclass
class ZLaPGraph:
    """A normalised ZLaP graph.

    Attributes:
        adjacency: ``W̄``, sparse CSR ``[C + N, C + N]``, symmetric.
        num_classes: ``C`` (text nodes come first).
        num_images: ``N``.
        k: image–image neighbours per image used to build it.
        gamma: power applied to image–text similarities.
        degree: ``[C + N]`` node degrees of ``W + Wᵀ`` before normalisation (an isolated node
            counts 1), for joining new images to the graph the way its own edges were normalised.
    """

    adjacency: Tensor
    num_classes: int
    num_images: int
    k: int
    gamma: float
    degree: Tensor

    @property
    def num_nodes(self) -> int:
        return self.num_classes + self.num_images

    @property
    def device(self) -> torch.device:
        return self.adjacency.device


def _solvable(x: Tensor | None) -> Tensor | None:
    """Half-precision features in float32: sparse products have no fp16/bf16 kernels on CPU, and
    CG cannot reach its tolerance (nor ``s ** gamma`` stay above underflow) in half precision."""
    return x.float() if x is not None and x.dtype in (torch.float16, torch.bfloat16) else x


def _check_inputs(images: Tensor, text: Tensor) -> None:
    if text.dim() == 2 and text.shape[0] == 0:
        raise ValueError("the graph needs at least one class text embedding, got none")
    if images.dim() != 2 or text.dim() != 2:
        raise ValueError(f"images and text must be 2-d, got {tuple(images.shape)} and {tuple(text.shape)}")
    if images.shape[1] != text.shape[1]:
        raise ValueError(f"images have d={images.shape[1]} but text embeddings d={text.shape[1]}")
    if images.device != text.device:
        raise ValueError(f"images on {images.device} but text embeddings on {text.device}")
    if images.dtype != text.dtype:
        raise ValueError(f"images are {images.dtype} but text embeddings {text.dtype}")


def query_edges(
    queries: Tensor,
    images: Tensor | None,
    text: Tensor,
    k: int,
    gamma: float,
    *,
    engine: Engine = "auto",
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """Edges from query images to the graph's nodes, ZLaP-weighted.

    Args:
        queries: ``[M, d]`` normalised image features.
        images: the graph's ``[N, d]`` images, or ``None`` when the queries *are* the graph's images
            (self excluded).
        text: ``[C, d]`` normalised class text embeddings.
        k: neighbours among images and among text nodes (each clipped to what exists).
        gamma: power on image–text similarities.
        engine: kNN engine (see :func:`vlweak.graph.knn.knn`).
        progress: a progress bar over a large image search.

    Returns:
        ``(nodes [M, k_img + k_txt], weights [M, k_img + k_txt])`` in the graph's node numbering.
    """
    queries, images, text = _solvable(queries), _solvable(images), _solvable(text)
    _check_inputs(queries, text)
    if images is not None:
        _check_inputs(images, text)
    num_classes = text.shape[0]
    img_sims, img_idx = knn(queries, images, k, engine=engine, progress=progress)
    txt_sims, txt_idx = knn(queries, text, k, engine="torch")
    img_w = img_sims.clamp_min(0)
    txt_w = txt_sims.clamp_min(0).pow(gamma)
    nodes = torch.cat([img_idx + num_classes, txt_idx], dim=1)
    return nodes, torch.cat([img_w, txt_w], dim=1)


def build_zlap_graph(
    images: Tensor,
    text: Tensor,
    k: int = 5,
    gamma: float = 5.0,
    *,
    engine: Engine = "auto",
    edges: tuple[Tensor, Tensor] | None = None,
    progress: bool = False,
) -> ZLaPGraph:
    """Build the normalised ZLaP graph over ``images`` and the class ``text`` nodes.

    Args:
        images: ``[N, d]`` L2-normalised image features (the unlabeled pool).
        text: ``[C, d]`` L2-normalised class text embeddings.
        k: neighbours per image, among images and among text nodes.
        gamma: power on image–text similarities.
        engine: kNN engine.
        edges: precomputed ``query_edges(images, None, text, k, gamma)`` to reuse.
        progress: a progress bar over a large kNN search.

    Returns:
        :class:`ZLaPGraph` on the features' device.
    """
    images, text = _solvable(images), _solvable(text)
    _check_inputs(images, text)
    if images.shape[0] < 2:
        raise ValueError("the graph needs at least two images")
    n, c = images.shape[0], text.shape[0]
    if edges is None:
        edges = query_edges(images, None, text, k, gamma, engine=engine, progress=progress)
    nodes, weights = edges
    size = n + c
    rows = (torch.arange(n, device=images.device) + c).unsqueeze(1).expand_as(nodes).reshape(-1)
    cols = nodes.reshape(-1)
    vals = weights.reshape(-1).to(images.dtype)
    keep = (vals > 0) & (rows != cols)
    rows, cols, vals = rows[keep], cols[keep], vals[keep]
    # W + Wᵀ: both directions; coalescing sums an edge found from both ends.
    index = torch.stack([torch.cat([rows, cols]), torch.cat([cols, rows])])
    w = torch.sparse_coo_tensor(index, torch.cat([vals, vals]), (size, size), check_invariants=False).coalesce()
    index, vals = w.indices(), w.values()
    degree = torch.zeros(size, dtype=vals.dtype, device=vals.device).index_add_(0, index[0], vals)
    degree[degree == 0] = 1
    d_inv_sqrt = degree.rsqrt()
    vals = vals * d_inv_sqrt[index[0]] * d_inv_sqrt[index[1]]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
        adjacency = torch.sparse_coo_tensor(
            index, vals, (size, size), is_coalesced=True, check_invariants=False
        ).to_sparse_csr()
    return ZLaPGraph(adjacency=adjacency, num_classes=c, num_images=n, k=k, gamma=gamma, degree=degree)
