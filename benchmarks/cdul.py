"""CDUL snippet scoring cost per image: all crops of a batch cut by one ``unfold`` and encoded as one
batch on the device, against a Python loop with one crop and one encoder call at a time.

    python benchmarks/cdul.py                                  # vlweak-shapes (or vlweak-tiny), CPU/GPU
    python benchmarks/cdul.py --model ViT-B-32 --images 32     # CLIP-size tower (random weights)
    python benchmarks/cdul.py --grids 2 3 4 --device cuda

Prints one row per (grid, implementation): ms per image, crops per second and the speed-up.

``--accuracy`` instead fits ``recipes/cdul/shapes.yaml`` (no labels) once per initialization
(``global``, ``local``, ``aggregated``, and ``aggregated`` with the labels kept fixed) and prints, per
run, the mAP of the initial and the refined pseudolabels on the train pool, of the initial
pseudolabels on the test split, and the trained classifier's test mAP:

    python benchmarks/cdul.py --accuracy [--epochs 30] [--n-train 2000]
"""

from __future__ import annotations

import argparse
import time

import torch

from vlweak.backbones import SHIPPED_WEIGHTS, OpenCLIPBackbone
from vlweak.methods.cdul_snippets import encode_snippets, encode_snippets_loop, snippet_geometry


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_it(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    _sync(device)
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return best


def accuracy(args: argparse.Namespace) -> None:
    import tempfile
    from pathlib import Path

    from vlweak.cli import build_cli

    recipe = str(Path(__file__).resolve().parents[1] / "recipes" / "cdul" / "shapes.yaml")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for mode, scale in (("global", 1.0), ("local", 1.0), ("aggregated", 1.0), ("aggregated", 0.0)):
            common = [
                "--config", recipe, f"--model.init_args.init={mode}", f"--model.init_args.label_scale={scale}", f"--data.init_args.n_train={args.n_train}",
                f"--data.init_args.n_test={args.n_test}", "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false", f"--trainer.logger.init_args.save_dir={tmp}",
                f"--trainer.default_root_dir={tmp}", "--trainer.enable_checkpointing=false", "--trainer.callbacks=[]",
            ]
            cli = build_cli(["fit", *common, f"--trainer.max_epochs={args.epochs}", "--trainer.check_val_every_n_epoch=1000"])
            refined = float(cli.trainer.callback_metrics["train/pseudolabel_mAP"])
            cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
            init = build_cli(["test", *common, "--model.init_args.inference=init"]).model.init_metrics
            name = mode if scale else f"{mode}, labels fixed (label_scale 0)"
            rows.append((name, cli.model.init_metrics[f"init/mAP_{mode}"], refined, init[f"test_init/mAP_{mode}"],
                         cli.model.last_metrics["test/mAP"]))
    print(f"CDUL on the world's multi-label scenes, no labels: {args.n_train} train / {args.n_test} test scenes, "
          f"{args.epochs} epochs (recipes/cdul/shapes.yaml)")
    print("| initialization | pseudolabel mAP, train pool | refined, train pool | init mAP, test | classifier mAP, test |")
    print("| --- | --- | --- | --- | --- |")
    for mode, train_init, refined, test_init, clf in rows:
        print(f"| {mode} | {train_init:.3f} | {refined:.3f} | {test_init:.3f} | {clf:.3f} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="open_clip architecture (default: vlweak-shapes, else vlweak-tiny)")
    p.add_argument("--images", type=int, default=64, help="images per batch")
    p.add_argument("--grids", type=int, nargs="+", default=[2, 3, 4])
    p.add_argument("--overlap", type=float, default=0.0)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--loop-images", type=int, default=8, help="images timed for the (slow) per-crop loop")
    p.add_argument("--accuracy", action="store_true", help="mAP of each initialization and its classifier instead")
    p.add_argument("--epochs", type=int, default=30, help="--accuracy: training epochs (the recipe's)")
    p.add_argument("--n-train", type=int, default=2000, help="--accuracy: unlabeled train scenes")
    p.add_argument("--n-test", type=int, default=1000, help="--accuracy: test scenes")
    args = p.parse_args()
    if args.accuracy:
        return accuracy(args)

    if args.model is None:
        shipped = SHIPPED_WEIGHTS["vlweak-shapes"].is_file()
        name, weights = ("vlweak-shapes", "vlweak-shapes") if shipped else ("vlweak-tiny", None)
    else:
        name, weights = args.model, None
    device = torch.device(args.device)
    backbone = OpenCLIPBackbone(name, pretrained=weights, precision=args.precision).to(device)
    torch.manual_seed(0)

    rows = []
    for grid in args.grids:
        _, source = snippet_geometry(backbone.image_size, grid, args.overlap)
        images = torch.randn(args.images, 3, source, source, device=device)
        t_batch = time_it(lambda: encode_snippets(backbone, images, grid, args.overlap), device, args.repeats)
        few = images[: args.loop_images]
        t_loop = time_it(lambda: encode_snippets_loop(backbone, few, grid, args.overlap), device, 1)
        per_b = 1e3 * t_batch / len(images)
        per_l = 1e3 * t_loop / len(few)
        crops = grid * grid
        rows.append((grid, "batched (unfold, one encoder call)", per_b, crops * 1e3 / per_b, per_l / per_b))
        rows.append((grid, "per-crop Python loop", per_l, crops * 1e3 / per_l, 1.0))

    print(f"CDUL snippet scoring: {name} ({backbone.image_size}px crops), {device}, {args.precision}, "
          f"overlap {args.overlap}, {args.images} images batched / {args.loop_images} looped, torch threads {torch.get_num_threads()}")
    print(f"{'grid':>5} | {'implementation':<34} | {'ms / image':>10} | {'crops / s':>10} | {'speed-up':>8}")
    print("-" * 80)
    for grid, impl, ms, cps, speed in rows:
        print(f"{grid:>3}x{grid:<1} | {impl:<34} | {ms:>10.2f} | {cps:>10.0f} | {speed:>7.1f}x")


if __name__ == "__main__":
    main()
