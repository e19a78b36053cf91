"""CDUL's initialization stage (Abdelfattah et al. 2023, Sec. 3.2): global and local (snippet)
CLIP similarities and the global–local aggregation that gives the initial multi-label pseudolabels.

* **Snippets.** An image is split into a ``grid × grid`` lattice of square crops (optionally
  overlapping). All crops of a batch are cut with one ``unfold`` on the device and encoded as one
  batch — never a Python loop per crop. The source image is resized (one batched op) to the size at
  which every crop has exactly the model's input resolution. By default the whole image is tiled
  (resized to that square whatever its aspect, so objects at its borders get snippets too, as the
  paper splits the image); ``fit="crop"`` tiles the centre square only, as CLIP's preprocessing
  sees the image.
* **Similarities.** ``s_global = softmax(τ · f(x) · Wᵀ)`` for the whole image and
  ``s_j = softmax(τ · f(r_j) · Wᵀ)`` for every snippet ``r_j`` (``W``: the class text embeddings).
* **Aggregation** (per class ``c``): ``α_c = max_j s_j,c`` and ``β_c = min_j s_j,c``; the local score
  is ``α_c`` where ``α_c ≥ ζ`` (some snippet is confident about ``c``) and ``β_c`` otherwise.
* **Fusion**: the initial pseudolabel is the mean of the global and the aggregated local vectors.

Snippet embeddings are the expensive part (``grid²`` image encodings per image); they go through the
:class:`~vlweak.data.cache.EmbeddingCache` under a key that includes the grid and overlap.
"""

from __future__ import annotations

from typing import Any, Literal, get_args

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import v2

InitMode = Literal["global", "local", "aggregated"]
SnippetFit = Literal["stretch", "crop"]
INIT_MODES = get_args(InitMode)
SNIPPET_FITS = get_args(SnippetFit)


# ---------------------------------------------------------------------------- grid geometry
def snippet_geometry(crop: int, grid: int, overlap: float = 0.0) -> tuple[int, int]:
    """``(stride, source)``: the step between neighbouring crops of side ``crop`` and the side of
    the source image a ``grid × grid`` lattice of such crops tiles exactly (first crop at 0, last
    ending at ``source``). ``overlap`` is the shared fraction of neighbouring crops, in [0, 1)."""
    if int(grid) != grid or grid < 1:
        raise ValueError(f"grid must be a positive integer, got {grid!r}")
    if not 0.0 <= overlap < 1.0:
        raise ValueError(f"overlap must lie in [0, 1), got {overlap!r}")
    if crop < 1:
        raise ValueError(f"crop must be positive, got {crop!r}")
    stride = max(1, round(crop * (1.0 - overlap)))
    return stride, crop + (grid - 1) * stride


def snippet_boxes(crop: int, grid: int, overlap: float = 0.0) -> Tensor:
    """Crop boxes ``[grid², 4]`` as ``(x0, y0, x1, y1)`` pixel corners on the source image of
    :func:`snippet_geometry`, row-major (top-left snippet first)."""
    stride, _ = snippet_geometry(crop, grid, overlap)
    starts = torch.arange(grid) * stride
    y0, x0 = torch.meshgrid(starts, starts, indexing="ij")
    x0, y0 = x0.flatten(), y0.flatten()
    return torch.stack([x0, y0, x0 + crop, y0 + crop], 1)


def crop_snippets(images: Tensor, crop: int, grid: int, overlap: float = 0.0) -> Tensor:
    """All snippets of a batch ``[B, 3, H, W]`` as ``[B, grid², 3, crop, crop]`` (row-major), cut by
    one ``unfold``; the batch is first resized (one op) to the source side that the grid tiles."""
    if images.ndim != 4:
        raise ValueError(f"images must be [B, C, H, W], got shape {tuple(images.shape)}")
    stride, source = snippet_geometry(crop, grid, overlap)
    if images.shape[-2:] != (source, source):
        images = F.interpolate(images, size=(source, source), mode="bilinear", align_corners=False, antialias=True)
    b, c = images.shape[:2]
    patches = images.unfold(2, crop, stride).unfold(3, crop, stride)  # [B, C, g, g, crop, crop]
    return patches.permute(0, 2, 3, 1, 4, 5).reshape(b, grid * grid, c, crop, crop)


def snippet_transform(backbone: Any, grid: int, overlap: float = 0.0, fit: str = "stretch") -> v2.Compose:
    """Preprocessing of the snippet pass: the image at the source side of the grid, so that every
    snippet is cut at the model's input resolution. ``fit="stretch"`` resizes the whole image to that
    square (every pixel lands in some snippet; a non-square image is stretched); ``fit="crop"``
    resizes its shorter side and keeps the centre square (the borders of the longer side are lost)."""
    if fit not in SNIPPET_FITS:
        raise ValueError(f"snippet fit must be one of {SNIPPET_FITS}, got {fit!r}")
    _, source = snippet_geometry(backbone.image_size, grid, overlap)
    resize = (
        [v2.Resize((source, source), interpolation=v2.InterpolationMode.BICUBIC, antialias=True)]
        if fit == "stretch"
        else [v2.Resize(source, interpolation=v2.InterpolationMode.BICUBIC, antialias=True), v2.CenterCrop(source)]
    )
    return v2.Compose(
        [
            v2.ToImage(),
            *resize,
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean=list(backbone.image_mean), std=list(backbone.image_std)),
        ]
    )


@torch.no_grad()
def encode_snippets(backbone: Any, images: Tensor, grid: int, overlap: float = 0.0, chunk: int = 4096) -> Tensor:
    """Unit-norm embeddings ``[B, grid², D]`` of every snippet of a batch, encoded as one batch
    (split into chunks of ``chunk`` crops only to bound memory)."""
    crops = crop_snippets(images.to(backbone.device), backbone.image_size, grid, overlap)
    b, g = crops.shape[:2]
    flat = crops.flatten(0, 1)
    feats = torch.cat([backbone.encode_image(flat[i : i + chunk]) for i in range(0, len(flat), chunk)])
    return feats.view(b, g, -1)


@torch.no_grad()
def encode_snippets_loop(backbone: Any, images: Tensor, grid: int, overlap: float = 0.0) -> Tensor:
    """Reference implementation: one crop and one encoder call at a time (for tests and benchmarks)."""
    crop = backbone.image_size
    stride, source = snippet_geometry(crop, grid, overlap)
    images = images.to(backbone.device)
    if images.shape[-2:] != (source, source):
        images = F.interpolate(images, size=(source, source), mode="bilinear", align_corners=False, antialias=True)
    out = torch.empty(len(images), grid * grid, backbone.embed_dim, device=backbone.device)
    for i in range(len(images)):
        for j, (x0, y0, x1, y1) in enumerate(snippet_boxes(crop, grid, overlap).tolist()):
            out[i, j] = backbone.encode_image(images[i : i + 1, :, y0:y1, x0:x1])[0]
    return out


def snippet_embeddings(
    backbone: Any,
    dataset: Any,
    grid: int,
    overlap: float = 0.0,
    cache: Any = None,
    batch_size: int = 64,
    num_workers: int = 0,
    desc: str = "encoding snippets",
    fit: str = "stretch",
) -> dict[str, Tensor]:
    """Snippet embeddings of a raw dataset: ``{"features": [N, grid², D], "index": [N]}``, through
    the embedding cache (namespace ``snippets``; the key includes grid, overlap and the transform,
    hence ``fit``)."""
    from vlweak.data.cache import cache_key
    from vlweak.data.datasets import Transformed, data_loader

    transform = snippet_transform(backbone, grid, overlap, fit)

    def compute() -> dict[str, Tensor]:
        loader = data_loader(Transformed(dataset, transform), num_workers, batch_size=batch_size)
        feats, index = [], []
        from vlweak.progress import progress_bar

        for batch in progress_bar(loader, desc=desc):
            if not batch:
                continue
            feats.append(encode_snippets(backbone, batch["image"], grid, overlap).half().cpu())
            index.append(batch["index"])
        if not feats:
            raise ValueError(f"no readable images in {desc}")
        return {"features": torch.cat(feats), "index": torch.cat(index)}

    if cache is None:
        out = compute()
    else:
        key = cache_key(
            backbone=backbone.fingerprint(),
            data=dataset.fingerprint_parts(),
            transform=repr(transform),
            grid=grid,
            overlap=overlap,
            kind="cdul-snippets",
        )
        out = cache.get_or_compute(key, compute, namespace="snippets", grid=grid, overlap=overlap, n=len(dataset))
    return {"features": out["features"].float(), "index": out["index"]}


# ---------------------------------------------------------------------------- scores and aggregation
def class_similarities(features: Tensor, classifier: Tensor, scale: Tensor | float) -> Tensor:
    """``softmax(scale · f · Wᵀ)`` over classes for features ``[..., D]`` → ``[..., C]``."""
    return (scale * features @ classifier.T).softmax(-1)


def aggregate_snippets(local: Tensor, threshold: float = 0.5) -> Tensor:
    """Global–local aggregator over snippets ``[N, G, C]`` → ``[N, C]``: per class the largest
    snippet score where it reaches ``threshold``, else the smallest one."""
    alpha = local.max(1).values
    beta = local.min(1).values
    return torch.where(alpha >= threshold, alpha, beta)


def initial_scores(global_scores: Tensor, local_scores: Tensor, init: str = "aggregated", threshold: float = 0.5) -> Tensor:
    """Initial pseudolabels ``[N, C]``: ``global`` (whole image only), ``local`` (aggregated
    snippets only) or ``aggregated`` (the mean of both, the paper's initialization)."""
    if init == "global":
        return global_scores
    local = aggregate_snippets(local_scores, threshold)
    if init == "local":
        return local
    if init == "aggregated":
        return 0.5 * (global_scores + local)
    raise ValueError(f"init must be one of {INIT_MODES}, got {init!r}")
