"""Every method under 2-process CPU DDP gives the single-process result (issue: multi-GPU).

Each case runs one recipe twice through the CLI: in this process on one device, and as
``--trainer.devices=2 --trainer.strategy=ddp`` in two processes. Most cases start both ranks with
torchrun, the README's multi-node launch (both ranks import at once), as do the DDP tests of
zero-shot and of the data order; the recipe DualCoOp case and the encoding-error case let Lightning
start the second rank from the first, the one-node path.
Training cases use full-batch epochs (the single run's batch is the two ranks' batches together), so
both runs take the same optimisation steps and must end at the same parameters up to
floating-point order. Zero-shot and ZLaP have their own DDP tests (``test_cli.py``, ``test_zlap.py``).
Pretraining, which trains whole encoders, also runs fully sharded (FSDP on CPU processes through
``cpu_fsdp.CPUFSDPStrategy``), as one unit and with one unit per residual block.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO
from vlweak.cli import build_cli
from vlweak.labels import PseudoLabels


def _common(recipe: str, out: Path, weights: str, world: bool = True) -> list[str]:
    """The recipe with the tiny model on the CPU, logging to ``out``; ``world``: the built-in world
    at the tiny model's size (else the data module is given on files)."""
    world = ["--data.init_args.image_size=32"] if world else []
    return [
        "--config", str(REPO / "recipes" / recipe),
        "--model.init_args.backbone.init_args.model_name=vlweak-tiny",
        f"--model.init_args.backbone.init_args.pretrained={weights}",
        *world,
        "--trainer.accelerator=cpu", "--trainer.enable_progress_bar=false", "--trainer.enable_model_summary=false",
        "--trainer.logger.class_path=lightning.pytorch.loggers.CSVLogger",
        f"--trainer.logger.init_args.save_dir={out}", "--trainer.logger.init_args.name=run",
        "--trainer.logger.init_args.version=0",
    ]


LIGHTNING, TORCHRUN = "lightning", "torchrun"


def _two_processes(args: list[str], launcher: str = TORCHRUN, timeout: int = 300,
                   warnings: bool = False) -> subprocess.CompletedProcess:
    """The vlweak CLI with ``args`` (which ask for 2 devices) as two CPU processes, started by
    torchrun (standalone: both ranks at once, on a free port) or by Lightning (rank 0 starts rank 1);
    Python's warnings in stderr only with ``warnings``. A run still going after ``timeout`` seconds
    fails the test with every process's Python stacks (where it hangs)."""
    start = {
        LIGHTNING: [sys.executable, "-m", "vlweak.cli"],
        TORCHRUN: [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "vlweak.cli"],
    }[launcher]
    # faulthandler: a rank killed by a signal still leaves its Python stack in stderr
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONFAULTHANDLER="1", **({} if warnings else {"PYTHONWARNINGS": "ignore"}))
    proc = subprocess.Popen([*start, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env, cwd=REPO)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        # every process of the run (the ranks, which torchrun starts in sessions of their own, and the
        # launcher) gets SIGABRT, on which faulthandler writes its Python stacks to stderr and ends it
        stuck = [*_descendants(proc.pid), proc.pid]
        for pid in stuck:
            _signal(pid, signal.SIGABRT)
        try:
            out, err = proc.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            for pid in stuck:
                _signal(pid, signal.SIGKILL)
            out, err = proc.communicate()
        pytest.fail(f"the two processes were still running after {timeout} s; their stacks:\n{err[-12000:]}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _descendants(pid: int) -> list[int]:
    """The processes below ``pid``, deepest first (Linux's /proc; none where there is no /proc)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parent = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except OSError:  # ended meanwhile
            continue
        children.setdefault(parent, []).append(int(stat.parent.name))

    def below(p: int) -> list[int]:
        return [d for c in children.get(p, []) for d in (*below(c), c)]

    return below(pid)


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except ProcessLookupError:
        pass


def _both(subcommand: str, recipe: str, tmp_path: Path, weights: str, batch: int, *extra: str,
          strategy: tuple[str, ...] = ("--trainer.strategy=ddp",), world: bool = True,
          launcher: str = TORCHRUN) -> tuple[Path, Path]:
    """Run single-process (batch ``batch``) and 2-process ``strategy`` (``batch // 2`` per rank); return both log dirs."""
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    build_cli([subcommand, *_common(recipe, single, weights, world), f"--data.init_args.batch_size={batch}", *extra])
    evaluating = subcommand != "fit"
    proc = _two_processes([subcommand, *_common(recipe, ddp, weights, world), f"--data.init_args.batch_size={batch // 2}",
                           *extra, "--trainer.devices=2", *strategy], launcher, warnings=evaluating)
    assert proc.returncode == 0, _failure(proc.stderr)
    if evaluating:  # metrics come from every rank's rows, deduplicated: Lightning's generic advice is not shown
        assert "sync_dist=True" not in proc.stderr and "to ensure each sample/batch gets evaluated exactly once" not in proc.stderr, \
            _failure(proc.stderr)
    return single / "run" / "version_0", ddp / "run" / "version_0"


def _failure(stderr: str) -> str:
    """The first traceback of a failed multi-process run (the rank that failed first), any rank's
    native abort (which leaves no Python traceback), and the end."""
    first = stderr.find("Traceback")
    head = stderr[first : first + 4000] if first >= 0 else ""
    aborts = [line for line in stderr.splitlines() if "what():" in line or "Fatal Python error" in line]
    return "\n".join([head, *aborts, "...", stderr[-2000:]])


def _prompt_params(ckpt: Path) -> dict[str, torch.Tensor]:
    sd = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    return {k: v for k, v in sd.items() if "prompt" in k or "ctx" in k}


def _assert_same_params(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a and a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5, msg=k)


def test_chils_ddp_matches_one_process(tmp_path, tiny_ckpt):
    a, b = _both("test", "chils/shapes_coarse.yaml", tmp_path, tiny_ckpt, 8,
                 "--data.init_args.n_test=13", "--data.init_args.n_train=0", "--data.init_args.n_val=0")
    one, two = (PseudoLabels.load(d / "pseudolabels-test.safetensors") for d in (a, b))
    assert len(two) == 13 and two.sample_ids == one.sample_ids  # the sampler's repeat removed
    torch.testing.assert_close(two.scores, one.scores, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("recipe,extra,launcher", [
    ("dualcoop/shapes_partial.yaml", ["--model.init_args.loss_reduction=sum"], TORCHRUN),
    # the recipe's mean over observed labels, which ranks split unevenly
    ("dualcoop/shapes_partial.yaml", [], LIGHTNING),
    ("dualcoop/shapes_single_positive.yaml", ["--model.init_args.apl_warmup_epochs=1"], TORCHRUN),
])
def test_dualcoop_ddp_matches_one_process(tmp_path, tiny_ckpt, recipe, extra, launcher):
    a, b = _both("fit", recipe, tmp_path, tiny_ckpt, 16, "--data.init_args.n_train=16", "--data.init_args.n_val=0",
                 "--data.init_args.n_test=0", "--trainer.max_epochs=3", "--model.init_args.n_ctx=2",
                 "--trainer.limit_val_batches=0", *extra, launcher=launcher)
    one, two = (_prompt_params(d / "checkpoints" / "last.ckpt") for d in (a, b))
    _assert_same_params(one, two)
    if "single_positive" in recipe:  # the pseudo-negatives labeled from gathered, de-duplicated predictions
        p1, p2 = (torch.load(d / "checkpoints" / "last.ckpt", weights_only=False)["apl_pseudo"]["pseudo"] for d in (a, b))
        assert (~p1.isnan()).sum() > 0
        assert torch.equal(p1.isnan(), p2.isnan())


def test_cdul_ddp_matches_one_process(tmp_path, tiny_ckpt):
    a, b = _both("fit", "cdul/shapes.yaml", tmp_path, tiny_ckpt, 16, "--data.init_args.n_train=16",
                 "--data.init_args.n_val=0", "--data.init_args.n_test=0", "--trainer.max_epochs=3",
                 "--model.init_args.label_warmup_epochs=1", "--trainer.limit_val_batches=0")
    for name in ("pseudolabels-train-init.safetensors", "pseudolabels-train-refined.safetensors"):
        one, two = (PseudoLabels.load(d / name) for d in (a, b))
        assert two.sample_ids == one.sample_ids
        torch.testing.assert_close(two.scores, one.scores, rtol=1e-4, atol=1e-5, msg=name)


def test_prompt_tuning_ddp_matches_one_process(tmp_path, tiny_ckpt):
    # batch 64 holds every round's whole training set (2 then 4 per class: 24, then all 48 images,
    # a quarter held out to choose the prompt): full-batch steps. Unsupervised, and a quarter held
    # out, so every round trains on an even number (18, 36): an odd one would make the distributed
    # sampler repeat a sample on one rank, and the two runs would see different batches
    a, b = _both("fit", "prompt_tuning/shapes_unsupervised.yaml", tmp_path, tiny_ckpt, 64,
                 "--data.init_args.n_train=48", "--data.init_args.n_val=0", "--data.init_args.n_test=0",
                 "--model.init_args.rounds=2", "--model.init_args.epochs_per_round=1",
                 "--model.init_args.warmup_epochs=0", "--model.init_args.n_ctx=2", "--model.init_args.holdout=0.25",
                 # rank 1 reaches the rounds folder after rank 0 has written round 0 there: it must not
                 # resume from it (skipping round 0's scoring left its module without the zero-shot
                 # classifier buffer, and the ranks' DDP buffer broadcasts did not match)
                 "--trainer.callbacks+=tests.cli.slow_rank.SlowRank")
    assert len(_same_rounds(a, b, 1)["train_index"]) == 48  # GRIP's last round covers the pool


def _same_rounds(a: Path, b: Path, r: int) -> dict[str, torch.Tensor]:
    """Both fits ended with the same prompt and trained round ``r`` on the same set; that round's file."""
    one, two = (load_file(next(d.parent.rglob("round-final.safetensors"))) for d in (a, b))
    _assert_same_params({k: v for k, v in one.items() if k.startswith("prompt.")},
                        {k: v for k, v in two.items() if k.startswith("prompt.")})
    r1, r2 = (load_file(next(d.parent.rglob(f"round-{r:03d}.safetensors"))) for d in (a, b))
    assert torch.equal(r1["train_index"], r2["train_index"]) and torch.equal(r1["train_label"], r2["train_label"])
    return r1


def test_coop_ddp_matches_one_process(tmp_path, tiny_ckpt):
    # 2 labels per class of 12: batch 24 is the whole labeled set (12 per rank), full-batch steps
    a, b = _both("fit", "coop/shapes_few_shot.yaml", tmp_path, tiny_ckpt, 24,
                 "--data.init_args.n_train=120", "--data.init_args.n_val=0", "--data.init_args.n_test=0",
                 "--data.init_args.shots=2", "--model.init_args.epochs=2", "--model.init_args.warmup_epochs=0",
                 "--model.init_args.n_ctx=2")
    assert len(_same_rounds(a, b, 0)["train_index"]) == 24


_FSDP = "--trainer.strategy.class_path=tests.cli.cpu_fsdp.CPUFSDPStrategy"
_PER_BLOCK = "--trainer.strategy.init_args.auto_wrap_policy=[open_clip.transformer.ResidualAttentionBlock]"  # as recipes/pretrain/fsdp.yaml


# pretraining under plain DDP is the unreadable-images case below
@pytest.mark.parametrize("strategy", [
    (_FSDP,),  # the whole model one FSDP unit
    (_FSDP, _PER_BLOCK),
], ids=["fsdp", "fsdp-per-block"])
def test_pretraining_distributed_matches_one_process_and_exports_once(tmp_path, tiny_ckpt, strategy):
    # the contrastive loss sees the gathered global batch: 16 pairs in one process or 8 + 8 over two.
    # A strong weight decay makes its grouping visible: under FSDP the optimizer sees flat shards, and
    # nested units rename parameters, yet norms, biases and the temperature must stay undecayed
    # no loader worker, for speed: under gloo a worker starts from a fork server (a few seconds;
    # tests/data/test_order.py's DDP test runs one), since a forked one can hang (seen once here)
    a, b = _both("fit", "pretrain/shapes.yaml", tmp_path, tiny_ckpt, 16, "--data.init_args.num_workers=0",
                 "--data.init_args.n_train=16", "--data.init_args.n_val=0", "--data.init_args.n_test=0",
                 "--trainer.max_steps=3", "--trainer.limit_val_batches=0", "--model.init_args.export_path=null",
                 "--model.init_args.export_dtype=fp32", "--model.init_args.weight_decay=1.0", strategy=strategy)
    one, two = (load_file(d / "backbone.safetensors") for d in (a, b))
    start = load_file(tiny_ckpt)
    assert one.keys() == two.keys() == start.keys() and two["logit_scale"].shape == start["logit_scale"].shape
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-4  # it trained
    # attention key biases get no gradient (softmax ignores them), so Adam turns rounding noise in
    # their gradient into full-size steps in both runs; every other weight must agree
    noise = [k for k in one if k.endswith("in_proj_bias")]
    assert len(noise) < len(one) // 4
    _assert_same_params({k: v for k, v in one.items() if k not in noise}, {k: v for k, v in two.items() if k not in noise})


def test_an_error_of_the_rank_that_encodes_stops_every_rank_with_its_message(tmp_path, tiny_ckpt):
    # CDUL encodes its train split on rank 0 while the others wait; here there is none to encode.
    # Every rank must stop with rank 0's one-line error, not wait for it at a barrier.
    proc = _two_processes(["fit", *_common("cdul/shapes.yaml", tmp_path, tiny_ckpt),
                           "--data.init_args.n_train=0", "--data.init_args.n_val=0", "--data.init_args.n_test=0",
                           "--trainer.devices=2", "--trainer.strategy=ddp"], LIGHTNING, timeout=300)
    assert proc.returncode == 2, _failure(proc.stderr)
    message = "vlweak: error: RuntimeError: the data module has no 'train' split to pseudolabel"
    assert proc.stderr.count(message) == 2, _failure(proc.stderr)


def test_pretraining_with_unreadable_images_on_one_rank_matches_one_process(tmp_path, tiny_ckpt):
    # 16 caption pairs, 3 unreadable and skipped (skip_bad: true): the ranks' batches hold different
    # numbers of pairs (an odd number is missing), which their gathers must pad and cut. The global
    # batch is the one process's batch, and InfoNCE does not depend on the order of its pairs.
    from tests.conftest import write_caption_manifest

    manifest = write_caption_manifest(tmp_path / "pairs", 16, bad=3)
    a, b = _both("fit", "pretrain/manifest.yaml", tmp_path, tiny_ckpt, 16, f"--data.init_args.train={manifest}",
                 "--data.init_args.val=null", "--data.init_args.num_workers=0", "--trainer.precision=32",
                 "--trainer.max_epochs=null", "--trainer.max_steps=3", "--trainer.limit_val_batches=0",
                 "--model.init_args.lr=0.003", "--model.init_args.warmup_steps=1", "--model.init_args.export_path=null",
                 world=False)
    one, two = (load_file(d / "backbone.safetensors") for d in (a, b))
    start = load_file(tiny_ckpt)
    assert max((one[k] - start[k]).abs().max().item() for k in one) > 1e-4  # it trained
    noise = [k for k in one if k.endswith("in_proj_bias")]  # as in the pretraining test above
    _assert_same_params({k: v for k, v in one.items() if k not in noise}, {k: v for k, v in two.items() if k not in noise})


def _multilabel_manifest(root: Path, n: int, bad: int) -> Path:
    """``root/train.jsonl``: ``n`` random images with random labels among three classes, the last
    ``bad`` unreadable."""
    import json

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    root.mkdir(parents=True)
    rows = []
    for i in range(n):
        path = root / f"{i}.png"
        if i >= n - bad:
            path.write_bytes(b"not an image")
        else:
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(path)
        labels = [c for c in ("circle", "square", "star") if rng.random() < 0.5] or ["circle"]
        rows.append(json.dumps({"path": path.name, "labels": labels}))
    (root / "train.jsonl").write_text("\n".join(rows) + "\n")
    return root / "train.jsonl"


@pytest.mark.parametrize("method", ["dualcoop", "pretrain"])
def test_a_rank_whose_whole_batch_is_unreadable_takes_part_in_the_step(tmp_path, tiny_ckpt, method):
    # one image per rank and step, 3 of 6 unreadable (skip_bad: true): the ranks hold 3 each, so at
    # some step one rank has an empty batch while the other trains. That rank must still join the
    # step's collectives (DDP's gradient all-reduce, DualCoOp's count of observed labels, the
    # pretraining gathers) and the epoch's exchange, or the other rank waits for it forever.
    if method == "dualcoop":
        manifest = _multilabel_manifest(tmp_path / "data", 6, bad=3)
        recipe, extra = "dualcoop/shapes_partial.yaml", [
            f'--data={{"class_path": "vlweak.data.ManifestDataModule", "init_args": {{"train": "{manifest}", '
            '"skip_bad": true, "batch_size": 1, "label_fraction": 0.5}}', "--model.init_args.n_ctx=2"]
    else:
        from tests.conftest import write_caption_manifest

        manifest = write_caption_manifest(tmp_path / "data", 6, bad=3)
        recipe, extra = "pretrain/manifest.yaml", [
            f"--data.init_args.train={manifest}", "--data.init_args.val=null", "--data.init_args.num_workers=0",
            "--data.init_args.batch_size=1", "--trainer.precision=32", "--trainer.max_epochs=null",
            "--model.init_args.warmup_steps=1", "--model.init_args.export_path=null"]
    proc = _two_processes(["fit", *_common(recipe, tmp_path / "ddp", tiny_ckpt, world=False), *extra,
                           "--trainer.max_epochs=1", "--trainer.limit_val_batches=0", "--trainer.devices=2",
                           "--trainer.strategy=ddp"], timeout=300, warnings=True)
    assert proc.returncode == 0, _failure(proc.stderr)
    skipped = set(re.findall(r"skipping unreadable image (\S+)", proc.stderr))
    assert len(skipped) == 3, _failure(proc.stderr)
    ckpt = torch.load(next((tmp_path / "ddp").rglob("last.ckpt")), weights_only=False)
    assert ckpt["global_step"] == 3  # every step of the epoch taken


def test_pretraining_validation_scores_each_pair_once(tmp_path, tiny_ckpt):
    # 13 validation pairs over two ranks: the distributed sampler repeats one to even them out; the
    # retrieval accuracy and loss are of the 13 pairs, in the one process's global batches of 8
    import csv

    a, b = _both("validate", "pretrain/shapes.yaml", tmp_path, tiny_ckpt, 8, "--data.init_args.num_workers=0",
                 "--data.init_args.n_train=0", "--data.init_args.n_val=13", "--data.init_args.n_test=0",
                 "--trainer.limit_val_batches=1.0", "--model.init_args.export_path=null")
    one, two = ([r for r in csv.DictReader(open(d / "metrics.csv")) if r.get("val/i2t_acc")][-1] for d in (a, b))
    for key in ("val/i2t_acc", "val/loss"):
        assert float(one[key]) == pytest.approx(float(two[key]), abs=1e-5), key


def test_an_unreadable_image_on_another_rank_stops_the_run_in_a_few_lines(tmp_path, tiny_ckpt):
    # rank 1 meets the unreadable image and says so in one line; rank 0, left waiting in a
    # collective, says it stopped with it instead of printing gloo's traceback (Lightning's launch:
    # torchrun ends the other rank itself, with its own report)
    manifest = _multilabel_manifest(tmp_path / "imgs", 4, bad=1)  # the 4th image: rank 1's second
    proc = _two_processes(["test", *_common("quickstart.yaml", tmp_path, tiny_ckpt, world=False),
                           "--data=vlweak.data.ManifestDataModule", f"--data.init_args.test={manifest}",
                           "--data.init_args.classnames=[circle, square, star]", "--data.init_args.batch_size=1",
                           "--figures=false", "--trainer.devices=2", "--trainer.strategy=ddp"], LIGHTNING)
    assert proc.returncode != 0
    assert "vlweak: error: ImageLoadError: cannot decode image" in proc.stderr, _failure(proc.stderr)
    assert "vlweak: error: another process of this run stopped" in proc.stderr, _failure(proc.stderr)
    assert "Traceback" not in proc.stderr, _failure(proc.stderr)
