from pathlib import Path

import pytest
import torch

from tests.conftest import REPO
from vlweak.callbacks.figures import (
    EvaluationFigures,
    binned_calibration_error,
    calibration_bins,
    confusion_matrix,
    expected_calibration_error,
    label_calibration_bins,
    label_sets_agree,
    per_class_accuracy,
)
from vlweak.cli import build_cli

CONF = str(REPO / "tests" / "conf" / "zeroshot_tiny.yaml")
FIGS = {"per_class_accuracy", "confusion_matrix", "reliability", "samples"}


def _args(stage, tmp_path, ckpt, *extra):
    # no callback configured: the CLI adds the figures to every test / predict run
    return [stage, "--config", CONF, f"--trainer.logger.init_args.save_dir={tmp_path}",
            f"--model.init_args.backbone.init_args.pretrained={ckpt}", *extra]


def test_ece_matches_direct_computation():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(500, 7, generator=g).mul(2).softmax(1)
    targets = torch.randint(0, 7, (500,), generator=g)
    conf, pred = scores.max(1)
    direct = 0.0
    for lo in torch.arange(15) / 15:
        hi = lo + 1 / 15
        inside = (conf > lo) & (conf <= hi)
        if inside.any():
            direct += inside.float().mean() * ((pred[inside] == targets[inside]).float().mean() - conf[inside].mean()).abs()
    assert expected_calibration_error(scores, targets) == pytest.approx(float(direct), abs=1e-6)
    from torchmetrics.functional.classification import multiclass_calibration_error

    tm = multiclass_calibration_error(scores, targets, num_classes=7, n_bins=15, norm="l1")
    assert expected_calibration_error(scores, targets) == pytest.approx(float(tm), abs=1e-5)
    # a perfectly calibrated toy case: confidence 0.75 and 3 of 4 right
    s = torch.tensor([[0.75, 0.25]] * 4)
    assert expected_calibration_error(s, torch.tensor([0, 0, 0, 1])) == pytest.approx(0.0, abs=1e-7)
    bins = calibration_bins(s, torch.tensor([0, 0, 0, 1]), 4)
    assert bins["count"].tolist() == [0, 0, 4, 0] and float(bins["accuracy"][2]) == 0.75


def test_per_class_and_confusion():
    pred, t = torch.tensor([0, 1, 1, 2, 0]), torch.tensor([0, 1, 2, 2, 1])
    assert per_class_accuracy(pred, t, 4)[:3].tolist() == [1.0, 0.5, 0.5] and per_class_accuracy(pred, t, 4)[3].isnan()
    cm = confusion_matrix(pred, t, 3)
    assert cm.tolist() == [[1, 0, 0], [1, 1, 0], [0, 1, 1]]


def test_vlweak_test_writes_pngs(tmp_path, tiny_ckpt):
    cli = build_cli(_args("test", tmp_path, tiny_ckpt))
    folder = Path(cli.trainer.log_dir) / "figures"
    assert {p.name for p in folder.glob("*.png")} == {f"test_{n}.png" for n in FIGS}
    assert all(p.stat().st_size > 2000 for p in folder.glob("*.png"))
    cb = next(c for c in cli.trainer.callbacks if isinstance(c, EvaluationFigures))
    out = cli.model.last_outputs
    assert out["stage"] == "test" and out["index"].tolist() == list(range(13))
    assert cb.ece == pytest.approx(expected_calibration_error(out["scores"], out["target"]))


def test_figures_false_draws_none_and_a_configured_callback_is_not_doubled(tmp_path, tiny_ckpt):
    cli = build_cli(_args("test", tmp_path / "off", tiny_ckpt, "--figures=false"))
    assert not any(isinstance(c, EvaluationFigures) for c in cli.trainer.callbacks)
    assert not list((tmp_path / "off").rglob("*.png"))
    cli = build_cli(_args("predict", tmp_path / "own", tiny_ckpt, "--trainer.callbacks+=vlweak.callbacks.EvaluationFigures",
                          "--trainer.callbacks.init_args.n_samples=4"))
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, EvaluationFigures)]
    assert cb.n_samples == 4 and set(cb.saved) == FIGS  # the configured one, drawing after predict too
    cli = build_cli(_args("test", tmp_path / "gone", tiny_ckpt, "--trainer.callbacks+=vlweak.callbacks.EvaluationFigures",
                          "--figures=false"))
    assert not any(isinstance(c, EvaluationFigures) for c in cli.trainer.callbacks)
    assert not list((tmp_path / "gone").rglob("*.png"))  # false means no figures, a configured callback's neither


def test_multilabel_calibration_bins_match_direct_counts():
    scores = torch.tensor([[0.9, 0.1, 0.55], [0.8, 0.3, 0.05], [0.2, 0.95, 0.6]])
    targets = torch.tensor([[1, 0, 1], [0, 0, -1], [0, 1, 1]])
    mask = torch.tensor([[True, True, False], [True, True, True], [True, True, True]])
    bins = label_calibration_bins(scores, targets, mask, n_bins=2)
    # known entries: row 0 (0.9:1, 0.1:0), row 1 (0.8:0, 0.3:0; -1 unknown), row 2 (0.2:0, 0.95:1, 0.6:1)
    assert bins["count"].tolist() == [3, 4]
    torch.testing.assert_close(bins["confidence"], torch.tensor([0.6 / 3, (0.9 + 0.8 + 0.95 + 0.6) / 4]))
    torch.testing.assert_close(bins["accuracy"], torch.tensor([0.0, 3 / 4]))
    want = 3 / 7 * abs(0 - 0.2) + 4 / 7 * abs(0.75 - 3.25 / 4)
    assert binned_calibration_error(bins) == pytest.approx(want)


def test_label_sets_agree_on_known_entries_only():
    predicted = torch.tensor([[True, False, True], [True, False, False], [False, True, False]])
    targets = torch.tensor([[1, 0, 1], [1, 0, -1], [0, 0, 0]])
    mask = torch.tensor([[True, True, True], [True, True, True], [True, False, True]])
    # row 1: its third entry is unknown (-1); row 2: the predicted class is masked out
    assert label_sets_agree(predicted, targets).tolist() == [True, True, False]
    assert label_sets_agree(predicted, targets, mask).tolist() == [True, True, True]


def test_multilabel_test_draws_per_class_ap_reliability_and_label_sets(tmp_path, tiny_ckpt):
    cli = build_cli(_args("test", tmp_path, tiny_ckpt, "--data.init_args.multilabel=true"))
    folder = Path(cli.trainer.log_dir) / "figures"
    assert {p.name for p in folder.glob("*.png")} == {f"test_{n}.png" for n in ("per_class_ap", "reliability", "samples")}
    (cb,) = [c for c in cli.trainer.callbacks if isinstance(c, EvaluationFigures)]
    out = cli.model.last_outputs
    assert cb.ece == pytest.approx(binned_calibration_error(label_calibration_bins(out["scores"], out["target"])))
    torch.testing.assert_close(out["per_class"].nanmean(), torch.tensor(cli.model.last_metrics["test/mAP"]), atol=1e-6, rtol=0)


def test_wandb_offline_gets_images_artifact_and_config(tmp_path, tiny_ckpt, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    build_cli(_args("test", tmp_path, tiny_ckpt, "--trainer.logger=WandbLogger",
                    f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.logger.init_args.project=vlweak-tests"))
    import wandb

    wandb.finish()
    # the W&B service writes the offline record log on its own; shutting it down closes the log, which
    # finish() alone does not wait for (under load the log was read with its header only)
    wandb.teardown()
    runs = list(tmp_path.rglob("offline-run-*"))
    assert len(runs) == 1
    media = sorted(p.name.rsplit("_", 2)[0] for p in (runs[0] / "files" / "media" / "images").rglob("*.png"))
    assert media == sorted(FIGS)
    # the PNGs are in the run directory too
    assert len(list(tmp_path.rglob("figures/test_*.png"))) == 4
    # the artifact (type "pseudolabels", with the artifact file) and the resolved config are in the
    # offline run's record log (protobuf: a 12-byte string field "pseudolabels" is the type)
    log = next(runs[0].glob("*.wandb")).read_bytes()
    run_id = runs[0].name.rsplit("-", 1)[1]
    assert b"\x0cpseudolabels" in log and f"pseudolabels-test-{run_id}".encode() in log
    assert b"pseudolabels-test.safetensors" in log
    assert b"resolved_config" in log and b"vlweak.methods.ZeroShot" in log


def test_per_class_bars_of_many_classes_rank_the_classes_with_a_value():
    # 72 classes, 40 without test images: the lowest bars are the worst classes, not the empty ones
    from vlweak.callbacks.figures import draw_per_class_accuracy

    acc = torch.full((72,), float("nan"))
    acc[:32] = torch.linspace(0.05, 1.0, 32)
    names = [f"class{i}" for i in range(72)]
    fig = draw_per_class_accuracy(acc, names, "test", max_classes=10)
    ax = fig.axes[0]
    shown = [t.get_text() for t in ax.get_xticklabels()]
    assert shown == [f"class{i}" for i in (0, 1, 2, 3, 4, 27, 28, 29, 30, 31)]
    assert "5 lowest and 5 highest of 32 (40 without a value not shown)" in ax.get_title()


def test_sample_grid_tops_up_with_wrong_predictions_when_few_are_right():
    class _Data:
        def raw(self, stage):
            return [{"image": torch.zeros(3, 4, 4)} for _ in range(60)]

    figures = EvaluationFigures(n_samples=16)
    out = {"index": torch.arange(60)}
    for correct, wrong_shown in (([False] * 58 + [True] * 2, 14), ([True] * 58 + [False] * 2, 2), ([False] * 60, 16)):
        picked = figures._pick(out, "test", _Data(), correct)
        assert len(picked) == 16 and sum(not correct[r] for r, _ in picked) == wrong_shown


def _offline_wandb_log(tmp_path, monkeypatch, args):
    """Run the CLI with an offline W&B logger; the bytes of the run's record log."""
    import wandb

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    build_cli([*args, "--trainer.logger=WandbLogger", f"--trainer.logger.init_args.save_dir={tmp_path}",
               "--trainer.logger.init_args.project=vlweak-tests", "--trainer.enable_progress_bar=false"])
    wandb.finish()
    wandb.teardown()  # closes the offline record log
    (run,) = tmp_path.rglob("offline-run-*")
    return next(run.glob("*.wandb")).read_bytes(), run.name.rsplit("-", 1)[1]


def test_wandb_gets_chils_subclass_artifact_with_the_class_one(tmp_path, monkeypatch):
    log, run_id = _offline_wandb_log(tmp_path, monkeypatch, [
        "test", "--config", str(REPO / "recipes/chils/shapes_coarse.yaml"),
        "--model.init_args.backbone.init_args.model_name=vlweak-tiny", "--model.init_args.backbone.init_args.pretrained=",
        "--data.init_args.n_test=16", "--data.init_args.batch_size=16", "--figures=false",
    ])
    files = sorted(p.name for p in tmp_path.rglob("pseudolabels-test*.safetensors"))
    assert files == ["pseudolabels-test-subclasses.safetensors", "pseudolabels-test.safetensors"]
    assert f"pseudolabels-test-{run_id}".encode() in log
    assert b"pseudolabels-test-subclasses.safetensors" in log and b"pseudolabels-test.safetensors" in log


def test_wandb_gets_cdul_train_pseudolabels_of_a_fit(tmp_path, monkeypatch):
    log, run_id = _offline_wandb_log(tmp_path, monkeypatch, [
        "fit", "--config", str(REPO / "recipes/cdul/shapes.yaml"),
        "--model.init_args.backbone.init_args.model_name=vlweak-tiny", "--model.init_args.backbone.init_args.pretrained=",
        "--data.init_args.n_train=32", "--data.init_args.n_val=16", "--data.init_args.n_test=16",
        "--trainer.max_epochs=1", "--trainer.enable_model_summary=false",
    ])
    for name in ("init", "refined"):
        assert f"pseudolabels-train-{name}-{run_id}".encode() in log
        assert f"pseudolabels-train-{name}.safetensors".encode() in log
