import csv
import logging
import re
import sys
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from tests.conftest import REPO
from vlweak.backbones.errors import CheckpointMismatchError
from vlweak.cli import build_cli, main
from vlweak.labels import PseudoLabels

CONF = str(REPO / "tests" / "conf" / "zeroshot_tiny.yaml")


def _run(args, tmp_path, ckpt):
    return build_cli(
        [*args, "--config", CONF, f"--trainer.logger.init_args.save_dir={tmp_path}",
         f"--model.init_args.backbone.init_args.pretrained={ckpt}"]
    )


def test_help_lists_subcommands(capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["vlweak", "--help"])  # the console script's entry point
    with pytest.raises(SystemExit) as exit:
        main()
    assert exit.value.code == 0
    out = capsys.readouterr().out
    for sub in ("fit", "validate", "test", "predict"):
        assert sub in out


def test_method_help_cuts_long_subclass_lists(capsys):
    # CDUL's ``network: nn.Module`` made jsonargparse list every imported module class (~1,500 lines)
    with pytest.raises(SystemExit):
        build_cli(["fit", "--model.help", "CDUL"])
    out = capsys.readouterr().out
    assert "--model.network NETWORK" in out and "--model.snippet_threshold" in out
    assert len(out.splitlines()) < 200
    assert "more; any importable class path" in " ".join(out.split())
    with pytest.raises(SystemExit):  # short lists stay whole: every method is named
        build_cli(["fit", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for method in ("CDUL", "CHiLS", "CoOp", "DualCoOp", "PromptTuning", "ZeroShot", "ZLaP", "CLIPPretrain"):
        assert f"vlweak.methods.{method}" in out, method


def test_nested_class_help_names_options_as_given(capsys):
    # jsonargparse names a nested class's options relative to its parser (``--backbone.pretrained``),
    # which the command line refuses; they read as the user wrote the help option
    for given in ("model.init_args.backbone", "model.backbone"):
        with pytest.raises(SystemExit):
            build_cli(["test", "--config", CONF, f"--{given}.help", "OpenCLIPBackbone"])
        out = capsys.readouterr().out
        assert f"--{given}.pretrained PRETRAINED" in out and f"Help for --{given}.help=" in out
        assert "[--backbone." not in out and "\n  --backbone." not in out
    cli = build_cli(["--config", CONF, "--trainer.logger=false", "--model.init_args.backbone.precision=bf16"], run=False)
    assert cli.model.backbone.precision == "bf16"  # the name shown is accepted


def test_models_are_built_with_the_trainers_progress_bar_setting():
    # the backbone loads before the trainer exists: its loading bars follow the command's setting
    from vlweak.progress import bars_shown, show_progress

    try:
        for flag, shown in (("false", False), ("true", True)):
            build_cli(["--config", CONF, "--trainer.logger=false", f"--trainer.enable_progress_bar={flag}"], run=False)
            assert bars_shown() is shown
    finally:
        show_progress(True)


def test_a_refused_value_is_reported_by_its_constructor(tmp_path):
    # jsonargparse wraps a constructor's error in a union error that dumps the whole namespace
    args = ["--config", str(REPO / "recipes" / "quickstart.yaml"), "--trainer.logger=false"]
    with pytest.raises(ValueError) as info:
        build_cli([*args, "--model.init_args.temperature=-1"], run=False)
    assert str(info.value).startswith("temperature must be > 0") and "Union" not in str(info.value)
    missing = tmp_path / "nope.safetensors"
    with pytest.raises(FileNotFoundError, match="nope.safetensors"):
        build_cli([*args, f"--model.init_args.backbone.init_args.pretrained={missing}"], run=False)
    # the constructor's own error, not the library error under it: it names the file
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes((REPO / "vlweak" / "backbones" / "weights" / "vlweak-shapes.safetensors").read_bytes()[:100])
    with pytest.raises(CheckpointMismatchError, match="truncated.safetensors is not a readable checkpoint"):
        build_cli([*args, f"--model.init_args.backbone.init_args.pretrained={truncated}"], run=False)


def test_print_config_is_complete(capsys):
    with pytest.raises(SystemExit):
        build_cli(["predict", "--config", str(REPO / "recipes" / "quickstart.yaml"), "--print_config"])
    out = capsys.readouterr().out
    for key in ("class_path: vlweak.methods.ZeroShot", "templates:", "model_name: vlweak-shapes", "task: shape", "batch_size:", "trainer:"):
        assert key in out, key


# overlay recipe -> the recipe it is documented on top of
OVERLAYS = {
    **{f"prompt_tuning/{name}.yaml": "prompt_tuning/shapes_unsupervised.yaml" for name in
       ("prompt_multimodal", "prompt_visual", "strategy_fpl", "strategy_grip", "strategy_ifpl", "zlap_to_grip")},
    "pretrain/fsdp.yaml": "pretrain/shapes.yaml",
    "dualcoop/voc_single_positive.yaml": "dualcoop/voc.yaml",
}
RECIPES = sorted(
    str(p.relative_to(REPO / "recipes")) for p in (REPO / "recipes").rglob("*.yaml") if p.parent.name != "sweeps"
)


@pytest.mark.parametrize("recipe", RECIPES)
def test_every_recipe_loads(recipe, capsys):
    """Every shipped recipe parses into a complete config (overlays on top of the recipe they are
    documented with)."""
    configs = ["--config", str(REPO / "recipes" / recipe)]
    if recipe in OVERLAYS:
        configs = ["--config", str(REPO / "recipes" / OVERLAYS[recipe]), *configs]
    with pytest.raises(SystemExit) as exit_info:
        build_cli(["fit", *configs, "--print_config"])
    assert exit_info.value.code in (0, None)
    out = capsys.readouterr().out
    assert "class_path: vlweak.methods." in out and "trainer:" in out


def test_test_logs_metrics_and_writes_artifact(tmp_path, tiny_ckpt, caplog):
    caplog.set_level(logging.INFO)
    cli = _run(["test"], tmp_path, tiny_ckpt)
    log_dir = Path(cli.trainer.log_dir)
    # the run says where the artifact went, and no product tips
    assert f"pseudolabels of the test split (13 samples x 12 classes) -> {log_dir / 'pseudolabels-test.safetensors'}" in caplog.text
    assert "Seed set to" in caplog.text and "Tip:" not in caplog.text
    rows = list(csv.DictReader(open(log_dir / "metrics.csv")))
    assert {"test/acc", "test/mean_class_acc", "test/acc_top5"} <= set(rows[0])
    per_class = list(csv.DictReader(open(log_dir / "per_class_test.csv")))
    assert [r["class"] for r in per_class] == cli.datamodule.classnames
    pl = PseudoLabels.load(log_dir / "pseudolabels-test.safetensors", classnames=cli.datamodule.classnames)
    assert len(pl) == 13 and pl.sample_ids[0] == "shapes-s0-shift0-32px/test/0"
    assert pl.provenance["method"] == "ZeroShot" and pl.provenance["model"] == "vlweak-tiny"
    assert torch.allclose(pl.scores.sum(1), torch.ones(13), atol=1e-5)
    # the logged accuracy is the accuracy of the artifact's labels
    truth = cli.datamodule.raw("test").targets()
    assert float(rows[0]["test/acc"]) == pytest.approx((pl.labels == truth).float().mean().item(), abs=1e-6)


def test_relative_artifact_path_is_relative_to_the_working_directory(tmp_path, tiny_ckpt, monkeypatch):
    # as recipes/prompt_tuning/zlap_to_grip.yaml chains a predict run into the next fit
    monkeypatch.chdir(tmp_path)
    cli = build_cli(["predict", "--config", CONF, f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
                     f"--model.init_args.backbone.init_args.pretrained={tiny_ckpt}", "--data.init_args.predict_split=test",
                     "--model.init_args.artifact_path=chain/zs.safetensors"])
    assert cli.model.last_artifact == tmp_path / "chain" / "zs.safetensors"
    assert len(PseudoLabels.load(tmp_path / "chain" / "zs.safetensors")) == 13
    assert not list((tmp_path / "logs").rglob("*.safetensors"))


def test_predict_on_chosen_split_and_cached_embeddings(tmp_path, tiny_ckpt):
    cli = _run(["predict", "--data.init_args.predict_split=train"], tmp_path / "a", tiny_ckpt)
    pl = PseudoLabels.load(Path(cli.trainer.log_dir) / "pseudolabels-predict.safetensors")
    assert len(pl) == 16 and pl.sample_ids[0] == "shapes-s0-shift0-32px/train/0"
    assert pl.provenance["split"] == "train" and pl.provenance["stage"] == "predict"
    assert Path(pl.provenance["recipe"]).is_absolute()
    assert repr(pl).startswith("PseudoLabels(N=16, C=12 [") and "train/0" not in repr(pl)
    # the same run from cached embeddings gives the same pseudolabels
    cli2 = _run(["predict", "--data.init_args.predict_split=train", "--data.init_args.embeddings=true"], tmp_path / "b", tiny_ckpt)
    pl2 = PseudoLabels.load(Path(cli2.trainer.log_dir) / "pseudolabels-predict.safetensors")
    assert torch.allclose(pl.scores, pl2.scores, atol=1e-5)
    assert cli2.datamodule.cache.misses == 1


def test_wandb_logger_offline(tmp_path, tiny_ckpt, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cli = build_cli(["test", "--config", CONF, "--trainer.logger=WandbLogger",
                     f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.logger.init_args.project=vlweak-tests",
                     f"--model.init_args.backbone.init_args.pretrained={tiny_ckpt}", f"--trainer.default_root_dir={tmp_path}"])
    import wandb

    wandb.finish()
    assert type(cli.trainer.logger).__name__ == "WandbLogger"
    assert list(tmp_path.rglob("*.wandb")), "no offline W&B run written"


def test_wandb_gets_the_resolved_config_outside_test_and_predict(tmp_path, tiny_ckpt, monkeypatch):
    """The resolved config goes to W&B in every subcommand (here `validate`, which draws no figures)."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    build_cli(["validate", "--config", CONF, "--trainer.logger=WandbLogger", "--model.init_args.templates=imagenet80",
               f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.logger.init_args.project=vlweak-tests",
               f"--model.init_args.backbone.init_args.pretrained={tiny_ckpt}"])
    import wandb

    wandb.finish()
    wandb.teardown()  # closes the offline record log
    (run,) = tmp_path.rglob("offline-run-*")
    log = next(run.glob("*.wandb")).read_bytes()
    assert b"resolved_config" in log and b"imagenet80" in log and b"vlweak.methods.ZeroShot" in log
    assert not list(tmp_path.rglob("*.png"))


def test_wandb_runs_keep_their_files_apart(tmp_path, tiny_ckpt, monkeypatch):
    """Runs logged to W&B share the logger's save_dir (every run of a sweep does); each run's local
    files go to ``save_dir/<project>/<run id>`` (the sweep agent's id), beside its checkpoints."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    save_dir = tmp_path / "sweep"
    for run_id, template in (("run-a", "simple"), ("run-b", "imagenet80")):
        monkeypatch.setenv("WANDB_RUN_ID", run_id)  # what `wandb agent` sets for each run it launches
        wandb.teardown()  # the agent starts each run in a new process, which reads WANDB_RUN_ID afresh
        build_cli(["test", "--config", CONF, "--trainer.logger=WandbLogger",
                   f"--trainer.logger.init_args.save_dir={save_dir}", "--trainer.logger.init_args.project=sweep-tests",
                   f"--model.init_args.templates={template}",
                   f"--model.init_args.backbone.init_args.pretrained={tiny_ckpt}"])
        wandb.finish()
    wandb.teardown()  # later runs of this process must not take the last id
    for run_id, template in (("run-a", "simple"), ("run-b", "imagenet80")):
        folder = save_dir / "sweep-tests" / run_id
        assert yaml.safe_load((folder / "config.yaml").read_text())["model"]["init_args"]["templates"] == template
        labels = PseudoLabels.load(folder / "pseudolabels-test.safetensors")
        assert labels.provenance["hparams"]["templates"] == template
        assert labels.provenance["recipe"] == str(folder / "config.yaml")
    assert not (save_dir / "config.yaml").exists() and not (save_dir / "pseudolabels-test.safetensors").exists()
    # where ModelCheckpoint writes under a W&B logger: --ckpt_path last finds it among the project's runs
    from lightning.pytorch.loggers import WandbLogger

    from vlweak.cli import newest_last_checkpoint

    ckpt = save_dir / "sweep-tests" / "run-a" / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir(parents=True)
    ckpt.write_bytes(b"")
    trainer = L.Trainer(logger=WandbLogger(save_dir=save_dir, project="sweep-tests", offline=True), enable_checkpointing=False)
    assert newest_last_checkpoint(trainer) == str(ckpt)


def test_predict_and_test_warn_of_nothing_vlweak_does_on_purpose(tmp_path, tiny_ckpt):
    """A plain `vlweak predict` / `test` passes on no warning about what vlweak does by design
    (predict_step returning nothing, frozen encoders in eval mode) nor a deprecation of its own
    calls (writing the run's config)."""
    import warnings

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _run(["predict"], tmp_path / "p", tiny_ckpt)
        _run(["test"], tmp_path / "t", tiny_ckpt)
    messages = [f"{w.filename}: {w.message}" for w in seen]
    by_design = ("predict returned None", "in eval mode")
    assert not [m for m in messages if any(b in m for b in by_design)], messages
    assert not [m for m in messages if "/vlweak/" in m.split(":")[0]], messages  # e.g. skip_none when saving the config


def _main_args(tmp_path, ckpt, *extra):
    return ["test", "--config", CONF, f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--model.init_args.backbone.init_args.pretrained={ckpt}", *extra]


@pytest.mark.parametrize("extra,message", [
    (["--model.init_args.templates=nonexistent"], "ValueError: unknown template set 'nonexistent'"),
    (["--model.init_args.backbone.init_args.pretrained=/no/such/weights.safetensors"],
     "FileNotFoundError: checkpoint file not found: /no/such/weights.safetensors"),
    (["--data.init_args.n_test=0"], "RuntimeError: ShapesWorldDataModule has no 'test' split (n_test: 0)"),
    (["--ckpt_path=/no/such/run.ckpt"], "FileNotFoundError: --ckpt_path /no/such/run.ckpt: no such file"),
    (["--ckpt_path={weights}"], "ValueError: --ckpt_path {weights} is not a Lightning checkpoint"),
    # the data module's vocabulary is linked into the model: a model-side list would vanish unnoticed
    (["--model.init_args.classnames=[cat,dog]"], "ValueError: model.init_args.classnames ['cat', 'dog']: the class "
     "vocabulary is the data module's"),
])
def test_a_refused_input_ends_the_run_with_its_message_alone(tmp_path, tiny_ckpt, capsys, monkeypatch, extra, message):
    """The console script ends a run whose input vlweak refuses with the message on stderr and exit
    status 2, no traceback; VLWEAK_TRACEBACK=1 raises it as it is."""

    monkeypatch.delenv("VLWEAK_TRACEBACK", raising=False)
    extra = [e.format(weights=tiny_ckpt) for e in extra]  # a weights file is no Lightning checkpoint
    message = message.format(weights=tiny_ckpt)
    with pytest.raises(SystemExit) as exit_info:
        main(_main_args(tmp_path, tiny_ckpt, *extra))
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert f"vlweak: error: {message}" in err and "Traceback" not in err
    monkeypatch.setenv("VLWEAK_TRACEBACK", "1")
    with pytest.raises(Exception, match=re.escape(message.split(": ", 1)[1])):
        main(_main_args(tmp_path, tiny_ckpt, *extra))


def test_a_bad_image_met_by_a_loader_worker_is_named_on_one_line(tmp_path, tiny_ckpt, capsys, monkeypatch):
    """A corrupt image met in a DataLoader worker process: the worker's error comes back wrapped in
    its traceback text; the run still ends with one line naming the file."""
    from tests.conftest import write_image_folder

    root = write_image_folder(tmp_path / "images", {"circle": 2, "square": 2})
    (root / "square" / "broken.png").write_bytes(b"not an image")
    config = yaml.safe_load(open(CONF))
    config["data"] = {"class_path": "vlweak.data.ImageFolderDataModule",
                      "init_args": {"root": str(root), "batch_size": 8, "num_workers": 1}}
    (tmp_path / "folder.yaml").write_text(yaml.safe_dump(config))
    monkeypatch.delenv("VLWEAK_TRACEBACK", raising=False)
    with pytest.raises(SystemExit) as exit_info:
        main(["test", "--config", str(tmp_path / "folder.yaml"), f"--trainer.default_root_dir={tmp_path}",
              f"--model.init_args.backbone.init_args.pretrained={tiny_ckpt}"])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("vlweak: error:")]
    assert len(lines) == 1 and lines[0].startswith(f"vlweak: error: ImageLoadError: cannot decode image {root / 'square' / 'broken.png'}")


def test_a_failure_inside_a_library_keeps_its_traceback(tmp_path):
    """What a library or an operation raised inside vlweak's code is not taken for a refused input:
    its traceback is what a bug report needs."""
    from vlweak.cli import is_user_error
    from vlweak.data.extract import read_bytes

    with pytest.raises(OSError) as from_pathlib:
        read_bytes(tmp_path)  # a folder: pathlib raises
    assert not is_user_error(from_pathlib.value)
    with pytest.raises(ValueError) as from_here:
        raise ValueError("raised by a test, not by vlweak")
    assert not is_user_error(from_here.value)
    from vlweak.prompts.templates import resolve_templates

    with pytest.raises(ValueError) as refused:
        resolve_templates("nonexistent")
    assert is_user_error(refused.value)


def test_ddp_two_processes_gather_and_dedup(tmp_path, tiny_ckpt):
    """2-process CPU DDP: 13 test images split over 2 ranks (the sampler repeats one); the artifact
    has each image once and equals the single-process run."""
    single = _run(["test"], tmp_path / "single", tiny_ckpt)
    ref = PseudoLabels.load(Path(single.trainer.log_dir) / "pseudolabels-test.safetensors")
    from tests.cli.test_ddp_methods import _two_processes

    proc = _two_processes(["test", "--config", CONF, "--trainer.devices=2", "--trainer.strategy=ddp",
                           f"--trainer.logger.init_args.save_dir={tmp_path / 'ddp'}",
                           f"--model.init_args.backbone.init_args.pretrained={tiny_ckpt}"], timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    arts = list((tmp_path / "ddp").rglob("pseudolabels-test.safetensors"))
    assert len(arts) == 1
    pl = PseudoLabels.load(arts[0])
    assert pl.indices.tolist() == list(range(13))
    assert torch.allclose(pl.scores, ref.scores, atol=1e-5)
    rows = list(csv.DictReader(open(arts[0].parent / "metrics.csv")))
    assert float(rows[0]["test/acc"]) == pytest.approx(float(list(csv.DictReader(open(Path(single.trainer.log_dir) / "metrics.csv")))[0]["test/acc"]))


def test_null_two_class_levels_down_is_none_and_keeps_override_order(tiny_ckpt):
    # jsonargparse alone turns `null` two class levels down into the string "None"
    base = ["--config", str(REPO / "recipes/pretrain/shapes.yaml"),
            "--model.init_args.backbone.init_args.model_name=vlweak-tiny", "--data.init_args.image_size=32"]
    key = "--model.init_args.backbone.init_args"
    cli = build_cli([*base, f"{key}.pretrained={tiny_ckpt}", f"{key}.cache_dir", "null", f"{key}.pretrained=null"], run=False)
    init = cli.config.model.init_args.backbone.init_args
    assert init.pretrained is None and init.cache_dir is None
    assert cli.model.backbone.pretrained is None
    cli = build_cli([*base, f"{key}.pretrained=~", f"{key}.pretrained={tiny_ckpt}"], run=False)  # the later one wins
    assert cli.config.model.init_args.backbone.init_args.pretrained == str(tiny_ckpt)
    # the short spellings
    cli = build_cli([*base, f"{key}.pretrained={tiny_ckpt}", "--model.backbone.cache_dir=/x",
                     "--model.backbone.cache_dir=null", "--model.init_args.backbone.pretrained", "null"], run=False)
    init = cli.config.model.init_args.backbone.init_args
    assert init.pretrained is None and init.cache_dir is None
    # an option that takes no value is not paired with the next one; shallow and non-null options pass
    from vlweak.cli import _deep_nulls_as_configs

    assert _deep_nulls_as_configs(["fit", "--print_config", "--a.b.c=null", "--a.b", "null", "--a.b.c=nulls", "--x.y.z", "~"]) == [
        "fit", "--print_config", "--config", '{"a": {"b": {"c": null}}}', "--a.b", "null", "--a.b.c=nulls",
        "--config", '{"x": {"y": {"z": null}}}']


@pytest.mark.parametrize("subcommand", ["test", "predict"])
def test_unlabeled_split_is_pseudolabelled_without_metrics(tmp_path, tiny_ckpt, subcommand):
    # pseudolabelling images nobody has labelled is the point: no metrics, the artifact all the same
    from PIL import Image

    rows = ["path"]
    for i in range(5):
        Image.new("RGB", (32, 32), (40 * i, 90, 200)).save(tmp_path / f"img{i}.png")
        rows.append(f"img{i}.png")
    (tmp_path / "pool.csv").write_text("\n".join(rows) + "\n")
    cli = build_cli([subcommand, "--config", CONF, f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
                     f"--model.init_args.backbone.init_args.pretrained={tiny_ckpt}",
                     "--data=vlweak.data.ManifestDataModule", f"--data.test={tmp_path / 'pool.csv'}",
                     "--data.classnames=[circle,square,star]"])
    pl = PseudoLabels.load(Path(cli.trainer.log_dir) / f"pseudolabels-{subcommand}.safetensors")
    assert len(pl) == 5 and pl.classnames == ["circle", "square", "star"]
    assert cli.model.last_metrics == {} and not (Path(cli.trainer.log_dir) / f"per_class_{subcommand}.csv").exists()


def test_per_class_accuracy_of_a_class_without_samples_is_nan():
    from vlweak.metrics import multiclass_report

    report = multiclass_report(torch.tensor([[0.9, 0.1, 0.0], [0.2, 0.7, 0.1]]), torch.tensor([0, 1]))
    assert report["per_class"][:2].tolist() == [1.0, 1.0] and report["per_class"][2].isnan()
    assert report["mean_class_acc"].item() == 1.0
    # a class without samples that is predicted does not count as a 0 in the mean
    report = multiclass_report(torch.eye(3), torch.tensor([0, 1, 1]))
    assert report["per_class"][2].isnan() and report["mean_class_acc"].item() == pytest.approx(0.75)
    with pytest.raises(ValueError, match="no labelled samples"):
        multiclass_report(torch.rand(2, 3), torch.tensor([-1, -1]))


def test_ckpt_path_last_reads_one_run_level_of_the_recipe_folder(tmp_path):
    import time

    from lightning.pytorch.loggers import CSVLogger

    from vlweak.cli import newest_last_checkpoint

    own = tmp_path / "cdul" / "version_0" / "checkpoints" / "last.ckpt"
    nested = tmp_path / "cdul" / "stage2" / "version_0" / "checkpoints" / "last.ckpt"  # another recipe's run
    for p in (own, nested):
        p.parent.mkdir(parents=True)
        p.write_bytes(b"x")
        time.sleep(0.01)
    trainer = L.Trainer(logger=CSVLogger(tmp_path, name="cdul"), enable_progress_bar=False)
    assert newest_last_checkpoint(trainer) == str(own)
    with pytest.raises(ValueError, match="needs a logger .its runs folder holds the runs. or a ModelCheckpoint dirpath"):
        newest_last_checkpoint(L.Trainer(logger=False, enable_checkpointing=False))


def test_a_killed_fit_keeps_its_last_finished_epoch(tmp_path, tiny_ckpt):
    # ModelCheckpoint(save_last=True, save_top_k=0) wrote last.ckpt only when the fit ended: a killed
    # fit lost everything and --ckpt_path last picked up another run's file

    class Killed(L.Callback):
        def on_train_epoch_start(self, trainer, pl_module):
            if trainer.current_epoch == 2:
                raise RuntimeError("killed")

    cli = build_cli(["--config", str(REPO / "recipes" / "dualcoop" / "shapes_partial.yaml"), "--data.init_args.n_train=16",
                     "--data.init_args.n_val=0", "--data.init_args.n_test=0", "--trainer.max_epochs=4",
                     "--trainer.limit_val_batches=0", "--model.init_args.n_ctx=2", "--trainer.enable_progress_bar=false",
                     "--model.init_args.backbone.init_args.model_name=vlweak-tiny",
                     f"--model.init_args.backbone.init_args.pretrained={tiny_ckpt}",
                     f"--trainer.logger.init_args.save_dir={tmp_path}"], run=False)
    cli.trainer.callbacks.append(Killed())
    with pytest.raises(RuntimeError, match="killed"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    (ckpt,) = tmp_path.rglob("*.ckpt")
    assert ckpt.name == "last.ckpt" and torch.load(ckpt, weights_only=False)["epoch"] == 1
    # every epoch-trained recipe keeps that one file (pretraining saves by steps)
    for recipe in (REPO / "recipes").rglob("*.yaml"):
        text = recipe.read_text()
        if "ModelCheckpoint" in text and "every_n_train_steps" not in text:
            assert "filename: last" in text and "save_on_train_epoch_end: true" in text, recipe


def test_ckpt_path_last_names_what_the_chosen_run_configured_otherwise(tmp_path, tiny_ckpt):
    args = ["--config", str(REPO / "recipes" / "dualcoop" / "shapes_partial.yaml"), "--data.init_args.n_train=16",
            "--data.init_args.n_val=0", "--data.init_args.n_test=8", "--trainer.max_epochs=1", "--trainer.limit_val_batches=0",
            "--model.init_args.n_ctx=2", "--trainer.enable_progress_bar=false", "--model.init_args.backbone.init_args.model_name=vlweak-tiny",
            f"--model.init_args.backbone.init_args.pretrained={tiny_ckpt}", f"--trainer.logger.init_args.save_dir={tmp_path}"]
    fitted = build_cli(["fit", *args])
    # the frozen backbone (the weights file builds it again) is not in the checkpoint, what names it is
    (ckpt,) = tmp_path.glob("*/version_0/checkpoints/last.ckpt")
    saved = torch.load(ckpt, weights_only=False)
    assert not [k for k in saved["state_dict"] if k.startswith("backbone.")] and saved["state_dict"]
    assert saved["vlweak_backbone"] == fitted.model.backbone.fingerprint_parts()
    # another data module: its class named, not each option of two unrelated classes
    import json

    from tests.conftest import write_image_folder

    write_image_folder(tmp_path / "photos", {"x": 2})
    manifest = tmp_path / "photos" / "labels.jsonl"
    manifest.write_text("\n".join(json.dumps({"path": f"x/{i}.png", "labels": [n]}) for i, n in enumerate(["cat", "dog"])))
    with pytest.warns(UserWarning, match=r"configured otherwise: data\.class_path: 'vlweak\.data\.ShapesWorldDataModule' there, "
                                         r"'vlweak\.data\.ManifestDataModule' here$"):
        with pytest.raises(Exception, match="trained for 12 classes"):  # and its prompts are the world's 12 classes'
            build_cli(["test", *args, "--data=vlweak.data.ManifestDataModule", f"--data.init_args.test={manifest}",
                       "--ckpt_path=last"])
    with pytest.warns(UserWarning, match=r"configured otherwise: data\.init_args\.label_fraction: 0\.1 there, 0\.5 here"):
        build_cli(["test", *args, "--data.init_args.label_fraction=0.5", "--ckpt_path=last"])
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*configured otherwise")
        warnings.filterwarnings("error", message=".*dirpath has changed")  # a test writes no checkpoint
        build_cli(["test", *args, "--ckpt_path=last"])  # the same settings: nothing to say
    # a trained method tested without a checkpoint runs untrained: said so
    with pytest.warns(UserWarning, match=r"`vlweak test` without --ckpt_path: DualCoOp runs untrained"):
        build_cli(["test", *args])
    # read back: the same prompts on the same backbone give the fitted model's test scores
    tested = build_cli(["test", *args, f"--ckpt_path={ckpt}"])
    for key, value in fitted.model.state_dict().items():
        torch.testing.assert_close(tested.model.state_dict()[key], value, msg=key)
    # other weights than the fit's are named
    other = tmp_path / "other.safetensors"
    from safetensors.torch import save_file

    from vlweak.backbones import OpenCLIPBackbone

    save_file(OpenCLIPBackbone("vlweak-tiny", pretrained=None).model.state_dict(), str(other))
    with pytest.warns(UserWarning, match=rf"this checkpoint was trained with the backbone OpenCLIPBackbone\('vlweak-tiny', "
                                         rf"weights '{re.escape(str(Path(tiny_ckpt).resolve()))}'\); this run's is "
                                         rf"OpenCLIPBackbone\('vlweak-tiny', weights '{re.escape(str(other.resolve()))}'\).*"
                                         r"in Python DualCoOp.load_from_checkpoint\(path, backbone=...\)"):
        build_cli(["test", *args, f"--model.init_args.backbone.init_args.pretrained={other}", f"--ckpt_path={ckpt}"])
    # ... and weights of another architecture are refused naming the tensors (not Lightning's size-mismatch traceback)
    from vlweak.backbones import CheckpointMismatchError

    with pytest.warns(UserWarning, match="trained with the backbone"):
        with pytest.raises(CheckpointMismatchError, match=r"do not fit this DualCoOp: prompts\..* there, .* here \(it was trained with"):
            build_cli(["test", *args, "--model.init_args.backbone.init_args.model_name=vlweak-shapes",
                       "--model.init_args.backbone.init_args.pretrained=vlweak-shapes", f"--ckpt_path={ckpt}"])
    # an explicit checkpoint's settings replace the run's, and the ones that change are named
    with pytest.warns(UserWarning, match=r"built with the checkpoint's settings: n_ctx 2 \(here 4\)"):
        cli = build_cli(["test", *args, "--model.init_args.n_ctx=4", f"--ckpt_path={ckpt}"])
    assert cli.model.hparams.n_ctx == 2
    # ... except where this run writes its files: the artifact goes where the command says
    out = tmp_path / "chain" / "scores.safetensors"
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=".*checkpoint's settings")
        cli = build_cli(["predict", *args, "--data.init_args.predict_split=test", f"--model.init_args.artifact_path={out}",
                         f"--ckpt_path={ckpt}"])
    assert cli.model.last_artifact == out and out.is_file()
    with pytest.warns(UserWarning, match=r"is a checkpoint of DualCoOp, not of this recipe's ZeroShot"):
        build_cli(["test", "--config", CONF, f"--trainer.logger.init_args.save_dir={tmp_path / 'zs'}",
                   f"--model.init_args.backbone.init_args.pretrained={tiny_ckpt}", "--data.init_args.multilabel=true",
                   f"--ckpt_path={ckpt}"])


def test_fit_of_a_training_free_method_says_to_test_or_predict(tmp_path, tiny_ckpt):
    with pytest.raises(ValueError, match=r"ZeroShot is training-free: `vlweak fit` has nothing to train; run `vlweak test`"):
        _run(["fit"], tmp_path, tiny_ckpt)


def test_predict_labels_a_folder_of_unlabeled_images(tmp_path, tiny_ckpt):
    # the plainest use: a folder of photos and a class list in, a pseudolabel per photo out
    import numpy as np
    from PIL import Image

    photos = tmp_path / "photos"
    photos.mkdir()
    for k in range(5):
        Image.fromarray(np.random.default_rng(k).integers(0, 255, (24, 24, 3), dtype=np.uint8)).save(photos / f"{k}.jpg")
    cli = build_cli(["predict", "--config", CONF, f"--trainer.logger.init_args.save_dir={tmp_path}",
                     f"--model.init_args.backbone.init_args.pretrained={tiny_ckpt}",
                     "--data=vlweak.data.ImageFolderDataModule", f"--data.init_args.root={photos}",
                     "--data.init_args.classnames=[circle, square, star]"])
    pl = PseudoLabels.load(Path(cli.trainer.log_dir) / "pseudolabels-predict.safetensors")
    assert pl.classnames == ["circle", "square", "star"]
    assert pl.sample_ids == [str(photos / f"{k}.jpg") for k in range(5)] and pl.scores.shape == (5, 3)


def test_a_single_class_is_refused_before_any_image_is_encoded(tmp_path, tiny_ckpt, monkeypatch):
    from tests.conftest import write_image_folder
    from vlweak.backbones.base import Backbone

    root = write_image_folder(tmp_path / "data", {"cat": 3})
    encoded = []
    real = Backbone.encode_image
    monkeypatch.setattr(Backbone, "encode_image", lambda self, x, *a, **kw: encoded.append(len(x)) or real(self, x, *a, **kw))
    with pytest.raises(ValueError, match=r"ZeroShot has one class \('cat'\): single-label classification needs at least two"):
        build_cli(["test", "--config", CONF, f"--trainer.logger.init_args.save_dir={tmp_path}",
                   f"--model.init_args.backbone.init_args.pretrained={tiny_ckpt}",
                   "--data=vlweak.data.ImageFolderDataModule", f"--data.init_args.root={root}"])
    assert encoded == []


def test_a_split_whose_every_image_is_unreadable_is_an_error_not_an_empty_run(tmp_path, tiny_ckpt):
    from tests.conftest import write_image_folder

    root = write_image_folder(tmp_path / "data", {"cat": 2, "dog": 2})
    for f in root.rglob("*.png"):
        f.write_bytes(b"not an image")
    with pytest.warns(UserWarning, match="skipping unreadable image"), \
            pytest.raises(ValueError, match="the test split gave no image to test: every one was skipped as unreadable"):
        build_cli(["test", "--config", CONF, f"--trainer.logger.init_args.save_dir={tmp_path}",
                   f"--model.init_args.backbone.init_args.pretrained={tiny_ckpt}", "--figures=false",
                   "--data=vlweak.data.ImageFolderDataModule", f"--data.init_args.root={root}",
                   "--data.init_args.skip_bad=true"])


def test_an_overlay_given_before_its_recipe_is_noted(capsys):
    from vlweak.cli import _note_overlay_order

    base, overlay = (str(REPO / "recipes" / "prompt_tuning" / f) for f in ("shapes_unsupervised.yaml", "strategy_fpl.yaml"))
    _note_overlay_order(["fit", "--config", overlay, "--config", base])
    assert f"an overlay goes after the recipe it changes (--config <recipe> --config {overlay})" in capsys.readouterr().err
    for args in (["fit", "--config", base, f"--config={overlay}"], ["fit", "--model=PromptTuning", "--config", overlay]):
        _note_overlay_order(args)
        assert capsys.readouterr().err == ""


@pytest.mark.parametrize(("extra", "message"), [
    (["--trainer.accelerator=gpu"], r"asks for GPUs \(trainer.accelerator: gpu\) and this machine has none"),
    (["--config", str(REPO / "recipes" / "pretrain" / "fsdp.yaml"), "--trainer.accelerator=cpu"],
     r"FSDP .* on CPU processes use --trainer.strategy=ddp"),
])
def test_a_gpu_run_on_a_machine_without_one_is_one_line(extra, message, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from vlweak.cli import main

    with pytest.raises(SystemExit) as info:
        main(["fit", "--config", str(REPO / "recipes" / "pretrain" / "shapes.yaml"), *extra])
    assert info.value.code == 2
    assert re.search(message, capsys.readouterr().err)


def test_torchrun_with_another_number_of_devices_is_one_line(monkeypatch, capsys):
    # torchrun --nproc-per-node=2 with the recipe's devices: 1 would run two whole jobs side by side
    from vlweak.cli import main

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    with pytest.raises(SystemExit) as info:
        main(["test", "--config", str(REPO / "recipes" / "quickstart.yaml"), "--trainer.accelerator=cpu"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert "launched as 2 processes (2 on this node) but trainer.devices 1 x num_nodes 1 = 1" in err
    assert "pass --trainer.devices=2 --trainer.num_nodes=1" in err


def test_lightnings_optimizer_options_are_not_offered(capsys):
    # every method sets its own optimizer and schedule: --optimizer would be overridden, silently
    with pytest.raises(SystemExit) as info:
        build_cli(["fit", "--config", str(REPO / "recipes" / "coop" / "shapes_few_shot.yaml"), "--optimizer=Adam"])
    assert info.value.code == 2 and "unrecognized arguments: --optimizer=Adam" in capsys.readouterr().err


def test_pseudolabeled_data_module_is_known_by_its_short_name(capsys):
    with pytest.raises(SystemExit):
        build_cli(["fit", "--data.help", "PseudoLabeledDataModule"])
    assert "--data.pseudolabels PSEUDOLABELS" in capsys.readouterr().out


def test_a_plain_state_dict_or_best_as_ckpt_path_is_one_line(tmp_path, tiny_ckpt, capsys, monkeypatch):
    import torch

    monkeypatch.delenv("VLWEAK_TRACEBACK", raising=False)
    plain = tmp_path / "model.pt"
    torch.save({"w": torch.zeros(2)}, plain)  # a torch zip file, but no Lightning checkpoint
    for given, message in ((str(plain), f"--ckpt_path {plain} is not a Lightning checkpoint"),
                           ("best", "--ckpt_path best: a vlweak evaluation reads a fit's checkpoint file")):
        with pytest.raises(SystemExit) as info:
            main(_main_args(tmp_path, tiny_ckpt, f"--ckpt_path={given}"))
        err = capsys.readouterr().err
        assert info.value.code == 2 and f"vlweak: error: ValueError: {message}" in err and "Traceback" not in err


def test_help_describes_vlweaks_subcommands_and_checkpoints(capsys):
    with pytest.raises(SystemExit):
        build_cli(["--help"])
    assert "Pseudolabel the data module's predict_split" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        build_cli(["test", "--help"])
    out = capsys.readouterr().out
    assert "Score the test split: metrics" in out and "the fit's checkpoint to evaluate" in " ".join(out.split())
    assert "best model checkpoint" not in out


@pytest.mark.parametrize(("recipe", "option", "choices"), [
    ("prompt_tuning/shapes_unsupervised.yaml", "--model.init_args.strategy", "fpl, ifpl, grip"),
    ("coop/shapes_few_shot.yaml", "--model.init_args.position", "end, middle, front"),
    ("cdul/shapes.yaml", "--model.init_args.snippet_fit", "stretch, crop"),
    ("quickstart.yaml", "--data.init_args.task", "shape, coarse, colour, colour_shape"),
])
def test_an_option_of_fixed_values_lists_them_and_refuses_others_in_a_line(recipe, option, choices, capsys):
    """Options with a fixed set of values are typed as such: --help shows the values, and a value
    outside them is refused at parsing, by the recipe's class alone, after a one-line usage."""
    with pytest.raises(SystemExit) as info:
        build_cli(["fit", "--config", str(REPO / "recipes" / recipe), f"{option}=bogus"])
    assert info.value.code == 2
    err = capsys.readouterr().err
    quoted = ", ".join(f"'{c}'" for c in choices.split(", "))
    error = [line for line in err.splitlines() if line.startswith("error:")]
    assert error and f"Expected a typing.Literal[{quoted}]. Got value: bogus" in error[0], err
    assert "Union subtypes" not in err and len(err.splitlines()) == 3, err  # usage, tip, error
    section = option.split(".")[0].lstrip("-")  # model / data
    assert re.search(rf"\(--{section}\.help [\w.]+ lists its options\)$", error[0]), error[0]
    with pytest.raises(SystemExit):
        build_cli(["fit", "--config", str(REPO / "recipes" / recipe), f"--{section}.help",
                   yaml.safe_load((REPO / "recipes" / recipe).read_text())[section]["class_path"]])
    assert f"{{{choices.replace(', ', ',')}}}" in capsys.readouterr().out
