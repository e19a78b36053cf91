"""Image-embedding throughput (images/s): the ViT-B/32 image tower alone, and end to end from JPEG
files on disk to embeddings.

* **model alone** — random-init ``ViT-B-32`` (weights do not change the timing) on preprocessed
  224 px batches: fp32, bf16 autocast, and ``torch.compile`` (bf16 on GPU, fp32 on CPU). Baseline:
  fp32.
* **end to end** — ``--images`` JPEG files (about 100 KB each, ImageNet-like 500x375) written to a
  temporary folder, encoded by

  - the plain loop: open_clip's preprocess on PIL images in a ``DataLoader`` (float32 batches from
    the workers), the image tower under the same precision — the baseline;
  - vlweak's extraction (:func:`vlweak.data.extract.extract_embeddings`): uint8 from the workers,
    scale/normalize batched on the device, sharded output; on CUDA, JPEG decoding on the GPU.

  Both use the same worker count (sized to the machine unless ``--workers``).

Examples::

    python benchmarks/embeddings.py --quick            # CPU, a few minutes
    python benchmarks/embeddings.py --images 5000 --batch-size 1024   # GPU

Prints one markdown table (``| measurement | device | images/s | ratio |``) and, with ``--json``,
writes the rows to a file for :mod:`benchmarks.run`.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vlweak.backbones import OpenCLIPBackbone  # noqa: E402
from vlweak.data.datasets import ImageFolderReader  # noqa: E402
from vlweak.data.extract import auto_workers, extract_embeddings, jpeg_decoder  # noqa: E402


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def write_jpegs(root: Path, n: int, size: tuple[int, int] = (500, 375), seed: int = 0) -> float:
    """``n`` photo-like JPEGs (smooth colour fields plus texture) under ``root/images``; returns the
    mean file size in KB."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    folder = root / "images"
    folder.mkdir(parents=True, exist_ok=True)
    w, h = size
    total = 0
    for i in range(n):
        low = rng.integers(0, 255, (h // 25 + 1, w // 25 + 1, 3), dtype=np.uint8)
        base = np.asarray(Image.fromarray(low).resize((w, h), Image.BICUBIC), dtype=np.int16)
        noise = rng.integers(-28, 28, (h, w, 1), dtype=np.int16)
        img = Image.fromarray(np.clip(base + noise, 0, 255).astype(np.uint8))
        path = folder / f"{i:06d}.jpg"
        img.save(path, quality=88)
        total += path.stat().st_size
    return total / n / 1024


def model_alone(backbone: OpenCLIPBackbone, batch: int, steps: int, compile_: bool = False) -> float:
    device = backbone.device
    x = torch.randn(batch, 3, 224, 224, device=device)
    fn = backbone.encode_image
    if compile_:
        visual = torch.compile(backbone.model.visual)

        def fn(images):  # the same autocast/normalize as encode_image, around the compiled tower
            with backbone.autocast():
                out = visual(images)
            return torch.nn.functional.normalize(out.float(), dim=-1)

    with torch.no_grad():
        fn(x)  # warm-up (and compilation)
        fn(x)
        _sync(device)
        t = time.perf_counter()
        for _ in range(steps):
            fn(x)
        _sync(device)
    return batch * steps / (time.perf_counter() - t)


def plain_loop(backbone: OpenCLIPBackbone, root: Path, batch: int, workers: int) -> float:
    import open_clip
    from PIL import Image
    from torch.utils.data import DataLoader, Dataset

    preprocess = open_clip.image_transform(backbone.image_size, is_train=False)
    paths = sorted((root / "images").glob("*.jpg"))

    class Files(Dataset):
        def __len__(self):
            return len(paths)

        def __getitem__(self, i):
            with Image.open(paths[i]) as im:
                return preprocess(im.convert("RGB"))

    loader = DataLoader(Files(), batch_size=batch, num_workers=workers, pin_memory=backbone.device.type == "cuda")
    device = backbone.device
    t = time.perf_counter()
    feats = []
    with torch.no_grad():
        for x in loader:
            feats.append(backbone.encode_image(x.to(device, non_blocking=True)).cpu())
    _sync(device)
    return len(paths) / (time.perf_counter() - t)


def vlweak_extraction(backbone: OpenCLIPBackbone, root: Path, batch: int, workers: int, out: Path) -> float:
    # the image folder reader wants class sub-folders: one class, "images"
    ds = ImageFolderReader.read(root)
    t = time.perf_counter()
    extract_embeddings(backbone, ds, backbone.transform, out, batch_size=batch, num_workers=workers,
                       shard_size=max(batch, 4096), progress=False)
    _sync(backbone.device)
    return len(ds) / (time.perf_counter() - t)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--images", type=int, default=2000, help="JPEG files of the end-to-end runs")
    p.add_argument("--batch-size", type=int, default=None, help="default: 512 on GPU, 32 on CPU")
    p.add_argument("--steps", type=int, default=None, help="timed model-alone batches (default: 20 GPU, 3 CPU)")
    p.add_argument("--workers", type=int, default=None, help="loader workers (default: sized to the machine)")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--quick", action="store_true", help="CPU-sized: 64 images, batch 8")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.quick:
        args.images = min(args.images, 64 if not gpu else 1000)
    batch = args.batch_size or (512 if gpu else (8 if args.quick else 32))
    steps = args.steps or (20 if gpu else (1 if args.quick else 3))
    workers = auto_workers() if args.workers is None else args.workers
    name = torch.cuda.get_device_name(device) if gpu else f"cpu ({torch.get_num_threads()} threads)"

    fp32 = OpenCLIPBackbone(args.model, pretrained=None, precision="fp32").to(device)
    bf16 = OpenCLIPBackbone(args.model, pretrained=None, precision="bf16").to(device)
    fast = bf16 if gpu else fp32  # bf16 autocast on CPU is slower than fp32 on most CPUs
    rows = []

    def row(what: str, value: float, base: float | None, baseline: str) -> None:
        rows.append({"suite": "embeddings", "measurement": what, "device": name, "value": value, "unit": "img/s",
                     "ratio": value / base if base else 1.0, "baseline": baseline})
        print(f"| {what} | {name} | {value:.1f} | {value / base if base else 1.0:.2f}x |", flush=True)

    print(f"\n{args.model} image tower, random init, 224 px, batch {batch}, {workers} loader workers")
    print("| measurement | device | images/s | ratio |")
    print("| --- | --- | ---: | ---: |")
    base = model_alone(fp32, batch, steps)
    row("model alone, fp32", base, base, "model alone, fp32")
    row("model alone, bf16", model_alone(bf16, batch, steps), base, "model alone, fp32")
    if not args.no_compile:
        try:
            row(f"model alone, torch.compile ({'bf16' if gpu else 'fp32'})",
                model_alone(fast, batch, steps, compile_=True), base, "model alone, fp32")
        except Exception as err:  # no C++ compiler / triton: say so, keep going
            print(f"| model alone, torch.compile | {name} | failed: {type(err).__name__} | - |")

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        kb = write_jpegs(root, args.images)
        print(f"\nend to end: {args.images} JPEGs of 500x375 (mean {kb:.0f} KB), precision {fast.precision}")
        plain = plain_loop(fast, root, batch, workers)
        row("end to end, open_clip preprocess + PIL + DataLoader", plain, plain, "plain PIL loop")
        ours = vlweak_extraction(fast, root, batch, workers, root / "out.safetensors")
        decoder = jpeg_decoder(fast.device)[0]
        row(f"end to end, vlweak extraction{f' (GPU JPEG decode, {decoder})' if gpu else ''}", ours, plain, "plain PIL loop")
        if gpu and decoder != "torchvision":  # the deprecated decoder it replaces, measured beside it
            saved = sys.modules.get("torchcodec.decoders")
            sys.modules["torchcodec.decoders"] = None  # type: ignore[assignment]
            try:
                other = vlweak_extraction(fast, root, batch, workers, root / "out-torchvision.safetensors")
            finally:
                if saved is None:
                    sys.modules.pop("torchcodec.decoders")
                else:
                    sys.modules["torchcodec.decoders"] = saved
            row("end to end, vlweak extraction (GPU JPEG decode, torchvision)", other, plain, "plain PIL loop")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
