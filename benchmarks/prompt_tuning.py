"""Pseudolabel prompt tuning: training throughput, and accuracy of the paradigms on the shapes world.

Throughput (textual prompts; image features never change, so they can be cached):

    python benchmarks/prompt_tuning.py throughput [--n 1000] [--epochs 3] [--random-weights]

prints train samples/s for three ways of feeding the training steps: ``embeddings: true`` (cached
features served by the data module, no images loaded), images loaded but features reused from the
run's in-memory pool cache (``cache_features: true``), and images loaded and re-encoded every step
(``cache_features: false``). Runs on the GPU when there is one (``--accelerator cpu`` forces CPU).

Accuracy (zero-shot vs GRIP, or IFPL / FPL with --strategy, textual prompts, three paradigms, several seeds):

    python benchmarks/prompt_tuning.py accuracy --seeds 0 1 2 [--strategy fpl|ifpl]

fits ``recipes/prompt_tuning/shapes_{semisupervised,transductive,unsupervised}.yaml`` (GRIP, or the strategy overlay) and tests
zero-shot CLIP on the same split, printing a markdown table (mean ± std over seeds). ``--sources zlap``
adds GRIP from ZLaP's pseudolabels of the train split (written by ``vlweak predict``) in the
unsupervised paradigm; the last column is the accuracy of the first round's selected pseudolabels.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import lightning as L

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from vlweak.callbacks import PseudolabelRounds  # noqa: E402
from vlweak.cli import build_cli  # noqa: E402
from vlweak.labels.selection import STRATEGIES  # noqa: E402

PARADIGMS = {
    "semi-supervised": "shapes_semisupervised.yaml",
    "transductive zero-shot": "shapes_transductive.yaml",
    "unsupervised": "shapes_unsupervised.yaml",
}


class _TrainTimer(L.Callback):
    """Wall time and samples of the training epochs (setup, pool scan and scoring excluded)."""

    def __init__(self) -> None:
        self.seconds, self.samples, self._t = 0.0, 0, 0.0

    def on_train_epoch_start(self, trainer, pl_module):
        self._t = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.samples += len(batch["index"]) if batch else 0

    def on_train_epoch_end(self, trainer, pl_module):
        self.seconds += time.perf_counter() - self._t


def _common(tmp: Path, accelerator: str, weights: str | None = None) -> list[str]:
    return ([f"--model.init_args.backbone.init_args.pretrained={weights}"] if weights else []) + [
        f"--trainer.logger.init_args.save_dir={tmp}",
        f"--trainer.accelerator={accelerator}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.enable_checkpointing=false",
        "--trainer.callbacks=[]",
        f"--model.init_args.rounds_dir={tmp}/rounds",
        "--model.init_args.resume=false",
    ]


def _cli(recipe: str, extra: list[str], random_weights: bool, tmp: Path):
    args = ["--config", str(REPO / "recipes" / "prompt_tuning" / recipe)]
    if random_weights:
        overlay = tmp / "random.yaml"
        overlay.write_text(
            "model:\n  init_args:\n    backbone:\n      class_path: vlweak.backbones.OpenCLIPBackbone\n"
            "      init_args:\n        model_name: vlweak-shapes\n        pretrained: null\n"
        )
        args += ["--config", str(overlay)]
    return build_cli(args + extra, run=False)


def throughput(args: argparse.Namespace) -> None:
    modes = {
        "cached features (embeddings: true)": ["--data.init_args.embeddings=true"],
        "images loaded, features reused (cache_features)": [
            "--data.init_args.embeddings=false",
            "--model.init_args.cache_features=true",
        ],
        "images loaded and re-encoded": ["--data.init_args.embeddings=false", "--model.init_args.cache_features=false"],
    }
    rows = []
    for name, extra in modes.items():
        with tempfile.TemporaryDirectory() as d:
            tmp = Path(d)
            cli = _cli(
                "shapes_unsupervised.yaml",
                _common(tmp, args.accelerator)
                + extra
                + [
                    "--model.init_args.strategy=grip",
                    "--model.init_args.rounds=1",
                    f"--model.init_args.epochs_per_round={args.epochs}",
                    f"--model.init_args.warmup_epochs={min(1, args.epochs - 1)}",  # below epochs_per_round
                    f"--data.init_args.n_train={args.n}",
                    f"--data.init_args.batch_size={args.batch_size}",
                    f"--data.init_args.num_workers={args.workers}",
                    f"--data.init_args.cache_dir={tmp}/cache",
                ],
                args.random_weights,
                tmp,
            )
            timer = _TrainTimer()
            cli.trainer.callbacks.append(timer)
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            rows.append((name, timer.samples, timer.seconds, str(cli.model.device)))
    print(f"\ntextual prompts, GRIP last round (whole pool), n_train={args.n}, batch {args.batch_size}, {args.epochs} epochs")
    print("| training input | device | samples | seconds | samples/s |")
    print("| --- | --- | ---: | ---: | ---: |")
    for name, n, s, dev in rows:
        print(f"| {name} | {dev} | {n} | {s:.2f} | {n / max(s, 1e-9):.0f} |")


def _test_metrics(cli) -> dict[str, float]:
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    return dict(cli.model.last_metrics)


def _zero_shot(recipe: str, seed: int, tmp: Path, accelerator: str, weights: str | None) -> dict[str, float]:
    cli = _cli(
        recipe,
        _common(tmp, accelerator, weights)
        + [f"--seed_everything={seed}", f"--data.init_args.seed={seed}", f"--data.init_args.budget_seed={seed}"],
        False,
        tmp,
    )
    from vlweak.methods import ZeroShot

    zs = ZeroShot(cli.model.backbone, cli.model.classnames, templates=cli.model.templates, artifact_path="")
    trainer = L.Trainer(accelerator=accelerator, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        default_root_dir=tmp)  # its per-class file goes there, not into the working folder
    trainer.test(zs, datamodule=cli.datamodule, verbose=False)
    from vlweak.methods.prompt_tuning import spread_and_split

    out = dict(zs.last_metrics)
    ds = cli.datamodule.datasets["test"]  # the recipes serve cached features (embeddings: true)
    if hasattr(ds, "features"):
        scores = (ds.features.float() @ zs.build_classifier().cpu().T).softmax(-1)
        extra = spread_and_split(scores, ds.targets_, cli.datamodule.seen_class_indices)
        out.update({f"test/{k}": v for k, v in extra.items()})
    return out


def _source_artifact(kind: str, seed: int, tmp: Path, accelerator: str, weights: str | None) -> str:
    """Pseudolabels of the train split from ZLaP (transductive, the train split is its pool)."""
    path = tmp / f"{kind}-train.safetensors"
    if kind == "zlap":
        cfg = REPO / "recipes" / "zlap" / "shapes_shift.yaml"
    else:
        raise ValueError(f"unknown pseudolabel source {kind!r}")
    cli = build_cli(
        [
            "--config", str(cfg),
            f"--trainer.logger.init_args.save_dir={tmp}",
            f"--trainer.accelerator={accelerator}",
            "--trainer.enable_progress_bar=false",
            f"--model.init_args.artifact_path={path}",
            "--data.init_args.predict_split=train",
            f"--data.init_args.seed={seed}",
            "--data.init_args.shift=1.0",
            "--data.init_args.task=shape",
        ]
        + ([f"--model.init_args.backbone.init_args.pretrained={weights}"] if weights else []),
        run=False,
    )
    cli.trainer.predict(cli.model, datamodule=cli.datamodule, return_predictions=False)
    return str(path)


def accuracy(args: argparse.Namespace) -> None:
    results: dict[str, dict[str, list[float]]] = {}
    for paradigm, recipe in PARADIGMS.items():
        if args.paradigms and paradigm.split()[0] not in args.paradigms:
            continue
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as d:
                tmp = Path(d)
                seeds = [f"--seed_everything={seed}", f"--data.init_args.seed={seed}", f"--data.init_args.budget_seed={seed}", f"--model.init_args.seed={seed}"]
                zs = _zero_shot(recipe, seed, tmp, args.accelerator, args.weights)
                runs = {"zero-shot CLIP": zs}
                sources = ["zeroshot"] + (args.sources if paradigm == "unsupervised" else [])
                for source in sources:
                    extra = []
                    if source != "zeroshot":
                        extra.append(f"--model.init_args.pseudolabels={_source_artifact(source, seed, tmp, args.accelerator, args.weights)}")
                    if args.strategy != "grip":  # the strategy overlay recipe, as a user stacks it
                        extra += ["--config", str(REPO / "recipes" / "prompt_tuning" / f"strategy_{args.strategy}.yaml")]
                    cli = _cli(recipe, _common(tmp, args.accelerator, args.weights) + seeds + extra + args.extra, False, tmp)
                    t = time.perf_counter()
                    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
                    rounds = next(c for c in cli.trainer.callbacks if isinstance(c, PseudolabelRounds))
                    first = rounds.history[0] if rounds.history else {}
                    m = _test_metrics(cli)
                    if "pseudolabel_acc" in first:
                        m["test/round0_pseudolabel_acc"] = first["pseudolabel_acc"]
                    m["fit_seconds"] = time.perf_counter() - t
                    m_ = cli.model  # named from the fitted model: an --extra overlay may change either
                    runs[f"{m_.strategy.upper()} ({m_.hparams.get('prompt', 'textual')})" + ("" if source == "zeroshot" else f" from {source}")] = m
                for name, m in runs.items():
                    slot = results.setdefault(f"{paradigm} | {name}", {})
                    for k, v in m.items():
                        slot.setdefault(k, []).append(float(v))
                print(paradigm, seed, {n: round(m.get("test/acc", float("nan")), 4) for n, m in runs.items()}, flush=True)

    def fmt(vals: list[float] | None) -> str:
        if not vals:
            return "—"
        mean = statistics.fmean(vals)
        sd = statistics.pstdev(vals) if len(vals) > 1 else 0.0
        return f"{100 * mean:.1f} ± {100 * sd:.1f}"

    weights = args.weights or "the recipes' (vlweak-shapes-noisy)"
    print(f"\nshapes world, shift 1.0, seeds {args.seeds}, weights {weights}, {args.strategy} (mean ± std, %)")
    print("| paradigm | method | acc | mean class acc | per-class acc std | per-class acc min | seen | unseen | H | round-0 pseudolabel acc |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
    for key, m in results.items():
        cells = [fmt(m.get(f"test/{k}")) for k in ("acc", "mean_class_acc", "per_class_acc_std", "per_class_acc_min", "acc_seen", "acc_unseen", "acc_harmonic", "round0_pseudolabel_acc")]
        print(f"| {key} | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("throughput")
    t.add_argument("--n", type=int, default=1000)
    t.add_argument("--epochs", type=int, default=3)
    t.add_argument("--batch-size", type=int, default=32)
    t.add_argument("--workers", type=int, default=0)
    t.add_argument("--random-weights", action="store_true", help="vlweak-shapes architecture without the shipped weights")
    t.add_argument("--accelerator", default="auto")
    a = sub.add_parser("accuracy")
    a.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    a.add_argument("--paradigms", nargs="*", default=[], help="semi-supervised, transductive, unsupervised (default: all)")
    a.add_argument("--sources", nargs="*", default=[], help="extra pseudolabel sources for the unsupervised paradigm: zlap")
    a.add_argument("--accelerator", default="auto")
    a.add_argument("--strategy", choices=STRATEGIES, default="grip", help="the recipes' strategy, or an overlay's: recipes/prompt_tuning/strategy_<name>.yaml")
    a.add_argument("--extra", action="append", default=[], help="a CLI override for the GRIP runs, e.g. --extra=--model.init_args.rounds=5 (repeatable)")
    a.add_argument("--weights", default=None, help="backbone weights (a shipped tag such as vlweak-shapes, or a file) instead of the recipes' vlweak-shapes-noisy")
    args = p.parse_args()
    throughput(args) if args.cmd == "throughput" else accuracy(args)


if __name__ == "__main__":
    main()
