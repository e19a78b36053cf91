"""The embedding cache: image (and text) embeddings on disk, keyed by what produced them.

A key is the digest of the backbone fingerprint (architecture, weight-file digest, precision), the
dataset fingerprint (reader, files with sizes and mtimes and whether unreadable ones are skipped, or
the world's seed and settings) and the transform; change any of them and the key changes, so a stale
entry is never returned. Entries are safetensors files written atomically (temporary file, then
rename), so a crash never leaves a half-written entry behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor


def default_cache_dir() -> Path:
    """``$VLWEAK_CACHE`` or ``~/.cache/vlweak``."""
    return Path(os.environ.get("VLWEAK_CACHE", Path.home() / ".cache" / "vlweak"))


def cache_key(**parts: Any) -> str:
    """Digest of JSON-serialisable key parts (order-independent)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def atomic_save_tensors(tensors: Mapping[str, Tensor], path: Path, metadata: dict[str, str] | None = None) -> None:
    """Write a safetensors file via a temporary file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp creates 0600; give the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class EmbeddingCache:
    """Embeddings on disk under ``root/<namespace>/<key>.safetensors``.

    Args:
        root: cache folder (default ``$VLWEAK_CACHE`` or ``~/.cache/vlweak``).
        enabled: ``False`` turns every lookup into a miss and every store into a no-op.
    """

    def __init__(self, root: str | os.PathLike | None = None, enabled: bool = True) -> None:
        self.root = Path(root).expanduser() if root else default_cache_dir()
        self.enabled = enabled
        self.hits = 0
        self.misses = 0

    def path(self, key: str, namespace: str = "embeddings") -> Path:
        return self.root / namespace / f"{key}.safetensors"

    def load(self, key: str, namespace: str = "embeddings") -> dict[str, Tensor] | None:
        path = self.path(key, namespace)
        if not self.enabled or not path.is_file():
            self.misses += 1
            return None
        self.hits += 1
        return load_file(str(path))

    def store(self, key: str, tensors: Mapping[str, Tensor], namespace: str = "embeddings", **meta: Any) -> None:
        if self.enabled:
            atomic_save_tensors(tensors, self.path(key, namespace), {"meta": json.dumps(meta, default=str)})

    def get_or_compute(
        self, key: str, compute: Callable[[], dict[str, Tensor]], namespace: str = "embeddings", **meta: Any
    ) -> dict[str, Tensor]:
        """Return the cached tensors for ``key``, computing and storing them on a miss."""
        found = self.load(key, namespace)
        if found is not None:
            return found
        tensors = compute()
        self.store(key, tensors, namespace, **meta)
        return tensors


@torch.no_grad()
def encode_images(
    backbone: Any,
    dataset: Any,
    batch_size: int = 256,
    num_workers: int = 0,
    desc: str = "encoding images",
    progress: bool = True,
) -> dict[str, Tensor]:
    """Encode every image of an (already transformed) dataset: ``{"features": [N, D], "index": [N]}``
    (L2-normalized features; unreadable images skipped when the dataset allows it)."""
    from vlweak.data.datasets import data_loader

    loader = data_loader(dataset, num_workers, batch_size=batch_size)
    feats, index = [], []
    it = loader
    if progress:
        from vlweak.progress import progress_bar

        it = progress_bar(loader, desc=desc)
    for batch in it:
        if not batch:
            continue
        feats.append(backbone.encode_image(batch["image"]).cpu())
        index.append(batch["index"])
    if not feats:
        raise ValueError(f"no readable images in {desc}")
    return {"features": torch.cat(feats), "index": torch.cat(index)}


def image_embeddings(
    backbone: Any,
    dataset: Any,
    transform: Any,
    cache: EmbeddingCache | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    desc: str = "encoding images",
    stream: bool | None = None,
) -> dict[str, Tensor]:
    """Cached :func:`encode_images` of ``dataset`` under ``transform`` with ``backbone``.

    With a cache, datasets of at least :data:`vlweak.data.extract.STREAM_THRESHOLD` images
    (:data:`~vlweak.data.extract.CPU_STREAM_THRESHOLD` on a CPU, in smaller shards), JPEG
    files of any number that a CUDA backbone decodes on its GPU (:func:`vlweak.data.extract.use_gpu_decode`),
    or any dataset with ``stream=True``, are encoded by :func:`vlweak.data.extract.extract_embeddings`:
    sharded, resumable after an interrupt, written straight into the cache entry.
    ``stream=False`` keeps the in-memory loop of :func:`encode_images`."""
    from vlweak.data import extract
    from vlweak.data.datasets import Transformed

    def compute() -> dict[str, Tensor]:
        return encode_images(backbone, Transformed(dataset, transform), batch_size, num_workers, desc)

    if cache is None:
        return compute()
    parts: dict[str, Any] = dict(backbone=backbone.fingerprint(), data=dataset.fingerprint_parts(), transform=repr(transform))
    on_gpu = stream is not False and extract.use_gpu_decode(dataset, transform, backbone.device)
    on_cpu = torch.device(backbone.device).type == "cpu"
    if stream is None:  # a small set of JPEGs on a GPU gains its decoder too (10x a PIL loop)
        stream = len(dataset) >= (extract.CPU_STREAM_THRESHOLD if on_cpu else extract.STREAM_THRESHOLD) or on_gpu
    if not (stream and cache.enabled):
        return cache.get_or_compute(cache_key(**parts), compute, backbone=backbone.fingerprint(), n=len(dataset))
    if on_gpu:
        name, _ = extract.jpeg_decoder(backbone.device)  # GPU-decoded pixels differ slightly from PIL's
        parts["decoder"] = "cuda-jpeg" if name == "torchvision" else f"cuda-jpeg-{name}"
    key = cache_key(**parts)
    found = cache.load(key)
    if found is not None:
        return found
    meta = {"meta": json.dumps({"backbone": backbone.fingerprint(), "n": len(dataset)})}
    extract.extract_embeddings(
        backbone, dataset, transform, cache.path(key), work_dir=cache.root / "shards" / key,
        batch_size=batch_size, num_workers=num_workers or None, desc=desc, metadata=meta,
        shard_size=extract.CPU_SHARD_SIZE if on_cpu else extract.DEFAULT_SHARD_SIZE,
    )
    return load_file(str(cache.path(key)))
