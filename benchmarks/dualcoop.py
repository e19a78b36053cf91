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

``--accuracy`` instead measures test mAP on the built-in world's multi-label scenes: zero-shot
(ZeroShot, multilabel) against DualCoOp trained with each observed label fraction (the shipped
``vlweak-shapes`` weights, or ``--weights FILE``).

Examples::

    python benchmarks/dualcoop.py --quick                    # CPU, tiny models, seconds
    python benchmarks/dualcoop.py --archs RN50 ViT-B-32      # GPU, bf16 vs fp32
    python benchmarks/dualcoop.py --accuracy --fractions 0.1 0.3 0.5 1.0 --epochs 16
"""

from __future__ import annotations

import argparse
import tempfile
import time

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
