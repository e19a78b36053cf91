"""Streaming, resumable image-embedding extraction into the embedding cache.

Large datasets are encoded in *shards* of ``shard_size`` consecutive samples. Each finished shard is
written atomically to a work folder beside the cache entry; a rerun after an interrupt skips the
shards already on disk and continues at the next one. When every shard is done they are streamed
into one safetensors entry (header first, then each shard's bytes), so no whole-dataset tensor is
ever held in host memory — only one shard of features and the batches in flight.

The hot path, from files to features:

* loader workers (sized to the machine) decode and resize/crop each image to ``uint8`` — four times
  less inter-process traffic than ``float32`` —, the batch moves to the backbone's device
  (pinned memory on CUDA) and is scaled and normalized there in one batched op;
* the image tower runs under the backbone's precision (``bf16`` on a GPU recipe) with large batches;
* on CUDA, JPEG files can be decoded on the GPU (nvJPEG, through TorchCodec's ``decode_jpeg`` when
  its CUDA build is installed — see ``vlweak[decode]`` — else torchvision's, deprecated since
  torchvision 0.29) and resized in batches of equal-sized images (``gpu_decode``); the workers then
  only read file bytes. GPU-decoded pixels differ slightly from PIL's, so the cache key records the
  decoder.

The CPU path computes exactly what :func:`vlweak.data.cache.encode_images` computes (the backbone's
transform split into the per-image part and the batched scale/normalize part).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor
from torch.utils.data import Dataset

from vlweak.data.cache import atomic_save_tensors

#: datasets with at least this many samples go through the sharded extraction in
#: :func:`vlweak.data.cache.image_embeddings` (JPEG files decoded on a GPU go through it at any size).
STREAM_THRESHOLD = 20_000
DEFAULT_SHARD_SIZE = 8192
#: on a CPU, where a ViT-B/32 image tower encodes some 20 images a second, from this many samples,
#: in shards of :data:`CPU_SHARD_SIZE` (a few minutes each): an interrupt loses one shard at most
CPU_STREAM_THRESHOLD = 4096
CPU_SHARD_SIZE = 2048
JPEG_EXTENSIONS = (".jpg", ".jpeg")


def auto_workers(n_items: int | None = None) -> int:
    """Loader workers for this machine: one per CPU core the process may use, minus one for the main
    process (at most 16); none for small jobs, where starting workers costs more than it saves."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    if n_items is not None and n_items < 512:
        return 0
    return max(0, min(16, cores - 1))


# ---------------------------------------------------------------- the transform, split in two
def split_transform(transform: Any) -> tuple[Any, tuple[list[float], list[float]]] | None:
    """``(per-image prefix, (mean, std))`` when ``transform`` is a torchvision v2 ``Compose`` that
    ends with ``ToDtype(float32, scale=True)`` and ``Normalize`` (the backbones' transform): the
    prefix yields ``uint8`` images, and the scale + normalize run batched on the device. ``None``
    for any other transform (then it runs whole in the workers)."""
    from torchvision.transforms import v2

    if not isinstance(transform, v2.Compose) or len(transform.transforms) < 2:
        return None
    *head, to_dtype, norm = transform.transforms
    if not (isinstance(to_dtype, v2.ToDtype) and isinstance(norm, v2.Normalize)):
        return None
    if to_dtype.dtype not in (torch.float32, {torch.Tensor: torch.float32}) or not to_dtype.scale or norm.inplace:
        return None
    if not all(isinstance(t, (v2.ToImage, v2.Resize, v2.CenterCrop, v2.PILToTensor)) for t in head):
        return None
    return v2.Compose(head), (list(norm.mean), list(norm.std))


def gpu_geometry(prefix: Any) -> tuple[int, int] | None:
    """``(shortest side, crop side)`` of a prefix ``[ToImage, Resize(s, bicubic), CenterCrop(c)]``,
    the geometry the GPU decoder reproduces; ``None`` for anything else."""
    from torchvision.transforms import v2

    ts = list(prefix.transforms)
    if len(ts) != 3 or not isinstance(ts[0], (v2.ToImage, v2.PILToTensor)):
        return None
    resize, crop = ts[1], ts[2]
    if not isinstance(resize, v2.Resize) or not isinstance(crop, v2.CenterCrop):
        return None
    size = resize.size if isinstance(resize.size, int) else (resize.size[0] if len(resize.size) == 1 else None)
    if size is None or resize.interpolation != v2.InterpolationMode.BICUBIC or resize.max_size is not None:
        return None
    c = crop.size if isinstance(crop.size, int) else crop.size[0]
    if not isinstance(crop.size, int) and crop.size[0] != crop.size[1]:
        return None
    return int(size), int(c)


class _Prepared(Dataset):
    """``{"image": uint8 [3, H, W], "index"}`` of each readable item (``None`` for a skipped one)."""

    def __init__(self, dataset: Any, transform: Any) -> None:
        self.dataset, self.transform = dataset, transform

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        item = self.dataset[i]
        if item is None:
            return None
        image = item["image"]
        if self.transform is not None:
            image = self.transform(image)
        return {"image": image, "index": int(item.get("index", i))}


class _FileBytes(Dataset):
    """Raw file bytes of a file-backed dataset, for decoding on the GPU."""

    def __init__(self, paths: Sequence[str], skip_bad: bool = False, orientation: bool = True) -> None:
        # orientation: read each file's EXIF orientation tag (only a decoder that applies it needs it)
        self.paths, self.skip_bad, self.orientation = paths, skip_bad, orientation

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> dict[str, Any] | None:
        try:
            data = read_bytes(self.paths[i])
            return {"data": data, "index": i, "oriented": self.orientation and exif_orientation(data) != 1}
        except OSError:
            if self.skip_bad:
                return None
            from vlweak.data.datasets import ImageLoadError

            raise ImageLoadError(f"image not found or unreadable: {self.paths[i]}") from None


def read_bytes(path: str | os.PathLike) -> Tensor:
    """A file's bytes as a 1-D ``uint8`` tensor (what the JPEG decoders take)."""
    return torch.frombuffer(bytearray(Path(path).read_bytes()), dtype=torch.uint8)


def exif_orientation(data: Tensor) -> int:
    """The EXIF orientation tag of an encoded image (1, upright as stored, when absent or unreadable)."""
    import io

    from PIL import Image

    try:
        with Image.open(io.BytesIO(data.numpy().tobytes())) as img:  # reads the header only
            return int(img.getexif().get(0x0112, 1))
    except Exception:  # noqa: BLE001 - a corrupt file is the decoder's to report
        return 1


_CODEC_DECODES_ON: dict[str, bool] = {}


def _tiny_jpeg() -> Tensor:
    """The bytes of an 8 x 8 JPEG, to probe a decoder with."""
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (120, 60, 30)).save(buf, format="JPEG")
    return torch.frombuffer(bytearray(buf.getvalue()), dtype=torch.uint8)


def _codec_decodes_on(device: torch.device | None) -> bool:
    """Whether TorchCodec decodes JPEGs on ``device``: always on the CPU; on CUDA only its CUDA
    build does (PyPI's wheel is CPU-only; the CUDA one comes from PyTorch's index). Probed once per
    device with a tiny JPEG."""
    if device is None or device.type != "cuda":
        return True
    key = str(device)
    if key not in _CODEC_DECODES_ON:
        from torchcodec.decoders import decode_jpeg

        try:
            decode_jpeg(_tiny_jpeg(), mode="RGB", device=device)
            _CODEC_DECODES_ON[key] = True
        except (RuntimeError, ValueError, NotImplementedError):
            _CODEC_DECODES_ON[key] = False
    return _CODEC_DECODES_ON[key]


def jpeg_decoder(device: torch.device | None = None) -> tuple[str, Callable[[list[Tensor] | Tensor, torch.device], Any]]:
    """The JPEG decoder of the GPU path on ``device``, as ``(name, decode(data, device))``:
    TorchCodec's when it imports and decodes there (torchvision's image decoders are deprecated since
    torchvision 0.29), else torchvision's. Both decode with nvJPEG on CUDA and take a list of byte
    tensors as one batch."""
    try:
        from torchcodec.decoders import decode_jpeg as codec_decode

        if not _codec_decodes_on(device):
            raise ImportError("this TorchCodec decodes on the CPU only")
    except (ImportError, OSError, RuntimeError):  # absent, built for another torch, or CPU-only
        import warnings

        from torchvision.io import ImageReadMode
        from torchvision.io import decode_jpeg as vision_decode

        def decode(data: list[Tensor] | Tensor, device: torch.device) -> Any:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                return vision_decode(data, mode=ImageReadMode.RGB, device=device)

        return "torchvision", decode
    return "torchcodec", lambda data, device: codec_decode(data, mode="RGB", device=device)


def _collate_bytes(items: list[dict[str, Any] | None]) -> dict[str, Any]:
    kept = [it for it in items if it is not None]
    if not kept:
        return {}
    return {"data": [it["data"] for it in kept], "index": torch.tensor([it["index"] for it in kept]),
            "oriented": [it["oriented"] for it in kept]}


def _gpu_decode(
    data: list[Tensor],
    paths: list[str],
    size: int,
    crop: int,
    device: torch.device,
    oriented: list[bool] | None = None,
    skip_bad: bool = False,
) -> tuple[Tensor, list[int]]:
    """Decode JPEG bytes on the GPU and resize (bicubic, antialiased; shortest side to ``size``) +
    centre-crop to ``uint8 [B', 3, crop, crop]``, one interpolation per group of equal-sized images;
    also the positions (in ``data``) of the ``B'`` images returned.

    ``oriented`` marks files with an EXIF orientation other than upright. The PIL path (and the
    reference CLIP pipelines) keep the pixels as stored, but TorchCodec turns them upright, so with
    TorchCodec those files are decoded with PIL instead, and every path feeds the model the same pixels.
    A file that neither the GPU decoder nor PIL can read is an :class:`~vlweak.data.datasets.ImageLoadError`,
    or with ``skip_bad`` a warning naming it (as the PIL path gives), and is left out."""
    from torchvision.transforms.v2.functional import pil_to_tensor

    from vlweak.data.datasets import load_or_skip

    name, decode = jpeg_decoder(device)
    if name != "torchcodec":  # torchvision's decoder keeps the stored orientation, as PIL does
        oriented = [False] * len(data)
    elif oriented is None:
        oriented = [exif_orientation(d) != 1 for d in data]
    by_pil = list(oriented)
    batch = [k for k, pil in enumerate(by_pil) if not pil]
    images: list[Tensor] = [torch.empty(0)] * len(data)
    try:
        for k, im in zip(batch, decode([data[k] for k in batch], device) if batch else []):
            images[k] = im
    except RuntimeError:  # e.g. a progressive or CMYK file nvjpeg refuses: decode this batch one by one
        for k in batch:
            try:
                images[k] = decode(data[k], device)
            except RuntimeError:
                by_pil[k] = True
    kept = list(range(len(data)))
    for k, pil in enumerate(by_pil):
        if pil:
            image = load_or_skip(paths[k], skip_bad)
            if image is None:
                kept.remove(k)
            else:
                images[k] = pil_to_tensor(image).to(device)
    images = [images[k] for k in kept]
    out = torch.empty((len(images), 3, crop, crop), dtype=torch.uint8, device=device)
    groups: dict[tuple[int, int], list[int]] = {}
    for k, im in enumerate(images):
        groups.setdefault(tuple(im.shape[-2:]), []).append(k)
    for (h, w), ks in groups.items():
        batch = torch.stack([images[k] for k in ks]).float()
        nh, nw = (size, max(1, int(size * w / h))) if h <= w else (max(1, int(size * h / w)), size)
        batch = torch.nn.functional.interpolate(batch, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
        top, left = int(round((nh - crop) / 2.0)), int(round((nw - crop) / 2.0))
        if top < 0 or left < 0:  # smaller than the crop: pad like CenterCrop
            batch = torch.nn.functional.pad(batch, (max(0, -left), max(0, -left), max(0, -top), max(0, -top)))
            top, left = max(0, top), max(0, left)
        out[ks] = batch[:, :, top : top + crop, left : left + crop].round_().clamp_(0, 255).to(torch.uint8)
    return out, kept


def use_gpu_decode(dataset: Any, transform: Any, device: torch.device, gpu_decode: bool | str = "auto") -> bool:
    """Whether to decode on the GPU: a CUDA backbone, a file-backed dataset of JPEGs, and the
    backbones' standard transform. ``gpu_decode=True`` makes an unmet condition an error."""
    if gpu_decode is False or gpu_decode == "off":
        return False
    reasons = []
    if device.type != "cuda":
        reasons.append("the backbone is not on a CUDA device")
    paths = getattr(dataset, "paths", None)
    if not paths or not all(str(p).lower().endswith(JPEG_EXTENSIONS) for p in paths):
        reasons.append("the dataset is not a file-backed dataset of JPEG files")
    split = split_transform(transform)
    if split is None or gpu_geometry(split[0]) is None:
        reasons.append("the transform is not [ToImage, Resize(bicubic), CenterCrop, ToDtype, Normalize]")
    if reasons and gpu_decode is True:
        raise ValueError("gpu_decode=True but " + "; ".join(reasons))
    return not reasons


# ---------------------------------------------------------------- shards
def _shard_path(work_dir: Path, k: int) -> Path:
    return work_dir / f"shard-{k:06d}.safetensors"


class _ShardBatches:
    """Batch sampler: the pending shards' indices in batches that never cross a shard boundary."""

    def __init__(self, shards: list[tuple[int, range]], batch_size: int) -> None:
        self.plan = [(k, list(r[i : i + batch_size])) for k, r in shards for i in range(0, len(r), batch_size)]

    def __iter__(self) -> Iterator[list[int]]:
        return (b for _, b in self.plan)

    def __len__(self) -> int:
        return len(self.plan)


def _header(path: Path) -> tuple[dict[str, Any], int]:
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return json.loads(f.read(n)), 8 + n


def assemble(shards: Sequence[Path], out: Path, metadata: dict[str, str] | None = None) -> Path:
    """Stream shard files (``features [n, D]``, ``index [n]``) into one safetensors file at ``out``
    (written to a temporary file, then renamed), one shard's bytes in memory at a time."""
    headers = [_header(p) for p in shards]
    if not headers:
        raise ValueError("no shards to assemble")
    n = sum(h["index"]["shape"][0] for h, _ in headers)
    dim = headers[0][0]["features"]["shape"][1]
    fdt, idt = headers[0][0]["features"]["dtype"], headers[0][0]["index"]["dtype"]
    fsize = {"F32": 4, "F16": 2, "BF16": 2}[fdt]
    fbytes, ibytes = n * dim * fsize, n * 8
    header: dict[str, Any] = {
        "features": {"dtype": fdt, "shape": [n, dim], "data_offsets": [0, fbytes]},
        "index": {"dtype": idt, "shape": [n], "data_offsets": [fbytes, fbytes + ibytes]},
    }
    if metadata:
        header["__metadata__"] = {k: str(v) for k, v in metadata.items()}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(text)))
            f.write(text)
            for name in ("features", "index"):
                for p, (h, start) in zip(shards, headers):
                    a, b = h[name]["data_offsets"]
                    with open(p, "rb") as src:
                        src.seek(start + a)
                        left = b - a
                        while left:
                            chunk = src.read(min(left, 1 << 24))
                            f.write(chunk)
                            left -= len(chunk)
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out


@torch.no_grad()
def extract_embeddings(
    backbone: Any,
    dataset: Any,
    transform: Any,
    out: str | os.PathLike,
    *,
    work_dir: str | os.PathLike | None = None,
    shard_size: int = DEFAULT_SHARD_SIZE,
    batch_size: int = 256,
    num_workers: int | None = None,
    gpu_decode: bool | str = "auto",
    progress: bool = True,
    desc: str = "encoding images",
    metadata: dict[str, str] | None = None,
    keep_shards: bool = False,
) -> Path:
    """Encode every image of ``dataset`` (raw items, before ``transform``) into the safetensors
    file ``out`` with ``features [N, D]`` (unit-norm float32) and ``index [N]``, shard by shard.

    Args:
        backbone: the encoder (its device and precision are used as they are).
        dataset: raw dataset (items with ``image`` and ``index``; ``None`` items are skipped).
        transform: the preprocessing (the backbones' transform is split so that scaling and
            normalization run batched on the device).
        out: the final file.
        work_dir: folder of the finished shards (default: ``<out>.shards``); an interrupted run
            restarted with the same folder keeps its finished shards and continues at the next.
        shard_size: samples per shard (the unit of resumption and of host memory).
        batch_size: images per encoder batch.
        num_workers: loader workers (``None``: sized to the machine, see :func:`auto_workers`).
        gpu_decode: ``auto`` decodes JPEG files on the GPU when the backbone is on CUDA and the
            dataset is a JPEG file list; ``True`` requires it; ``False`` never.
        progress: show a tqdm progress bar.
        metadata: string metadata stored in the final file's header.
        keep_shards: keep the work folder after assembling (default: delete it).
    """
    if shard_size < 1 or batch_size < 1:
        raise ValueError(f"shard_size and batch_size must be positive, got {shard_size} and {batch_size}")
    out = Path(out)
    n = len(dataset)
    if n == 0:
        raise ValueError(f"nothing to encode in {desc}: the dataset is empty")
    work = Path(work_dir) if work_dir is not None else out.with_name(out.name + ".shards")
    work.mkdir(parents=True, exist_ok=True)
    plan_file = work / "plan.json"
    plan = {"n": n, "shard_size": shard_size}
    if plan_file.is_file() and json.loads(plan_file.read_text()) != plan:
        for stale in work.glob("shard-*.safetensors"):  # another dataset size or shard size: start over
            stale.unlink()
    plan_file.write_text(json.dumps(plan))

    n_shards = (n + shard_size - 1) // shard_size
    ranges = [range(k * shard_size, min(n, (k + 1) * shard_size)) for k in range(n_shards)]
    pending = [(k, r) for k, r in enumerate(ranges) if not _shard_path(work, k).is_file()]

    if pending:
        _encode_shards(backbone, dataset, transform, work, pending, batch_size, num_workers, gpu_decode,
                       progress, desc, done=n - sum(len(r) for _, r in pending), total=n)

    shards = [_shard_path(work, k) for k in range(n_shards)]
    shards = [p for p in shards if _header(p)[0]["index"]["shape"][0] > 0]
    if not shards:
        raise ValueError(f"no readable images in {desc}")
    assemble(shards, out, metadata)
    if not keep_shards:
        for p in work.glob("shard-*.safetensors"):
            p.unlink()
        plan_file.unlink(missing_ok=True)
        try:
            work.rmdir()
        except OSError:
            pass
    return out


def _encode_shards(
    backbone: Any,
    dataset: Any,
    transform: Any,
    work: Path,
    pending: list[tuple[int, range]],
    batch_size: int,
    num_workers: int | None,
    gpu_decode: bool | str,
    progress: bool,
    desc: str,
    done: int,
    total: int,
) -> None:
    from torchvision.transforms.v2 import functional as TF

    from vlweak.data.datasets import collate, data_loader

    device = backbone.device
    todo = sum(len(r) for _, r in pending)
    workers = auto_workers(todo) if num_workers is None else num_workers
    split = split_transform(transform)
    on_gpu = use_gpu_decode(dataset, transform, device, gpu_decode)
    if on_gpu:
        assert split is not None
        size, crop = gpu_geometry(split[0])  # type: ignore[misc]
        source: Dataset = _FileBytes(dataset.paths, getattr(dataset, "skip_bad", False),
                                     orientation=jpeg_decoder(device)[0] == "torchcodec")
        collate_fn = _collate_bytes
    else:
        source = _Prepared(dataset, split[0] if split is not None else transform)
        collate_fn = collate
    sampler = _ShardBatches(pending, batch_size)
    loader = data_loader(
        source,
        workers,
        batch_sampler=sampler,
        collate_fn=collate_fn,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if workers > 0 else None,
    )
    bar = None
    if progress:
        from vlweak.progress import progress_bar

        bar = progress_bar(total=total, initial=done, desc=desc, unit="img")
    feats: list[Tensor] = []
    index: list[Tensor] = []
    plan = sampler.plan
    for step, batch in enumerate(loader):
        shard, idx = plan[step]
        if batch and on_gpu:  # bytes stay on the host; a file no decoder reads drops out with skip_bad
            paths = [dataset.paths[int(i)] for i in batch["index"]]
            images, kept = _gpu_decode(batch["data"], paths, size, crop, device, batch["oriented"], source.skip_bad)
            batch = {"image": images, "index": batch["index"][kept]} if kept else None
        if batch:
            images = batch["image"].to(device, non_blocking=True)  # (decoded ones are there already)
            if split is not None:
                mean, std = split[1]
                images = TF.normalize(TF.to_dtype(images, torch.float32, scale=True), mean, std)
            feats.append(backbone.encode_image(images).cpu())
            index.append(batch["index"].to(torch.long))
        if bar is not None:
            bar.update(len(idx))
        last_of_shard = step + 1 == len(plan) or plan[step + 1][0] != shard
        if last_of_shard:
            dim = feats[0].shape[1] if feats else backbone.embed_dim
            tensors = {
                "features": torch.cat(feats) if feats else torch.empty(0, dim),
                "index": torch.cat(index) if index else torch.empty(0, dtype=torch.long),
            }
            atomic_save_tensors(tensors, _shard_path(work, shard))
            feats, index = [], []
    if bar is not None:
        bar.close()


def load_features(path: str | os.PathLike, device: str = "cpu") -> dict[str, Tensor]:
    """Read an extracted file back (``features``, ``index``)."""
    with safe_open(str(path), framework="pt", device=device) as f:
        return {k: f.get_tensor(k) for k in f.keys()}
