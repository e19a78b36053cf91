"""Training throughput of DualCoOp (images/s): vlweak's step against a plain fp32 loop.

vlweak's step: the frozen image tower under the backbone's autocast (bf16 on GPU) and
``torch.no_grad``, the positive and negative prompts of every class through the text tower in one
pass, class-specific region aggregation as one matmul, the asymmetric loss, an SGD step.
The plain loop: everything in fp32, the positive and the negative prompts re-encoded in two separate
text-tower passes every step (otherwise the same math, same loss, same optimizer).
An extra row ("vlweak, fp32") separates what the single pass / no-grad image tower give from what
bf16 gives. The last column is vlweak's step in the epochs after the first, when the region features
of the (unaugmented) training images are kept (``region_cache_gb``) and the image tower is skipped.

Weights are random (no download needed): the timings depend on the architecture, not the values.
Class count, batch and context length default to DualCoOp's COCO setting (80 classes, batch 32,
16 context tokens).

``--files`` instead times whole fits (Lightning, the data module, loader workers, JPEG decoding
and preprocessing) over JPEG files it writes to a temporary folder: images/s of the first epoch and
of the later ones, encoding every step (``region_cache_gb: 0``), keeping region features but still
reading every image (the loader's labels-only items switched off), and keeping them with the loader
serving the labels alone of the images whose features are kept (vlweak's default).

``--accuracy`` instead measures test mAP on the built-in world's multi-label scenes: zero-shot
(ZeroShot, multilabel) against DualCoOp trained with each observed label fraction (the shipped
``vlweak-shapes`` weights, or ``--weights FILE``).

Examples::

    python benchmarks/dualcoop.py --quick                    # CPU, tiny models, seconds
    python benchmarks/dualcoop.py --archs RN50 ViT-B-32      # GPU, bf16 vs fp32
    python benchmarks/dualcoop.py --files --quick               # fits from JPEG files, CPU
    python benchmarks/dualcoop.py --accuracy --fractions 0.1 0.3 0.5 1.0 --epochs 16
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import torch

from vlweak.backbones import OpenCLIPBackbone
from vlweak.data.augment import AUGMENTATIONS
from vlweak.losses import asymmetric_loss
from vlweak.methods.dualcoop import DualCoOp, region_aggregate


def make_method(arch: str, classes: int, n_ctx: int, device: torch.device) -> DualCoOp:
    backbone = OpenCLIPBackbone(arch, pretrained=None)
    names = [f"object {i}" for i in range(classes)]
    return DualCoOp(backbone=backbone, classnames=names, n_ctx=n_ctx, save_mask=False).to(device)


def vlweak_step(m: DualCoOp, images: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    dense = m.region_features({"image": images})
    pos, neg = m.text_features()
    z = m.logits(dense, pos, neg)
    return asymmetric_loss(z, targets, mask)


def kept_step(m: DualCoOp, images: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    dense = m.train_region_features({"image": images, "index": torch.arange(len(images))})
    pos, neg = m.text_features()
    return asymmetric_loss(m.logits(dense, pos, neg), targets, mask)


def plain_step(m: DualCoOp, images: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    bb = m.backbone
    _, dense = bb.encode_image_tokens(images)
    dense = torch.nn.functional.normalize(dense.float(), dim=-1)
    feats = []
    for learner in (m.prompts.positive, m.prompts.negative):  # two separate passes
        feats.append(torch.nn.functional.normalize(bb.encode_text_embeddings(learner.embeddings(), learner.token_ids), dim=-1))
    z = m.scale() * region_aggregate(dense, feats[0], feats[1], m.hparams.spatial_temperature)
    return asymmetric_loss(z, targets, mask)


def throughput(m: DualCoOp, step, precision: str, batch: int, steps: int, warmup: int, device: torch.device) -> float:
    m.backbone.precision = precision
    size = m.backbone.image_size
    g = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, size, size, generator=g).to(device)
    c = len(m.classnames)
    targets = (torch.rand(batch, c, generator=g) < 0.1).float().to(device)
    mask = (torch.rand(batch, c, generator=g) < 0.5).to(device)
    opt = torch.optim.SGD(m.prompts.parameters(), lr=0.002, momentum=0.9)
    for i in range(warmup + steps):
        if i == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        step(m, images, targets, mask).backward()
        opt.step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return batch * steps / (time.perf_counter() - start)


def write_jpegs(root: Path, n: int, size: int, classes: list[str]) -> Path:
    """``n`` smooth random JPEGs of ``size`` px (photo-like file sizes) with 1 to 3 labels each, and
    their multi-label JSONL manifest."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        small = Image.fromarray(rng.integers(0, 255, (size // 8, size // 8, 3), dtype=np.uint8))
        small.resize((size, size), Image.BILINEAR).save(root / f"{i}.jpg", quality=90)
        labels = rng.choice(classes, size=int(rng.integers(1, 4)), replace=False).tolist()
        rows.append(json.dumps({"path": f"{i}.jpg", "labels": labels}))
    (root / "train.jsonl").write_text("\n".join(rows) + "\n")
    return root / "train.jsonl"


def from_files(args: argparse.Namespace, archs: list[str], precision: str, device: torch.device) -> None:
    import lightning as L

    from vlweak.data import ManifestDataModule

    class EpochTimes(L.Callback):
        def __init__(self) -> None:
            self.times: list[float] = []

        def on_train_epoch_start(self, trainer, pl_module) -> None:
            self._start = time.perf_counter()

        def on_train_epoch_end(self, trainer, pl_module) -> None:
            if device.type == "cuda":
                torch.cuda.synchronize()
            self.times.append(time.perf_counter() - self._start)

    root = Path(tempfile.mkdtemp(prefix="vlweak-bench-"))
    names = [f"object {i}" for i in range(args.classes)]
    manifest = write_jpegs(root, args.n_files, args.file_size, names)
    workers = args.workers if args.workers is not None else min(8, os.cpu_count() or 1)
    print(f"{args.n_files} JPEGs of {args.file_size} px, {args.file_epochs} epochs, batch {args.batch}, "
          f"{workers} loader workers, {precision}")
    print("| arch | setting | first epoch (img/s) | later epochs (img/s) | vs encoding every step |")
    print("| --- | --- | --- | --- | --- |")
    settings = [("encoding every step", 0.0, True), ("kept regions, every image read", 4.0, False),
                ("kept regions, labels alone served", 4.0, True)]
    for arch in archs:
        base = None
        for setting, cache_gb, serve in settings:
            torch.manual_seed(0)
            backbone = OpenCLIPBackbone(arch, pretrained=None, precision=precision)
            dm = ManifestDataModule(train=str(manifest), batch_size=args.batch, num_workers=workers, label_fraction=0.5)
            # the manifest's vocabulary (its names sorted), as the CLI links it
            m = DualCoOp(backbone=backbone, classnames=dm.classnames, n_ctx=args.n_ctx, save_mask=False,
                         region_cache_gb=cache_gb)
            if not serve:  # the ablation: features kept, the loader still reads and decodes every image
                m._serve_labels_of_kept = lambda dm: None
            timer = EpochTimes()
            L.Trainer(max_epochs=args.file_epochs, accelerator=device.type, devices=1, logger=False,
                      enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                      limit_val_batches=0, num_sanity_val_steps=0, callbacks=[timer], default_root_dir=root).fit(m, dm)
            first, later = args.n_files / timer.times[0], args.n_files / (sum(timer.times[1:]) / len(timer.times[1:]))
            base = base or later
            print(f"| {arch} | {setting} | {first:.1f} | {later:.1f} | {later / base:.2f}x |")


def accuracy(args: argparse.Namespace) -> None:
    import lightning as L

    from vlweak.data import ShapesWorldDataModule
    from vlweak.methods import ZeroShot

    backbone = OpenCLIPBackbone("vlweak-shapes", pretrained=args.weights)
    quiet = dict(logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                 default_root_dir=tempfile.mkdtemp(prefix="vlweak-bench-"))  # artifacts stay out of the working folder

    def data(fraction: float | None) -> ShapesWorldDataModule:
        return ShapesWorldDataModule(
            multilabel=True, n_train=args.n_train, n_val=32, n_test=args.n_test, batch_size=32,
            label_fraction=fraction, budget_seed=args.seed, augment=args.augment,
        )

    zero_shot = ZeroShot(backbone=backbone, classnames=data(None).classnames, multilabel=True)
    L.Trainer(**quiet).test(zero_shot, data(None), verbose=False)
    print(f"world multi-label scenes: {args.n_train} train / {args.n_test} test images, {args.epochs} epochs, "
          f"lr {args.lr}, loss reduction {args.reduction}, budget seed {args.seed}, augment {args.augment}")
    print("| observed labels | zero-shot mAP | DualCoOp mAP | F1@top3 |")
    print("| --- | --- | --- | --- |")
    for fraction in args.fractions:
        torch.manual_seed(args.seed)
        dm = data(fraction if fraction < 1 else None)
        model = DualCoOp(backbone=backbone, classnames=dm.classnames, save_mask=False, lr=args.lr,
                         loss_reduction=args.reduction, n_ctx=args.n_ctx)
        L.Trainer(max_epochs=args.epochs, limit_val_batches=0, num_sanity_val_steps=0, **quiet).fit(model, dm)
        L.Trainer(**quiet).test(model, dm, verbose=False)
        m = model.last_metrics
        print(f"| {fraction:.0%} | {zero_shot.last_metrics['test/mAP']:.3f} | {m['test/mAP']:.3f} | {m['test/f1_top3']:.3f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--archs", nargs="+", default=None, help="open_clip architectures (default: RN50 ViT-B-32 on GPU)")
    p.add_argument("--classes", type=int, default=80)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--n-ctx", type=int, default=16)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", choices=["bf16", "fp16", "fp32"], default=None,
                   help="vlweak's autocast precision (default: bf16 on GPU, fp32 on CPU)")
    p.add_argument("--quick", action="store_true", help="CPU-sized run: tiny models, 20 classes, batch 8, 4 context tokens")
    p.add_argument("--accuracy", action="store_true", help="test mAP per observed label fraction instead of throughput")
    p.add_argument("--weights", default="vlweak-shapes", help="--accuracy: vlweak-shapes weights (tag or file)")
    p.add_argument("--files", action="store_true", help="time whole fits over JPEG files (first and later epochs)")
    p.add_argument("--n-files", type=int, default=512, help="--files: number of JPEGs")
    p.add_argument("--file-size", type=int, default=256, help="--files: JPEG side in pixels")
    p.add_argument("--file-epochs", type=int, default=3, help="--files: epochs of each fit (at least 2)")
    p.add_argument("--workers", type=int, default=None, help="--files: loader workers (default: the cores, at most 8)")
    p.add_argument("--fractions", nargs="+", type=float, default=[0.1, 0.3, 0.5, 1.0])
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--n-train", type=int, default=2000)
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--lr", type=float, default=0.03)
    p.add_argument("--reduction", choices=["sum", "mean"], default="mean")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--augment", choices=AUGMENTATIONS, default=None,
                   help="--accuracy: training augmentation of the train split (default none)")
    args = p.parse_args()
    if args.accuracy:
        return accuracy(args)
    device = torch.device(args.device)
    if args.quick:
        args.archs = args.archs or ["vlweak-tiny", "vlweak-tiny-rn"]
        args.classes, args.batch, args.n_ctx, args.steps, args.warmup = 20, 8, 4, 5, 1
    archs = args.archs or (["RN50", "ViT-B-32"] if device.type == "cuda" else ["vlweak-tiny", "vlweak-tiny-rn"])
    fast = args.precision or ("bf16" if device.type == "cuda" else "fp32")
    if args.files:
        return from_files(args, archs, fast, device)
    print(f"device {device} ({torch.cuda.get_device_name(device) if device.type == 'cuda' else 'cpu'}), "
          f"{args.classes} classes, batch {args.batch}, {args.n_ctx} context tokens, {args.steps} timed steps")
    print(f"| arch | plain fp32 loop (img/s) | vlweak, fp32 (img/s) | vlweak, {fast} (img/s) | speed-up "
          f"| vlweak, {fast}, kept regions (img/s) | speed-up |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for arch in archs:
        torch.manual_seed(0)
        m = make_method(arch, args.classes, args.n_ctx, device)
        plain = throughput(m, plain_step, "fp32", args.batch, args.steps, args.warmup, device)
        ours32 = throughput(m, vlweak_step, "fp32", args.batch, args.steps, args.warmup, device)
        ours = throughput(m, vlweak_step, fast, args.batch, args.steps, args.warmup, device) if fast != "fp32" else ours32
        kept = throughput(m, kept_step, fast, args.batch, args.steps, args.warmup, device)  # warm-up keeps them
        print(f"| {arch} | {plain:.1f} | {ours32:.1f} | {ours:.1f} | {ours / plain:.2f}x | {kept:.1f} | {kept / plain:.2f}x |")


if __name__ == "__main__":
    main()
