"""CoOp's few-shot curve on the shapes world: zero-shot, a linear probe and CoOp against the shots.

    python benchmarks/coop.py [--shots 1 2 4 8 16] [--seeds 0 1 2] [--epochs N] [--weights vlweak-shapes]

For each number of labeled images per class and each seed (the label draw, the context's
initialisation and the data order), fits ``recipes/coop/shapes_few_shot.yaml`` (the shifted world,
``vlweak-shapes-noisy``, CoOp's defaults; epochs by the paper's schedule: 50 at 1 shot, 100 at 2 and
4, 200 at 8 and 16, or ``--epochs``) and scores on the recipe's 1,000 test images:

* zero-shot CLIP (the template "a photo of a {}."), the same at every shot count;
* a linear probe on the same labeled images' frozen features (a classifier started from the
  zero-shot one, 300 full-batch Adam steps; the paper's baseline is a logistic regression from
  scratch, weaker at few shots);
* CoOp.

Prints a markdown table, mean ± std over the seeds.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from benchmarks.world_headroom import linear_probe  # noqa: E402
from vlweak.cli import build_cli  # noqa: E402
from vlweak.prompts import text_classifier  # noqa: E402

PAPER_EPOCHS = {1: 50, 2: 100, 4: 100, 8: 200, 16: 200}


def run(shots: int, seed: int, epochs: int, weights: str | None, tmp: Path) -> dict[str, float]:
    args = [
        "--config", str(REPO / "recipes" / "coop" / "shapes_few_shot.yaml"),
        f"--trainer.logger.init_args.save_dir={tmp}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.callbacks=[]",
        f"--seed_everything={seed}",
        f"--data.init_args.shots={shots}",
        f"--data.init_args.budget_seed={seed}",
        f"--model.init_args.seed={seed}",
        f"--model.init_args.epochs={epochs}",
        f"--model.init_args.rounds_dir={tmp}/rounds",
        "--model.init_args.resume=false",
    ] + ([f"--model.init_args.backbone.init_args.pretrained={weights}"] if weights else [])
    cli = build_cli(args, run=False)
    t = time.perf_counter()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    seconds = time.perf_counter() - t
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    coop = cli.model.last_metrics["test/acc"]

    dm, backbone = cli.datamodule, cli.model.backbone
    train, test = dm.datasets["train"], dm.datasets["test"]  # cached features (the recipe's embeddings: true)
    labeled = train.targets_ >= 0
    x, y = F.normalize(train.features[labeled].float(), dim=-1), train.targets_[labeled]
    xt, yt = F.normalize(test.features.float(), dim=-1), test.targets_
    zs = text_classifier(backbone, cli.model.classnames, "simple").float().cpu()
    probe = linear_probe(x, y, zs, steps=300)
    probe_pred = (torch.cat([xt, torch.ones(len(xt), 1)], 1) @ probe.T).argmax(-1)
    return {
        "zero-shot": float(((xt @ zs.T).argmax(-1) == yt).float().mean()),
        "linear probe": float((probe_pred == yt).float().mean()),
        "CoOp": coop,
        "labeled": float(labeled.sum()),
        "fit s": seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shots", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="CoOp's epochs at every shot count (default: the paper's schedule)")
    p.add_argument("--weights", default=None, help="backbone weights instead of the recipe's vlweak-shapes-noisy")
    args = p.parse_args()
    rows: dict[int, dict[str, list[float]]] = {}
    for shots in args.shots:
        epochs = args.epochs or PAPER_EPOCHS.get(shots, 200)
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as d:
                m = run(shots, seed, epochs, args.weights, Path(d))
            for k, v in m.items():
                rows.setdefault(shots, {}).setdefault(k, []).append(v)
            print(shots, seed, {k: round(v, 4) for k, v in m.items()}, flush=True)

    def fmt(vals: list[float], pct: bool = True) -> str:
        mean, sd = statistics.fmean(vals), statistics.pstdev(vals) if len(vals) > 1 else 0.0
        return f"{100 * mean:.1f} ± {100 * sd:.1f}" if pct else f"{mean:.0f}"

    weights = args.weights or "vlweak-shapes-noisy"
    print(f"\nshapes world, shift 1.0, {weights}, 1,000 test images, seeds {args.seeds} (top-1 %, mean ± std)")
    print("| shots per class | labeled images | epochs | zero-shot | linear probe | CoOp | CoOp fit (s) |")
    print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for shots, m in rows.items():
        epochs = args.epochs or PAPER_EPOCHS.get(shots, 200)
        print(f"| {shots} | {fmt(m['labeled'], False)} | {epochs} | {fmt(m['zero-shot'])} | {fmt(m['linear probe'])} | "
              f"{fmt(m['CoOp'])} | {fmt(m['fit s'], False)} |")


if __name__ == "__main__":
    main()
