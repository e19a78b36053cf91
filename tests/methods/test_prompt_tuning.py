"""Pseudolabel prompt tuning: rounds, resume after an interrupt, paradigms, and (with the shipped
weights) GRIP beating zero-shot on the shifted world."""

import logging
import math
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from tests.conftest import REPO, requires_shipped
from vlweak.callbacks import PseudolabelRounds
from vlweak.cli import build_cli
from vlweak.labels import PseudoLabels
from vlweak.methods.prompt_tuning import spread_and_split

TINY = {"class_path": "vlweak.backbones.OpenCLIPBackbone", "init_args": {"model_name": "vlweak-tiny", "pretrained": None}}


def _recipe(tmp_path: Path, model: dict, data: dict, name: str = "r.yaml") -> Path:
    cfg = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu",
            "devices": 1,
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": str(tmp_path / "runs")}},
            "enable_checkpointing": False,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "limit_val_batches": 0,
            "num_sanity_val_steps": 0,
        },
        "model": {"class_path": "vlweak.methods.PromptTuning", "init_args": model},
        "data": {"class_path": "vlweak.data.ShapesWorldDataModule", "init_args": data},
    }
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def _fit(recipe: Path, *extra: str, callbacks: list | None = None, ckpt_path: str | None = None):
    cli = build_cli(["--config", str(recipe), *extra], run=False)
    cli.trainer.callbacks.extend(callbacks or [])
    cli.trainer.fit(cli.model, datamodule=cli.datamodule, ckpt_path=ckpt_path)
    return cli


def _rounds(cli) -> PseudolabelRounds:
    return next(c for c in cli.trainer.callbacks if isinstance(c, PseudolabelRounds))


class _InterruptAtRound(L.Callback):
    def __init__(self, at: int, save: Path | None = None) -> None:
        self.at, self.save = at, save

    def on_train_epoch_start(self, trainer, pl_module):
        if _rounds_of(trainer).round >= self.at:
            if self.save is not None:  # what a ModelCheckpoint(save_last=True) would have left
                trainer.save_checkpoint(self.save)
            raise RuntimeError("interrupted")


def _round_metrics(cli) -> set[tuple[int, str, float]]:
    """(step, name, value) of every ``rounds/*`` metric the fit's CSV logger wrote."""
    import csv

    cli.trainer.logger.save()
    with open(Path(cli.trainer.logger.log_dir) / "metrics.csv") as f:
        return {(int(row["step"]), k, round(float(v), 6)) for row in csv.DictReader(f)
                for k, v in row.items() if k.startswith("rounds/") and v not in ("", None)}


def _rounds_of(trainer) -> PseudolabelRounds:
    return next(c for c in trainer.callbacks if isinstance(c, PseudolabelRounds))


TINY_MODEL = {"backbone": TINY, "strategy": "grip", "rounds": 3, "n_ctx": 2, "epochs_per_round": 1, "warmup_epochs": 0}
TINY_DATA = {"n_train": 96, "n_val": 0, "n_test": 48, "shots": 1, "embeddings": True, "batch_size": 32, "shift": 1.0}


def test_resume_after_interrupt_skips_finished_rounds(tmp_path, monkeypatch):
    recipe = _recipe(tmp_path, TINY_MODEL, TINY_DATA)
    full = _fit(recipe, f"--model.init_args.rounds_dir={tmp_path / 'full'}")
    assert _rounds(full).rounds_trained == [0, 1, 2]
    assert (tmp_path / "full" / "round-final.safetensors").is_file()

    rounds_dir = tmp_path / "interrupted"
    with pytest.raises(RuntimeError, match="interrupted"):
        _fit(recipe, f"--model.init_args.rounds_dir={rounds_dir}", callbacks=[_InterruptAtRound(2)])
    names = sorted(p.name for p in rounds_dir.glob("round-*.safetensors"))
    assert names == ["round-000.safetensors", "round-001.safetensors", "round-002.safetensors"]

    # resuming reads round 2's pseudolabels back (no re-scoring) and trains round 2 only
    from vlweak.methods.prompt_tuning import PromptTuning

    calls = []
    original = PromptTuning.score_unlabeled
    monkeypatch.setattr(PromptTuning, "score_unlabeled", lambda self, source: calls.append(source) or original(self, source))
    resumed = _fit(recipe, f"--model.init_args.rounds_dir={rounds_dir}")
    assert _rounds(resumed).rounds_trained == [2]
    assert calls == []
    assert resumed.trainer.current_epoch == 1
    # ... and ends where the uninterrupted run ended
    for (n, a), (_, b) in zip(full.model.prompt_parameters(), resumed.model.prompt_parameters()):
        assert torch.allclose(a, b, atol=1e-6), n

    # a finished run restarted with the same folder trains nothing and keeps the final prompt
    again = _fit(recipe, f"--model.init_args.rounds_dir={rounds_dir}")
    assert _rounds(again).rounds_trained == []
    assert torch.allclose(again.model.text_prompt.ctx, resumed.model.text_prompt.ctx)

    # checkpoints of another run (different strategy) are refused, naming the folder
    other = _recipe(tmp_path, dict(TINY_MODEL, strategy="ifpl", k=2), TINY_DATA, "other.yaml")
    with pytest.raises(ValueError, match="different run"):
        _fit(other, f"--model.init_args.rounds_dir={rounds_dir}")
    # so are those of another global batch (batch size x devices, precision, accumulation): other steps, other prompts
    with pytest.raises(ValueError, match=r"different run \(batches: \{.*'global_batch_size': 32.*\} != \{.*'global_batch_size': 16"):
        _fit(recipe, f"--model.init_args.rounds_dir={rounds_dir}", "--data.init_args.batch_size=16")


def test_a_crash_while_scoring_keeps_the_trained_round(tmp_path, monkeypatch):
    from vlweak.methods.prompt_tuning import PromptTuning

    recipe = _recipe(tmp_path, TINY_MODEL, TINY_DATA)
    full = _fit(recipe, f"--model.init_args.rounds_dir={tmp_path / 'full'}")
    original, calls = PromptTuning.score_unlabeled, []

    def crash_after_round_0(self, source):
        calls.append(source)
        if len(calls) == 2:  # round 0 trained; its prompt is scoring the pool
            raise RuntimeError("interrupted while scoring")
        return original(self, source)

    folder = tmp_path / "rounds"
    monkeypatch.setattr(PromptTuning, "score_unlabeled", crash_after_round_0)
    with pytest.raises(RuntimeError, match="interrupted while scoring"):
        _fit(recipe, f"--model.init_args.rounds_dir={folder}")
    monkeypatch.setattr(PromptTuning, "score_unlabeled", lambda self, source: calls.append(source) or original(self, source))
    calls.clear()
    resumed = _fit(recipe, f"--model.init_args.rounds_dir={folder}")
    assert _rounds(resumed).rounds_trained == [1, 2]  # round 0 is not trained again
    assert calls[0] is False  # the kept prompt scores the pool
    for (n, a), (_, b) in zip(full.model.prompt_parameters(), resumed.model.prompt_parameters()):
        assert torch.allclose(a, b, atol=1e-6), n


def test_default_rounds_folder_resumes_the_same_configuration_only(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    recipe = _recipe(tmp_path, TINY_MODEL, TINY_DATA)
    with pytest.raises(RuntimeError, match="interrupted"):
        _fit(recipe, callbacks=[_InterruptAtRound(1)])
    folders = list((tmp_path / "runs" / "lightning_logs" / "rounds").iterdir())
    assert len(folders) == 1 and (folders[0] / "round-001.safetensors").is_file()
    resumed = _fit(recipe)  # no rounds_dir: the same configuration finds its folder again
    assert _rounds(resumed).rounds_trained == [1, 2]
    assert f"resuming round 2 of 3 from {folders[0]} (rounds done: 1)" in caplog.text
    _fit(recipe)
    assert "all 3 rounds of this run are done" in caplog.text
    # another labeled set (budget seed) is another run: its own folder, all rounds trained ...
    other = _fit(recipe, "--data.init_args.budget_seed=1")
    assert _rounds(other).rounds_trained == [0, 1, 2]
    assert len(list((tmp_path / "runs" / "lightning_logs" / "rounds").iterdir())) == 2
    # ... and refused in a folder holding the first run's rounds, naming what differs
    with pytest.raises(ValueError, match="labeled_set"):
        _fit(recipe, "--data.init_args.budget_seed=1", f"--model.init_args.rounds_dir={folders[0]}")
    with pytest.raises(ValueError, match="training"):
        _fit(recipe, "--model.init_args.lr=0.5", f"--model.init_args.rounds_dir={folders[0]}")
    # the same settings on other images (another draw of the world, no labels either way) are another run
    unlabeled = _fit(recipe, "--data.init_args.shots=0")
    assert _rounds(unlabeled).rounds_trained == [0, 1, 2]
    other_images = _fit(recipe, "--data.init_args.shots=0", "--data.init_args.seed=7")
    assert _rounds(other_images).rounds_trained == [0, 1, 2]
    assert len(list((tmp_path / "runs" / "lightning_logs" / "rounds").iterdir())) == 4


def test_a_fresh_start_removes_the_rounds_of_an_earlier_run(tmp_path):
    recipe = _recipe(tmp_path, TINY_MODEL, TINY_DATA)
    folder = tmp_path / "rounds"
    _fit(recipe, f"--model.init_args.rounds_dir={folder}")
    assert (folder / "round-final.safetensors").is_file()
    with pytest.raises(RuntimeError, match="interrupted"):
        _fit(recipe, f"--model.init_args.rounds_dir={folder}", "--model.init_args.resume=false",
             "--model.init_args.seed=5", callbacks=[_InterruptAtRound(1)])
    assert sorted(p.name for p in folder.glob("round-*")) == ["round-000.safetensors", "round-001.safetensors"]
    resumed = _fit(recipe, f"--model.init_args.rounds_dir={folder}", "--model.init_args.seed=5")
    assert _rounds(resumed).rounds_trained == [1, 2]  # not the earlier run's final prompt


def test_a_lightning_checkpoint_continues_the_rounds_exactly_where_it_was_written(tmp_path, monkeypatch):
    """Two epochs a round, 3 then 4 then 5 batches an epoch as the pseudolabels grow; each round's
    prompt is its first epoch's (held out as the best). Resumed from the middle of an epoch, from
    the checkpoint after a round's last batch (its pseudolabels still to choose, the next round's set
    longer) and from an epoch's end inside a round, every fit ends with the uninterrupted prompt."""
    from lightning.pytorch.callbacks import ModelCheckpoint
    from vlweak.methods.prompt_tuning import PromptTuning

    monkeypatch.setattr(PromptTuning, "held_out_accuracy", lambda self: 0.5 + 0.5 * (_rounds_of(self.trainer).epoch_in_round == 0))

    recipe = _recipe(tmp_path, dict(TINY_MODEL, epochs_per_round=2), dict(TINY_DATA, batch_size=16))
    ckpts = tmp_path / "ckpts"
    full = _fit(recipe, f"--model.init_args.rounds_dir={tmp_path / 'full'}", "--trainer.enable_checkpointing=true",
                callbacks=[ModelCheckpoint(ckpts, "{step}", every_n_train_steps=1, save_top_k=-1),
                           ModelCheckpoint(ckpts, "{epoch}", save_on_train_epoch_end=True, save_top_k=-1)])
    assert full.trainer.global_step == 24 and _rounds(full).rounds_trained == [0, 1, 2]
    for name, started in [("step=5", [1, 2]), ("step=6", [1, 2]), ("epoch=2", [2])]:
        ckpt = torch.load(ckpts / f"{name}.ckpt", weights_only=False)
        state = ckpt["callbacks"]["PseudolabelRounds"]
        folder = tmp_path / name  # the rounds folder as it was when the checkpoint was written
        folder.mkdir()
        for r in range(state["round"] + 1):
            for f in (f"round-{r:03d}.safetensors", f"pseudolabels-round-{r:03d}.safetensors"):
                (folder / f).write_bytes((tmp_path / "full" / f).read_bytes())
        resumed = _fit(recipe, f"--model.init_args.rounds_dir={folder}", ckpt_path=str(ckpts / f"{name}.ckpt"))
        assert resumed.trainer.global_step == 24, name
        assert _rounds(resumed).rounds_trained == started, name
        for (n, a), (_, b) in zip(full.model.prompt_parameters(), resumed.model.prompt_parameters()):
            torch.testing.assert_close(b, a, msg=f"{name}: {n}")
        # the round metrics the resumed fit logs are the uninterrupted fit's, at the same steps
        logged = _round_metrics(resumed)
        assert logged and logged <= _round_metrics(full), name
        assert min(step for step, _, _ in logged) >= ckpt["global_step"], name
    assert state["epoch_in_round"] == 1 and not state["end_pending"]
    # a checkpoint whose round has no training set in the rounds folder is refused, naming the file
    with pytest.raises(ValueError, match=r"round 2 of 3, whose training set .*round-001.safetensors is missing"):
        _fit(recipe, f"--model.init_args.rounds_dir={tmp_path / 'empty'}", ckpt_path=str(ckpts / "epoch=2.ckpt"))


def test_a_checkpoint_resumed_with_settings_that_key_other_rounds_names_its_folder(tmp_path):
    # the default rounds folder is keyed by the settings the rounds depend on: another global batch
    # looks for the round's training set elsewhere, and the message says where the checkpoint's are
    from lightning.pytorch.callbacks import ModelCheckpoint

    recipe = _recipe(tmp_path, dict(TINY_MODEL, rounds=2, epochs_per_round=2), dict(TINY_DATA, batch_size=16))
    ckpts = tmp_path / "ckpts"
    full = _fit(recipe, "--trainer.enable_checkpointing=true",
                callbacks=[ModelCheckpoint(ckpts, "{epoch}", save_on_train_epoch_end=True, save_top_k=-1)])
    with pytest.raises(ValueError, match=r"the checkpoint's rounds are in .*rounds.*, and this run's settings key another folder"):
        _fit(recipe, "--data.init_args.batch_size=8", ckpt_path=str(ckpts / "epoch=2.ckpt"))
    resumed = _fit(recipe, ckpt_path=str(ckpts / "epoch=2.ckpt"))  # the same settings continue
    assert resumed.trainer.global_step == full.trainer.global_step


def test_transductive_zero_shot_and_artifact_source(tmp_path):
    data = dict(TINY_DATA, shots=None, seen_classes=0.62)
    first = _fit(_recipe(tmp_path, dict(TINY_MODEL, strategy="fpl", k=3), data), "--model.init_args.rounds_dir=" + str(tmp_path / "a"))
    m, dm = first.model, first.datamodule
    seen = dm.seen_class_indices
    assert len(seen) == 7 and m.pseudolabel_classes == [c for c in range(12) if c not in seen]
    from vlweak.callbacks.pseudolabel_rounds import RoundState

    r0 = RoundState.load(tmp_path / "a" / "round-000.safetensors")
    pseudo = r0.train_label[r0.pseudo]
    assert len(pseudo) and all(int(c) not in seen for c in pseudo)  # pseudolabels only for unseen classes
    assert all(int(c) in seen for c in r0.train_label[~r0.pseudo])  # labels only for seen classes
    first.trainer.test(m, datamodule=dm)
    for key in ("acc_seen", "acc_unseen", "acc_harmonic", "per_class_acc_std", "per_class_acc_min"):
        assert f"test/{key}" in m.last_metrics

    # a saved artifact as the pseudolabel source: round 0 takes its labels, aligned by sample id
    art = tmp_path / "a" / "pseudolabels-round-000.safetensors"
    second = _fit(
        _recipe(tmp_path, dict(TINY_MODEL, strategy="fpl", k=3, pseudolabels=str(art)), data, "b.yaml"),
        "--model.init_args.rounds_dir=" + str(tmp_path / "b"),
    )
    r0b = RoundState.load(tmp_path / "b" / "round-000.safetensors")
    assert torch.equal(r0b.train_index, r0.train_index) and torch.equal(r0b.train_label, r0.train_label)
    assert second.model.pseudolabels == str(art)

    # ... but not on another draw of the world (same split and positions, other images) ...
    from vlweak.labels.artifact import ArtifactError, PseudoLabels

    with pytest.raises(ArtifactError, match="no pseudolabel"):
        _fit(_recipe(tmp_path, dict(TINY_MODEL, strategy="fpl", k=3, pseudolabels=str(art)), dict(data, shift=0.5), "c.yaml"),
             "--model.init_args.rounds_dir=" + str(tmp_path / "c"))
    # ... and a multi-label artifact is refused by name
    pl = PseudoLabels.load(art)
    multi = tmp_path / "multi.safetensors"
    PseudoLabels.from_scores(pl.scores, pl.classnames, pl.sample_ids, pl.indices, multilabel=True).save(multi)
    with pytest.raises(ValueError, match="multi.safetensors are multi-label"):
        _fit(_recipe(tmp_path, dict(TINY_MODEL, strategy="fpl", k=3, pseudolabels=str(multi)), data, "d.yaml"),
             "--model.init_args.rounds_dir=" + str(tmp_path / "d"))
    # ... and one filtered to its confident rows is named as such (the strategy picks among all images)
    part = tmp_path / "confident.safetensors"
    pl[pl.confidences > pl.confidences.median()].save(part)
    with pytest.raises(ArtifactError, match=rf"confident.safetensors score {len(PseudoLabels.load(part))} of the "
                                            rf"{len(pl)} unlabeled images: FPL chooses its own pseudolabels"):
        _fit(_recipe(tmp_path, dict(TINY_MODEL, strategy="fpl", k=3, pseudolabels=str(part)), data, "e.yaml"),
             "--model.init_args.rounds_dir=" + str(tmp_path / "e"))
    # in Python, an artifact object is told to be saved first (a run names its source by path)
    from vlweak.methods import PromptTuning

    with pytest.raises(TypeError, match=r"save it first, e.g. pl.save"):
        PromptTuning(backbone=None, classnames=pl.classnames, pseudolabels=pl)


def test_augmented_training_pseudolabels_from_unaugmented_scans(tmp_path):
    """With ``augment`` the train steps see augmented images, but the pool's features, and so the
    pseudolabels of every round, are those of the evaluation transform."""
    from vlweak.callbacks.pseudolabel_rounds import RoundState

    model = dict(TINY_MODEL, strategy="fpl", k=3)
    data = dict(TINY_DATA, embeddings=False)
    plain = _fit(_recipe(tmp_path, model, data), f"--model.init_args.rounds_dir={tmp_path / 'plain'}")
    aug = build_cli(["--config", str(_recipe(tmp_path, model, dict(data, augment="flip"), "aug.yaml")),
                     f"--model.init_args.rounds_dir={tmp_path / 'aug'}"], run=False)
    seen = []
    original = aug.model.batch_features

    def spy(batch, train=False):
        if train:
            seen.append((batch["index"].cpu(), batch["image"].cpu()))
        return original(batch, train)

    aug.model.batch_features = spy
    aug.trainer.fit(aug.model, datamodule=aug.datamodule)
    # the pool scan: the same features, so the same pseudolabels
    a, b = (RoundState.load(tmp_path / d / "round-000.safetensors") for d in ("plain", "aug"))
    assert torch.equal(a.train_index, b.train_index) and torch.equal(a.train_label, b.train_label)
    # the train steps: images of the flip preset (each the evaluation image or its mirror, some
    # mirrored), encoded every step instead of read from the cached pool features
    raw, tf = aug.datamodule.raw("train"), aug.model.backbone.transform
    mirrored = []
    for index, images in seen:
        for i, img in zip(index.tolist(), images):
            ref = tf(raw[i]["image"])
            assert torch.allclose(img, ref, atol=1e-5) or torch.allclose(img, ref.flip(-1), atol=1e-5)
            mirrored.append(not torch.allclose(img, ref, atol=1e-5))
    assert 0 < sum(mirrored) < len(mirrored)
    assert not torch.allclose(plain.model.text_prompt.ctx, aug.model.text_prompt.ctx)
    assert aug.model.round_hyperparameters()["augment"] == "flip"
    assert "augment" not in plain.model.round_hyperparameters()


def test_spread_and_split_metrics():
    scores = torch.eye(3)[[0, 0, 1, 2, 2, 2]]
    targets = torch.tensor([0, 1, 1, 2, 2, 0])
    out = spread_and_split(scores, targets, seen=[0])
    # per-class accuracy: 1/2, 1/2, 1
    assert out["per_class_acc_min"] == pytest.approx(0.5)
    assert out["per_class_acc_std"] == pytest.approx(torch.tensor([0.5, 0.5, 1.0]).std(unbiased=False).item())
    assert out["acc_seen"] == pytest.approx(0.5) and out["acc_unseen"] == pytest.approx(0.75)
    assert out["acc_harmonic"] == pytest.approx(0.6)


def test_bad_arguments_are_named():
    from vlweak.backbones import OpenCLIPBackbone
    from vlweak.methods import PromptTuning

    bb = OpenCLIPBackbone("vlweak-tiny", pretrained=None)
    with pytest.raises(ValueError, match="prompt"):
        PromptTuning(bb, ["a", "b"], prompt="audio")
    with pytest.raises(ValueError, match="strategy"):
        PromptTuning(bb, ["a", "b"], strategy="grp")
    with pytest.raises(ValueError, match="single-label"):
        PromptTuning(bb, ["a", "b"], multilabel=True)
    with pytest.raises(ValueError, match="warmup must be 'constant' or 'linear', got 'ramp'"):
        PromptTuning(bb, ["a", "b"], warmup="ramp")


def test_warm_up_is_constant_or_the_paper_codes_linear_ramp():
    from vlweak.backbones import OpenCLIPBackbone
    from vlweak.methods import PromptTuning

    bb = OpenCLIPBackbone("vlweak-tiny", pretrained=None)
    kw = dict(lr=0.1, warmup_epochs=5, epochs_per_round=15, n_ctx=2)
    constant = PromptTuning(bb, ["a", "b"], **kw)
    linear = PromptTuning(bb, ["a", "b"], warmup="linear", **kw)
    assert [constant.lr_at(e) for e in range(5)] == pytest.approx([1e-4] * 5)
    assert [linear.lr_at(e) for e in range(5)] == pytest.approx([0.0, 0.02, 0.04, 0.06, 0.08])
    cosine = [0.05 * (1 + math.cos(math.pi * e / 10)) for e in range(10)]
    assert [linear.lr_at(e) for e in range(5, 15)] == pytest.approx(cosine)
    assert [constant.lr_at(e) for e in range(5, 15)] == pytest.approx(cosine)
    # a run's identity names the ramp only when it is not the default
    assert "warmup" not in constant.round_hyperparameters() and linear.round_hyperparameters()["warmup"] == "linear"


def test_visual_tokens_start_at_the_paper_codes_scale_in_every_round():
    from vlweak.backbones import OpenCLIPBackbone
    from vlweak.methods import PromptTuning

    bb = OpenCLIPBackbone("vlweak-tiny", pretrained=None)
    width = bb.visual_width
    default = PromptTuning(bb, ["a", "b"], prompt="multimodal", n_ctx=2, n_visual_tokens=64)
    chosen = PromptTuning(bb, ["a", "b"], prompt="visual", n_visual_tokens=64, visual_init_std=0.5)
    tokens = default.visual_prompt.tokens
    assert default.visual_prompt.init_std == pytest.approx(width**-0.5)
    assert tokens.std().item() == pytest.approx(width**-0.5, rel=0.15)
    assert chosen.visual_prompt.tokens.std().item() == pytest.approx(0.5, rel=0.15)
    # each round's fresh draw keeps each learner's scale (the textual context stays at 0.02)
    default.reset_prompts(torch.Generator().manual_seed(1))
    assert tokens.std().item() == pytest.approx(width**-0.5, rel=0.15)
    assert default.text_prompt.ctx.std().item() == pytest.approx(0.02, rel=0.3)
    # the resolved scale is part of a run's identity, except the scale of the runs before the option
    # (0.02), whose identity stays; a textual run's identity does not name it
    assert default.round_hyperparameters()["visual_init_std"] == pytest.approx(width**-0.5)
    assert chosen.round_hyperparameters()["visual_init_std"] == 0.5
    old = PromptTuning(bb, ["a", "b"], prompt="visual", n_visual_tokens=2, visual_init_std=0.02)
    assert "visual_init_std" not in old.round_hyperparameters()
    assert "visual_init_std" not in PromptTuning(bb, ["a", "b"], n_ctx=2).round_hyperparameters()
    with pytest.raises(ValueError, match="init_std .* positive, got 0.0"):
        PromptTuning(bb, ["a", "b"], prompt="visual", visual_init_std=0.0)


TINY_OVERLAY = "model:\n  init_args:\n    n_ctx: 4\n    backbone:\n      class_path: vlweak.backbones.OpenCLIPBackbone\n      init_args:\n        model_name: vlweak-tiny\n        pretrained: null\n"


@pytest.mark.parametrize(
    "configs",
    [
        ["shapes_semisupervised.yaml", "strategy_fpl.yaml"],
        ["shapes_semisupervised.yaml", "strategy_ifpl.yaml", "prompt_visual.yaml"],
        ["shapes_transductive.yaml", "strategy_grip.yaml", "prompt_multimodal.yaml"],
        ["shapes_unsupervised.yaml", "zlap_to_grip.yaml"],
        ["imagefolder.yaml"],
    ],
)
def test_recipes_compose(tmp_path, configs, monkeypatch):
    from tests.conftest import write_image_folder
    from vlweak.data.world import classnames_for

    overlay = tmp_path / "tiny.yaml"
    overlay.write_text(TINY_OVERLAY)
    args = []
    for c in configs:
        args += ["--config", str(REPO / "recipes" / "prompt_tuning" / c)]
    if configs == ["imagefolder.yaml"]:
        for split in ("train", "test"):
            write_image_folder(tmp_path / "folder" / split, {"cat": 3, "dog": 3})
        args.append(f"--data.init_args.root={tmp_path / 'folder'}")
    if "zlap_to_grip.yaml" in configs:  # the artifact the recipe chains from (checked when the model is built)
        monkeypatch.chdir(tmp_path)
        names = classnames_for("shape")
        PseudoLabels.from_scores(torch.eye(len(names)), names, [str(i) for i in range(len(names))]).save(
            tmp_path / "runs" / "prompt_tuning" / "zlap-train.safetensors"
        )
    cli = build_cli(args + ["--config", str(overlay)], run=False)
    m = cli.model
    want = {"strategy_fpl.yaml": "fpl", "strategy_ifpl.yaml": "ifpl"}
    assert m.strategy == next((want[c] for c in configs if c in want), "grip")
    assert (m.visual_prompt is not None) == any("visual" in c or "multimodal" in c for c in configs)
    if "shapes_transductive.yaml" in configs:
        assert len(cli.datamodule.seen_class_indices) == 7
    if "zlap_to_grip.yaml" in configs:
        assert m.pseudolabels.endswith("zlap-train.safetensors")


def _shipped(tag: str) -> dict:
    return {"class_path": "vlweak.backbones.OpenCLIPBackbone", "init_args": {"model_name": "vlweak-shapes", "pretrained": tag}}


@requires_shipped
@pytest.mark.parametrize(
    "weights",
    [
        # the noisy-caption model's zero-shot calls most shifted-domain ellipses, arrows and squares by
        # a look-alike's name; class-balanced pseudolabels and a prompt trained on them correct it
        "vlweak-shapes-noisy",
        pytest.param("vlweak-shapes", marks=pytest.mark.xfail(
            strict=True, reason="not reached with the clean-caption model: GRIP 0.828 against zero-shot 0.835 on the "
            "shifted world; a linear probe on 1,000 true labels of the frozen features reaches only 0.79")),
    ],
)
def test_grip_textual_beats_zero_shot_on_the_shifted_world(tmp_path, weights):
    grip, zero_shot = grip_against_zero_shot(tmp_path, weights)
    assert grip > zero_shot + 0.05, (grip, zero_shot)


def grip_against_zero_shot(tmp_path, weights: str, accelerator: str = "cpu", precision: str = "fp32") -> tuple[float, float]:
    """Test accuracy of 4 GRIP rounds (textual prompt, cached features of the shifted world) and of
    zero-shot with the same backbone, on ``accelerator`` with the backbone's ``precision`` (the GPU
    checks reuse it)."""
    from vlweak.methods import ZeroShot

    model = {"backbone": _shipped(weights), "strategy": "grip", "rounds": 4, "n_ctx": 4, "epochs_per_round": 4,
             "warmup_epochs": 0, "lr": 0.1, "weight_decay": 5e-4}
    model["backbone"]["init_args"]["precision"] = precision
    data = {"n_train": 400, "n_val": 0, "n_test": 400, "shots": 2, "embeddings": True, "batch_size": 32, "shift": 1.0}
    cli = _fit(_recipe(tmp_path, model, data), "--model.init_args.rounds_dir=" + str(tmp_path / "rounds"),
               f"--trainer.accelerator={accelerator}")
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    grip = cli.model.last_metrics["test/acc"]

    zs = ZeroShot(cli.model.backbone, cli.model.classnames, artifact_path="")
    L.Trainer(accelerator=accelerator, logger=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=tmp_path).test(
        zs, datamodule=cli.datamodule, verbose=False
    )
    return grip, zs.last_metrics["test/acc"]


def test_trainer_max_epochs_is_named_as_unused(tmp_path):
    # the rounds decide the epochs; a max_epochs given out of habit must not pass silently
    recipe = _recipe(tmp_path, TINY_MODEL, TINY_DATA)
    with pytest.warns(UserWarning, match=r"trainer.max_epochs=5 is not used: PromptTuning trains 3 round\(s\) of epochs_per_round=1"):
        run = _fit(recipe, f"--model.init_args.rounds_dir={tmp_path / 'r'}", "--trainer.max_epochs=5")
    assert run.trainer.current_epoch == 3


def test_warm_start_rounds_continue_the_previous_prompt_and_resume_alike(tmp_path):
    model = dict(TINY_MODEL, warm_start=True)
    recipe = _recipe(tmp_path, model, TINY_DATA)
    starts, ends = {}, {}

    class _Watch(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):  # after the rounds callback's start_round
            r = _rounds_of(trainer).round
            starts.setdefault(r, pl_module.text_prompt.ctx.detach().clone())

        def on_train_epoch_end(self, trainer, pl_module):
            ends[_rounds_of(trainer).round] = pl_module.text_prompt.ctx.detach().clone()

    full = _fit(recipe, f"--model.init_args.rounds_dir={tmp_path / 'full'}", callbacks=[_Watch()])
    assert sorted(starts) == [0, 1, 2]
    for r in (1, 2):  # each later round starts where the one before ended
        assert torch.equal(starts[r], ends[r - 1])
    assert full.model.round_hyperparameters()["warm_start"] is True
    cold = _fit(_recipe(tmp_path, TINY_MODEL, TINY_DATA, "cold.yaml"), f"--model.init_args.rounds_dir={tmp_path / 'cold'}")
    assert not torch.allclose(cold.model.text_prompt.ctx, full.model.text_prompt.ctx)

    # interrupted in round 2 and resumed: the same final prompt as the uninterrupted run
    rounds_dir = tmp_path / "interrupted"
    with pytest.raises(RuntimeError, match="interrupted"):
        _fit(recipe, f"--model.init_args.rounds_dir={rounds_dir}", callbacks=[_InterruptAtRound(2)])
    resumed = _fit(recipe, f"--model.init_args.rounds_dir={rounds_dir}")
    assert _rounds(resumed).rounds_trained == [2]
    assert torch.allclose(resumed.model.text_prompt.ctx, full.model.text_prompt.ctx, atol=1e-6)


def test_holdout_chooses_each_rounds_prompt_by_its_best_epoch(tmp_path, monkeypatch):
    from vlweak.callbacks.pseudolabel_rounds import RoundState
    from vlweak.methods.prompt_tuning import PromptTuning

    model = dict(TINY_MODEL, rounds=2, epochs_per_round=3, holdout=0.25)
    prompts: list[torch.Tensor] = []

    class _Watch(L.Callback):  # runs before the rounds callback: the prompt each epoch ended with
        def on_train_epoch_end(self, trainer, pl_module):
            prompts.append(pl_module.text_prompt.ctx.detach().cpu().clone())

    served = {}
    original_use = PromptTuning.use_training_set

    def use(self, index, label, r=0):
        original_use(self, index, label, r)
        served[r] = (index.clone(), self._held, [int(i) for i in self.datamodule.datasets["train"].indices])

    monkeypatch.setattr(PromptTuning, "use_training_set", use)
    scripted = iter([0.5, 0.9, 0.1, 0.4, 0.4, 0.4])  # round 0 peaks at its 2nd epoch; round 1 ties: the last
    real = PromptTuning.held_out_accuracy
    measured = []
    monkeypatch.setattr(PromptTuning, "held_out_accuracy", lambda self: measured.append(real(self)) or next(scripted))
    cli = _fit(_recipe(tmp_path, model, TINY_DATA), f"--model.init_args.rounds_dir={tmp_path / 'h'}", callbacks=[_Watch()])
    assert len(prompts) == 6 and all(0.0 <= a <= 1.0 for a in measured)
    # a quarter of each round's training set is held out, and only the rest is trained on
    for r, (index, (held_index, held_label), trained) in served.items():
        assert len(held_index) == int(len(index) * 0.25) > 0
        assert set(trained).isdisjoint(held_index.tolist()) and len(trained) + len(held_index) == len(index)
    # round 1's pseudolabels came from round 0's best epoch (the 2nd), not its last
    r1 = RoundState.load(tmp_path / "h" / "round-001.safetensors")
    assert torch.allclose(r1.prompt["text.ctx"], prompts[1]) and not torch.allclose(prompts[1], prompts[2])
    assert torch.allclose(cli.model.text_prompt.ctx.cpu(), prompts[5])  # of equals, the latest epoch
    assert cli.model.round_hyperparameters()["holdout"] == 0.25
    with pytest.raises(ValueError, match="holdout .* in \\[0, 1\\); got 1.0"):
        _fit(_recipe(tmp_path, dict(model, holdout=1.0), TINY_DATA, "bad.yaml"))


def test_the_validation_after_a_rounds_last_epoch_scores_the_prompt_the_fit_keeps(tmp_path, monkeypatch):
    # the fit keeps the round's best held-out epoch; the last val/acc (a sweep's objective) is that prompt's
    from vlweak.methods.prompt_tuning import PromptTuning

    model = dict(TINY_MODEL, rounds=1, epochs_per_round=3, holdout=0.25, lr=1.0)
    scripted = iter([0.9, 0.1, 0.1])  # the first epoch is the best
    monkeypatch.setattr(PromptTuning, "held_out_accuracy", lambda self: next(scripted))
    validated: list[torch.Tensor] = []

    class _Watch(L.Callback):
        def on_validation_epoch_end(self, trainer, pl_module):
            if not trainer.sanity_checking:
                validated.append(pl_module.text_prompt.ctx.detach().cpu().clone())

    cli = _fit(_recipe(tmp_path, model, dict(TINY_DATA, n_val=24)), "--trainer.limit_val_batches=1.0",
               f"--model.init_args.rounds_dir={tmp_path / 'v'}", callbacks=[_Watch()])
    assert len(validated) == 3 and not torch.allclose(validated[0], validated[1])
    assert torch.allclose(validated[2], validated[0])  # the last validation saw the first epoch's prompt
    assert torch.allclose(cli.model.text_prompt.ctx.cpu(), validated[0])
    logged = float(cli.trainer.callback_metrics["val/acc"])
    again = cli.trainer.validate(cli.model, datamodule=cli.datamodule, verbose=False)[0]["val/acc"]
    assert logged == pytest.approx(again)


def test_holdout_with_visual_prompts_scores_held_out_images(tmp_path, monkeypatch):
    from vlweak.methods.prompt_tuning import PromptTuning

    real, measured = PromptTuning.held_out_accuracy, []
    monkeypatch.setattr(PromptTuning, "held_out_accuracy", lambda self: measured.append(real(self)) or measured[-1])
    real_logits, scored = PromptTuning._prompted_logits, []

    def spy(self, index):  # what the held-out accuracy scores: the held-out pool images, read anew
        logits, seen = real_logits(self, index)
        scored.append((index.clone(), seen, logits.argmax(-1), self._held[1].clone()))
        return logits, seen

    monkeypatch.setattr(PromptTuning, "_prompted_logits", spy)
    model = dict(TINY_MODEL, prompt="visual", n_visual_tokens=2, rounds=1, strategy="fpl", k=3, epochs_per_round=2,
                 holdout=0.3)
    cli = _fit(_recipe(tmp_path, model, dict(TINY_DATA, embeddings=False)), f"--model.init_args.rounds_dir={tmp_path / 'v'}")
    assert len(measured) == 2  # one accuracy per epoch
    # held out: 30% of 1 labelled shot and 3 pseudolabels for each of the 12 classes
    held_index, held_label = cli.model._held
    assert len(held_index) == int((1 + 3) * 12 * 0.3)
    held_scans = [s for s in scored if torch.equal(s[0], held_index)]
    assert len(held_scans) == 2  # each epoch's accuracy scored exactly the held-out images ...
    for (index, seen, pred, label), acc in zip(held_scans, measured):
        assert torch.equal(seen, index)  # ... every one of them read as an image
        assert acc == pytest.approx((pred == label).float().mean().item())


def test_images_rewritten_under_the_same_names_make_another_rounds_run(tmp_path, tiny_backbone):
    # the rounds folder's key holds the train images' content, not only their names
    from PIL import Image

    from tests.conftest import write_image_folder
    from vlweak.callbacks.pseudolabel_rounds import _content_digest
    from vlweak.data import ImageFolderDataModule

    write_image_folder(tmp_path / "data" / "train", {"cat": 2, "dog": 2}, size=8)
    dm = ImageFolderDataModule(root=str(tmp_path / "data"), train="train", val=None, test=None,
                               transform=tiny_backbone.transform)
    before = _content_digest(dm)
    assert before and _content_digest(dm) == before
    image = tmp_path / "data" / "train" / "cat" / "0.png"
    Image.open(image).convert("L").convert("RGB").save(image)  # re-exported in place, same name
    assert _content_digest(ImageFolderDataModule(root=str(tmp_path / "data"), train="train", val=None, test=None,
                                                 transform=tiny_backbone.transform)) != before


def test_a_finished_fit_in_rounds_resumed_says_only_that(tmp_path):
    # the last round trained on its pseudolabelled set, the data module holds the whole pool: no epoch
    # follows, so the difference is not worth a warning
    recipe = _recipe(tmp_path, dict(TINY_MODEL, strategy="fpl", k=2, rounds=1, epochs_per_round=2), TINY_DATA)
    from lightning.pytorch.callbacks import ModelCheckpoint

    saving = [ModelCheckpoint(dirpath=tmp_path / "ckpt", save_last=True, save_top_k=0)]  # as the recipes' last.ckpt
    _fit(recipe, f"--model.init_args.rounds_dir={tmp_path / 'r'}", "--trainer.enable_checkpointing=true", callbacks=saving)
    with pytest.warns(UserWarning, match="the checkpoint is of a finished fit") as said:
        _fit(recipe, f"--model.init_args.rounds_dir={tmp_path / 'r'}", ckpt_path=str(tmp_path / "ckpt" / "last.ckpt"))
    assert not [w for w in said if "epochs made of other batches" in str(w.message)]


def test_a_round_with_nothing_to_train_on_is_named(tmp_path):
    # unsupervised (shots: 0) FPL with k: 0 has neither labels nor pseudolabels to train on
    recipe = _recipe(tmp_path, dict(TINY_MODEL, strategy="fpl", k=0, rounds=1), dict(TINY_DATA, shots=0))
    with pytest.raises(ValueError, match=r"round 1's training set is empty: no labeled image and k=0 pseudolabels per class"):
        _fit(recipe, f"--model.init_args.rounds_dir={tmp_path / 'r'}")
