"""CoOp: few-shot prompt learning on the labeled images only; with the shipped noisy-caption model,
16 labels per class beat zero-shot on the shifted world."""

from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from tests.conftest import REPO, requires_shipped
from vlweak.cli import build_cli
from vlweak.data.datasets import ShapesWorldDataset

TINY = {"class_path": "vlweak.backbones.OpenCLIPBackbone", "init_args": {"model_name": "vlweak-tiny", "pretrained": None}}


def _cli(tmp_path: Path, model: dict, data: dict, *extra: str):
    cfg = {
        "seed_everything": 0,
        "trainer": {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                    "enable_progress_bar": False, "enable_model_summary": False, "limit_val_batches": 0,
                    "num_sanity_val_steps": 0, "default_root_dir": str(tmp_path)},
        "model": {"class_path": "vlweak.methods.CoOp", "init_args": dict(model, rounds_dir=str(tmp_path / "rounds"))},
        "data": {"class_path": "vlweak.data.ShapesWorldDataModule", "init_args": data},
    }
    path = tmp_path / "coop.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return build_cli(["--config", str(path), *extra], run=False)


def test_coop_reads_and_trains_on_the_labeled_images_only(tmp_path, monkeypatch):
    read: list[tuple[str, int]] = []
    get = ShapesWorldDataset.__getitem__
    monkeypatch.setattr(ShapesWorldDataset, "__getitem__", lambda self, i: read.append((self.split, i)) or get(self, i))

    def fit(folder: Path, cache_features: bool):
        read.clear()
        folder.mkdir()
        cli = _cli(folder, {"backbone": TINY, "n_ctx": 2, "epochs": 3, "warmup_epochs": 1, "cache_features": cache_features},
                   {"n_train": 120, "n_val": 0, "n_test": 24, "shots": 2, "image_size": 32, "batch_size": 8})
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        return cli, [i for split, i in read if split == "train"]

    cli, train_reads = fit(tmp_path / "kept", True)
    labeled = set(cli.datamodule.raw("train").labeled_indices().tolist())
    assert len(labeled) == 24  # 2 per class of 12
    # the pool scan reads the labeled images once; the three epochs train on their kept features
    assert sorted(train_reads) == sorted(labeled)
    assert set(cli.model.pool_index.tolist()) == labeled
    assert cli.trainer.current_epoch == 3
    # encoding every step reads the labeled images in every epoch too, and trains the same prompt
    again, every_reads = fit(tmp_path / "every", False)
    assert set(every_reads) == labeled and len(every_reads) == 4 * len(labeled)
    torch.testing.assert_close(again.model.text_prompt.ctx, cli.model.text_prompt.ctx)
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    assert 0.0 <= cli.model.last_metrics["test/acc"] <= 1.0


def test_a_finished_fit_resumed_says_it_trains_nothing(tmp_path):
    model = {"backbone": TINY, "n_ctx": 2, "epochs": 2, "warmup_epochs": 1, "cache_features": True}
    data = {"n_train": 48, "n_val": 0, "n_test": 0, "shots": 1, "image_size": 32, "batch_size": 8}
    cli = _cli(tmp_path, model, data)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    cli.trainer.save_checkpoint(tmp_path / "done.ckpt")
    longer = _cli(tmp_path, dict(model, epochs=4), data)
    before = longer.model.text_prompt.ctx.detach().clone()
    with pytest.warns(UserWarning, match=r"a finished fit: its epochs are trained, so this fit trains nothing; to train longer") as said:
        longer.trainer.fit(longer.model, datamodule=longer.datamodule, ckpt_path=tmp_path / "done.ckpt")
    # the pool is not the checkpoint's last training set, and no epoch follows: nothing more to say
    assert not [w for w in said if "epochs made of other batches" in str(w.message)]
    torch.testing.assert_close(longer.model.text_prompt.ctx, cli.model.text_prompt.ctx)  # the finished prompt
    assert not torch.equal(before, longer.model.text_prompt.ctx)


def test_coop_without_labels_or_on_multilabel_data_is_refused(tmp_path):
    cli = _cli(tmp_path, {"backbone": TINY, "n_ctx": 2, "epochs": 2},
               {"n_train": 48, "n_val": 0, "n_test": 0, "shots": 0, "image_size": 32})
    with pytest.raises(ValueError, match="CoOp learns from labels.*shots"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    with pytest.raises(ValueError, match="CoOp is single-label.*DualCoOp"):
        _cli(tmp_path, {"backbone": TINY}, {"multilabel": True, "n_train": 8})


def test_the_recipe_has_the_papers_defaults_and_names_the_epochs_option(tmp_path):
    overlay = tmp_path / "tiny.yaml"
    overlay.write_text(yaml.safe_dump({"model": {"init_args": {"backbone": TINY, "n_ctx": 2, "epochs": 2}},
                                       "data": {"init_args": {"n_train": 48, "n_test": 0, "shots": 1, "image_size": 32}}}))
    args = ["--config", str(REPO / "recipes" / "coop" / "shapes_few_shot.yaml"), "--config", str(overlay),
            f"--trainer.logger.init_args.save_dir={tmp_path}", f"--model.init_args.rounds_dir={tmp_path / 'r'}",
            "--trainer.enable_progress_bar=false"]
    m = build_cli(args, run=False).model
    assert (m.lr, m.momentum, m.weight_decay, m.warmup_epochs, m.warmup_lr) == (0.002, 0.9, 5e-4, 1, 1e-5)
    assert m.text_prompt.position == "end" and not m.text_prompt.class_specific
    cli = build_cli(args + ["--trainer.max_epochs=5"], run=False)
    with pytest.warns(UserWarning, match=r"max_epochs=5 is not used: CoOp trains epochs=2 epochs; set model.init_args.epochs"):
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)


@requires_shipped
@pytest.mark.parametrize("weights", [
    # the noisy-caption model's zero-shot misnames three shapes on the shifted domain: labels correct it
    "vlweak-shapes-noisy",
    pytest.param("vlweak-shapes", marks=pytest.mark.xfail(
        strict=True, reason="not reached with the clean-caption model: CoOp 0.825 against zero-shot 0.835; "
        "its zero-shot errors are the world's own ambiguities, which a linear probe on 1,000 true labels does not fix either")),
])
def test_coop_with_16_shots_beats_zero_shot_on_the_shifted_world(tmp_path, weights):
    from vlweak.methods import ZeroShot

    backbone = {"class_path": "vlweak.backbones.OpenCLIPBackbone",
                "init_args": {"model_name": "vlweak-shapes", "pretrained": weights}}
    cli = _cli(tmp_path, {"backbone": backbone, "epochs": 20},  # the paper's lr, context and warm-up
               {"n_train": 400, "n_val": 0, "n_test": 400, "shots": 16, "embeddings": True, "batch_size": 32, "shift": 1.0})
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    coop = cli.model.last_metrics["test/acc"]
    zs = ZeroShot(cli.model.backbone, cli.model.classnames, artifact_path="")
    L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
              default_root_dir=tmp_path).test(zs, datamodule=cli.datamodule, verbose=False)
    print(weights, coop, zs.last_metrics["test/acc"])  # measured: 0.825 against 0.695 (noisy), 192 labeled images
    assert coop > zs.last_metrics["test/acc"] + 0.05, (coop, zs.last_metrics["test/acc"])


def test_the_image_folder_recipe_trains_on_augmented_labeled_images(tmp_path):
    from tests.conftest import write_image_folder

    for split, n in (("train", 6), ("test", 2)):
        write_image_folder(tmp_path / "folder" / split, {"cat": n, "dog": n})
    overlay = tmp_path / "tiny.yaml"
    overlay.write_text(yaml.safe_dump({"model": {"init_args": {"backbone": {**TINY, "init_args": {**TINY["init_args"], "precision": "fp32"}},
                                                               "n_ctx": 2, "epochs": 2}}}))
    cli = build_cli(["--config", str(REPO / "recipes" / "coop" / "imagefolder.yaml"), "--config", str(overlay),
                     f"--data.init_args.root={tmp_path / 'folder'}", "--data.init_args.shots=2", "--data.init_args.num_workers=0",
                     f"--trainer.logger.init_args.save_dir={tmp_path / 'runs'}", "--trainer.enable_progress_bar=false"], run=False)
    assert cli.datamodule.augment == "crop_flip"
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    assert sorted(cli.model.pool_label.tolist()) == [0, 0, 1, 1] and cli.trainer.current_epoch == 2
    cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
    assert cli.model.last_artifact is not None and cli.model.last_artifact.is_file()


def test_unlabeled_rows_of_a_split_without_a_budget_take_no_part(tmp_path):
    from tests.conftest import write_image_folder
    from vlweak.data import ManifestDataModule
    from vlweak.methods import CoOp
    from vlweak.backbones import OpenCLIPBackbone

    folder = write_image_folder(tmp_path / "imgs", {"cat": 3, "dog": 3}, size=32)
    rows = ["path,label"] + [f"{folder / c / f'{k}.png'},{c if k < 2 else ''}" for c in ("cat", "dog") for k in range(3)]
    (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
    dm = ManifestDataModule(train=str(tmp_path / "train.csv"), test=str(tmp_path / "train.csv"), classnames=["cat", "dog"],
                            batch_size=4)
    model = CoOp(OpenCLIPBackbone("vlweak-tiny", pretrained=None), dm.classnames, n_ctx=2, epochs=2,
                 rounds_dir=str(tmp_path / "rounds"))
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    # the two unlabeled rows of each class are dropped from the pool, and each kept row finds its features
    assert model.pool_index.tolist() == [0, 1, 3, 4] and model.pool_label.tolist() == [0, 0, 1, 1]
    assert model._feature_row[model.pool_index].tolist() == [0, 1, 2, 3]
    assert model._feature_row.tolist() == [0, 1, -1, 2, 3]  # no row for the dropped images
    assert trainer.current_epoch == 2
