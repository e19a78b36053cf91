"""Methods used from Python, as in a notebook: no CLI to build the default backbone or to link the
data module's vocabulary into the method."""

import lightning as L
import pytest
import torch

from tests.conftest import requires_shipped
from vlweak.backbones import OpenCLIPBackbone
from vlweak.data import ShapesWorldDataModule
from vlweak.methods import CLIPPretrain, DualCoOp, ZeroShot, ZLaP


@requires_shipped
def test_the_default_backbone_is_built_for_each_method():
    a, b = ZeroShot(), ZLaP()
    assert type(a.backbone) is OpenCLIPBackbone and a.backbone is not b.backbone
    assert a.backbone.model_name == "vlweak-shapes"
    for x, y in zip(a.backbone.state_dict().values(), b.backbone.state_dict().values()):
        assert torch.equal(x, y)  # the shipped weights, in two modules
    # a method with learned prompts builds its learner on it at construction
    assert type(DualCoOp(classnames=["circle", "square"], multilabel=True, n_ctx=2).backbone) is OpenCLIPBackbone
    pretrain = CLIPPretrain()
    assert type(pretrain.backbone) is OpenCLIPBackbone and not pretrain.backbone.freeze


def _trainer(tmp_path) -> L.Trainer:
    return L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path)


def test_a_method_without_classnames_takes_the_data_modules(tmp_path, tiny_backbone):
    dm = ShapesWorldDataModule(n_train=0, n_val=0, n_test=12, image_size=32, multilabel=True)
    model = ZeroShot(backbone=tiny_backbone, artifact_path=str(tmp_path / "zs.safetensors"))
    _trainer(tmp_path).test(model, datamodule=dm, verbose=False)
    assert model.classnames == dm.classnames and model.multilabel
    assert "test/mAP" in model.last_metrics
    # given classnames but the other kind of labels: named, not an IndexError deep in the metrics
    single = ZeroShot(backbone=tiny_backbone, classnames=dm.classnames, artifact_path=str(tmp_path / "b.safetensors"))
    with pytest.raises(ValueError, match=r"labels are multi-label but ZeroShot was built with multilabel=False"):
        _trainer(tmp_path).test(single, datamodule=dm, verbose=False)


def test_classes_other_than_the_data_modules_are_refused_and_linked_ones_follow_the_next_data(tmp_path, shapes_backbone):
    shape = ShapesWorldDataModule(n_train=0, n_val=0, n_test=60, seed=1)
    coarse = ShapesWorldDataModule(n_train=0, n_val=0, n_test=60, seed=1, task="coarse")
    from vlweak.data.datasets import VocabularyError

    for given, detail in ((list(reversed(shape.classnames)), "same names, different order"),
                          (shape.classnames[:6], r"extra \['crescent', 'heart', 'star', 'cross', 'arrow'\] \.\.\.\)")):
        model = ZeroShot(backbone=shapes_backbone, classnames=given, artifact_path="")
        with pytest.raises(VocabularyError, match=rf"built for {len(given)} classes and the data module has 12 \({detail}"):
            _trainer(tmp_path).test(model, datamodule=shape, verbose=False)
    # a notebook testing one method on one data module, then on another: the second's classes
    model = ZeroShot(backbone=shapes_backbone, artifact_path=str(tmp_path / "zs.safetensors"))
    _trainer(tmp_path).test(model, datamodule=shape, verbose=False)
    assert model.last_metrics["test/acc"] > 0.8
    _trainer(tmp_path).test(model, datamodule=coarse, verbose=False)
    assert model.classnames == coarse.classnames and len(coarse.classnames) == 3
    assert model.classifier.shape[0] == 3 and model.last_metrics["test/acc"] > 1 / 3


def test_changed_templates_rebuild_the_classifier_outside_a_trainer(shapes_backbone):
    model = ZeroShot(backbone=shapes_backbone, classnames=["circle", "square"], templates="simple")
    images = torch.rand(2, 3, 64, 64)
    before = model(images)
    simple = model.classifier.clone()
    model.templates = ["a drawing of a {}, upside down."]
    after = model(images)
    assert not torch.allclose(model.classifier, simple) and not torch.allclose(after, before)


def test_zlap_builds_each_runs_graph_on_that_runs_pool(tmp_path, tiny_backbone):
    model = ZLaP(backbone=tiny_backbone, artifact_path="", mode="inductive")
    for n_train in (40, 24):
        dm = ShapesWorldDataModule(n_train=n_train, n_val=0, n_test=12, image_size=32)
        _trainer(tmp_path).test(model, datamodule=dm, verbose=False)
        assert model.pool_features().shape[0] == n_train


def test_metrics_and_calibration_of_an_unlabeled_evaluation_are_its_own(tmp_path, tiny_backbone):
    from vlweak.callbacks import EvaluationFigures

    figures = EvaluationFigures()
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, default_root_dir=tmp_path,
                        callbacks=[figures])
    model = ZeroShot(backbone=tiny_backbone, artifact_path="")
    dm = ShapesWorldDataModule(n_train=24, n_val=0, n_test=12, image_size=32, shots=0, predict_split="train")
    trainer.test(model, datamodule=dm, verbose=False)
    assert "test/acc" in model.last_metrics and figures.ece is not None
    from tests.conftest import write_image_folder
    from vlweak.data import ImageFolderDataModule

    photos = write_image_folder(tmp_path / "photos", {"x": 6}) / "x"  # a folder of unlabeled images
    trainer.predict(model, datamodule=ImageFolderDataModule(root=str(photos), classnames=dm.classnames))
    assert model.last_metrics == {} and figures.ece is None


def test_a_method_without_classnames_says_how_to_give_them(tiny_backbone):
    from vlweak.methods import CoOp

    with pytest.raises(ValueError, match=r"CoOp has no class names: it builds its prompts .*\(CoOp\(classnames=dm.classnames"):
        CoOp(backbone=tiny_backbone, n_ctx=2)
    with pytest.raises(ValueError, match=r"ZeroShot has no class names: give them .* or run it under a trainer"):
        ZeroShot(backbone=tiny_backbone)(torch.rand(1, 3, 32, 32))


def test_cdul_without_classnames_builds_its_head_for_the_data_modules(tmp_path, tiny_backbone):
    from vlweak.methods import CDUL

    dm = ShapesWorldDataModule(n_train=16, n_val=0, n_test=8, image_size=32, multilabel=True, batch_size=8)
    model = CDUL(backbone=tiny_backbone, artifact_path="", cache_dir=str(tmp_path / "cache"), label_warmup_epochs=1)
    trainer = L.Trainer(max_epochs=1, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, limit_val_batches=0, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    assert model.classnames == dm.classnames and model.head.out_features == 12 and bool(model.fitted)
    trainer.test(model, datamodule=dm, verbose=False)
    assert "test/mAP" in model.last_metrics


def test_a_data_module_without_a_val_split_fits_without_validation(tmp_path, tiny_backbone, caplog):
    # n_val: 0 (or an image folder with train and test only): the fit trains, saying it does not validate
    from vlweak.methods import CoOp

    dm = ShapesWorldDataModule(n_train=24, n_val=0, n_test=8, image_size=32, shots=2)
    model = CoOp(backbone=tiny_backbone, classnames=dm.classnames, n_ctx=2, epochs=2, warmup_epochs=0,
                 rounds_dir=str(tmp_path / "rounds"))
    before = model.text_prompt.ctx.detach().clone()
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False,
                        enable_checkpointing=False, default_root_dir=tmp_path)
    with caplog.at_level("INFO"):
        trainer.fit(model, datamodule=dm)
    assert trainer.current_epoch == 2 and not torch.equal(model.text_prompt.ctx, before)
    assert "ShapesWorldDataModule has no 'val' split (n_val: 0): the fit runs without validation" in caplog.text
    with pytest.raises(RuntimeError, match=r"has no 'val' split \(n_val: 0\)"):
        trainer.validate(model, datamodule=dm, verbose=False)  # asked for by name: still an error


def test_a_prompt_learner_scores_images_when_called(tiny_backbone):
    # model(images) through the prompts: initialised from the template's phrase, CoOp is zero-shot
    from vlweak.methods import CoOp

    names = ["circle", "square", "star"]
    images = torch.rand(4, 3, 32, 32)
    coop = CoOp(backbone=tiny_backbone, classnames=names, ctx_init="a photo of a")
    zero_shot = ZeroShot(backbone=tiny_backbone, classnames=names, templates="simple")
    probs = coop(images)
    assert probs.shape == (4, 3) and torch.allclose(probs.sum(1), torch.ones(4))
    torch.testing.assert_close(probs, zero_shot(images), atol=1e-4, rtol=1e-4)


def test_a_data_module_outside_a_trainer_says_to_give_its_transform(tiny_backbone):
    dm = ShapesWorldDataModule(n_train=4, n_val=0, n_test=4, image_size=32)
    with pytest.raises(RuntimeError, match=r"ShapesWorldDataModule\(\.\.\., transform=backbone.transform\)"):
        dm.setup("test")
    dm = ShapesWorldDataModule(n_train=4, n_val=0, n_test=4, image_size=32, transform=tiny_backbone.transform)
    dm.setup("test")
    assert next(iter(dm.test_dataloader()))["image"].shape[-1] == tiny_backbone.image_size


@pytest.mark.parametrize("bars", [False, True])
def test_vlweaks_own_progress_bars_follow_the_trainers(tmp_path, tiny_backbone, capsys, bars):
    model = ZLaP(backbone=tiny_backbone, artifact_path="")
    dm = ShapesWorldDataModule(n_train=24, n_val=0, n_test=12, image_size=32, embeddings=True, seed=7 + bars)  # not cached
    trainer = L.Trainer(logger=False, enable_progress_bar=bars, enable_model_summary=False, default_root_dir=tmp_path)
    trainer.test(model, datamodule=dm, verbose=False)
    err = capsys.readouterr().err
    assert ("encoding train" in err) == bars and ("encoding test" in err) == bars, err[-500:]
    # outside a trainer, after its run, bars show again
    from vlweak.data.cache import encode_images
    from vlweak.data.datasets import Transformed

    encode_images(tiny_backbone, Transformed(dm.raw("test"), tiny_backbone.transform), desc="encoding by hand")
    assert "encoding by hand" in capsys.readouterr().err


def test_a_trainer_reused_for_test_after_fit_keeps_the_rounds_callback_quietly(tmp_path, tiny_backbone, caplog):
    import logging

    from vlweak.callbacks import PseudolabelRounds
    from vlweak.methods import CoOp

    caplog.set_level(logging.INFO)
    dm = ShapesWorldDataModule(n_train=48, n_val=0, n_test=12, image_size=32, shots=2, embeddings=True)
    model = CoOp(backbone=tiny_backbone, classnames=dm.classnames, n_ctx=2, epochs=2, rounds_dir=str(tmp_path / "rounds"))
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        enable_checkpointing=False, default_root_dir=tmp_path)
    trainer.fit(model, datamodule=dm)
    trainer.test(model, datamodule=dm, verbose=False)
    trainer.test(model, datamodule=dm, verbose=False)
    assert "will override existing callbacks" not in caplog.text
    assert sum(isinstance(cb, PseudolabelRounds) for cb in trainer.callbacks) == 1


def test_text_classifiers_are_encoded_once_across_runs(tmp_path, tiny_backbone, monkeypatch):
    # a sweep's runs (or a notebook's re-runs) read the class and sub-class prompts from the cache
    calls = []
    real = tiny_backbone.encode_text
    monkeypatch.setattr(tiny_backbone, "encode_text", lambda texts, *a, **k: calls.append(len(texts)) or real(texts, *a, **k))
    dm = ShapesWorldDataModule(n_train=16, n_val=0, n_test=8, image_size=32, task="coarse")
    templates = ["a {} drawn once.", "a {} drawn twice."]  # prompts no other test encodes (the cache is shared)
    for _ in range(2):
        _trainer(tmp_path).test(ZeroShot(backbone=tiny_backbone, artifact_path="", templates=templates), datamodule=dm, verbose=False)
    assert sum(calls) == 3 * 2
    calls.clear()
    for _ in range(2):
        _trainer(tmp_path).test(ZLaP(backbone=tiny_backbone, artifact_path="", hierarchy="shapes", templates=templates),
                                datamodule=dm, verbose=False)
    assert sum(calls) == 12 * 2  # the 12 shapes under the 3 coarse classes, two templates, once


def test_predict_on_a_budgeted_train_split_scores_against_all_its_labels(tmp_path, tiny_backbone):
    # shots: 2 hides the pool's labels from training; a pseudolabelling pass is scored against all of them
    from vlweak.labels import PseudoLabels

    dm = ShapesWorldDataModule(n_train=48, n_val=0, n_test=0, image_size=32, shots=2, predict_split="train")
    model = ZeroShot(backbone=tiny_backbone, artifact_path=str(tmp_path / "zs.safetensors"))
    _trainer(tmp_path).predict(model, datamodule=dm)
    art = PseudoLabels.load(model.last_artifact)
    truth = dm.raw("train").true_targets()
    assert len(art) == 48 and (dm.raw("train").targets() < 0).sum() > 0
    assert model.last_metrics["predict/acc"] == pytest.approx(float((art.labels == truth).float().mean()))


def test_an_artifact_path_naming_a_folder_writes_into_it(tmp_path, tiny_backbone):
    dm = ShapesWorldDataModule(n_train=0, n_val=0, n_test=8, image_size=32)
    for given, folder in ((str(tmp_path), tmp_path), (str(tmp_path / "new") + "/", tmp_path / "new")):
        model = ZeroShot(backbone=tiny_backbone, artifact_path=given)
        _trainer(tmp_path).test(model, datamodule=dm, verbose=False)
        assert model.last_artifact == folder / "pseudolabels-test.safetensors" and model.last_artifact.is_file()
    assert not (tmp_path.parent / f"{tmp_path.name}.safetensors").exists()
