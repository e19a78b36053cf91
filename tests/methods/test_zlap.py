"""ZLaP as a Lightning method: every mode under test/predict, the recipe through the CLI, 2-process
DDP equal to one process, errors, and transductive ZLaP beating zero-shot on the shifted world."""

from __future__ import annotations

import csv
from pathlib import Path

import lightning as L
import pytest
import torch

from tests.conftest import REPO
from vlweak.data import ShapesWorldDataModule
from vlweak.labels import PseudoLabels
from vlweak.methods import ZeroShot, ZLaP
from vlweak.methods.zlap import normalise_scores

RECIPE = str(REPO / "recipes" / "zlap" / "shapes_shift.yaml")


def _trainer(tmp_path) -> L.Trainer:
    from lightning.pytorch.loggers import CSVLogger

    return L.Trainer(
        accelerator="cpu", devices=1, logger=CSVLogger(tmp_path), enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path,
    )


def _world(n_train: int = 48, n_test: int = 20, **kw) -> ShapesWorldDataModule:
    return ShapesWorldDataModule(n_train=n_train, n_val=0, n_test=n_test, shift=1.0, batch_size=8, **kw)


@pytest.mark.parametrize("mode", ["transductive", "inductive", "sparse-inductive"])
def test_each_mode_tests_and_writes_an_artifact(tiny_backbone, tmp_path, mode):
    dm = _world()
    model = ZLaP(backbone=tiny_backbone, classnames=dm.classnames, mode=mode)
    _trainer(tmp_path).test(model, datamodule=dm)
    pl = PseudoLabels.load(model.last_artifact, classnames=dm.classnames)
    assert pl.indices.tolist() == list(range(20))
    # the logged accuracy is the accuracy of the artifact's labels
    truth = dm.raw("test").targets()
    assert model.last_metrics["test/acc"] == pytest.approx((pl.labels == truth).float().mean().item(), abs=1e-6)
    torch.testing.assert_close(pl.scores.sum(1), torch.ones(20))
    assert pl.provenance["method"] == "ZLaP" and pl.provenance["mode"] == mode


def test_predict_on_the_pool_is_transductive_over_the_pool(tiny_backbone, tmp_path):
    dm = _world(predict_split="train")
    model = ZLaP(backbone=tiny_backbone, classnames=dm.classnames, mode="inductive")
    _trainer(tmp_path).predict(model, datamodule=dm)
    pl = PseudoLabels.load(model.last_artifact)
    assert len(pl) == 48
    direct = model.propagator.fit(model.pool_features(), model.classifier()).transductive()
    torch.testing.assert_close(pl.scores, normalise_scores(direct))


def test_predict_on_part_of_the_pool_returns_those_rows(tiny_backbone, tmp_path):
    dm = _world(predict_split="train")
    model = ZLaP(backbone=tiny_backbone, classnames=dm.classnames)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, default_root_dir=tmp_path, limit_predict_batches=2,
    )
    model.artifact_path = str(tmp_path / "part.safetensors")
    trainer.predict(model, datamodule=dm)
    pl = PseudoLabels.load(model.last_artifact)
    assert pl.indices.tolist() == list(range(16))  # 2 batches of 8 of the 48-image pool
    whole = model.propagator.fit(model.pool_features(), model.classifier()).transductive()
    torch.testing.assert_close(pl.scores, normalise_scores(whole)[:16])


def test_multilabel_map_ranks_by_the_raw_propagation_scores(tiny_backbone, tmp_path):
    from vlweak.metrics import multilabel_report

    dm = ShapesWorldDataModule(n_train=48, n_val=0, n_test=24, multilabel=True, batch_size=8)
    model = ZLaP(backbone=tiny_backbone, classnames=dm.classnames, multilabel=True, artifact_path="")
    _trainer(tmp_path).test(model, datamodule=dm)
    raw = model.propagator.transductive()[48:]  # the graph was the pool followed by the test images
    target = model.last_outputs["target"]
    expected = multilabel_report(raw, target)["mAP"].item()
    assert model.last_metrics["test/mAP"] == pytest.approx(expected)
    # confidences (per image rescaled) are what the artifact holds and what F1 reads
    assert model.last_metrics["test/f1_at_threshold"] == pytest.approx(
        multilabel_report(normalise_scores(raw, True), target)["f1_at_threshold"].item()
    )


def test_graph_of_test_images_alone(tiny_backbone, tmp_path):
    dm = _world(n_train=0)
    model = ZLaP(backbone=tiny_backbone, classnames=dm.classnames, pool_split=None, artifact_path="")
    _trainer(tmp_path).test(model, datamodule=dm)
    assert model.propagator.graph.num_images == 20
    # without a pool the inductive modes have nothing to build on
    with pytest.raises(ValueError, match="pool_split"):
        ZLaP(backbone=tiny_backbone, classnames=dm.classnames, mode="inductive", pool_split=None)
    model = ZLaP(backbone=tiny_backbone, classnames=dm.classnames, mode="inductive")
    with pytest.raises(RuntimeError, match="'train' split"):
        _trainer(tmp_path).test(model, datamodule=dm)


def test_bad_mode_raises(tiny_backbone):
    with pytest.raises(ValueError, match="mode"):
        ZLaP(backbone=tiny_backbone, classnames=["a", "b"], mode="dual")


def test_normalised_scores():
    s = torch.tensor([[2.0, 2.0, 0.0], [0.0, 0.0, 0.0], [-1.0, 3.0, 1.0]])
    torch.testing.assert_close(normalise_scores(s), torch.tensor([[0.5, 0.5, 0], [1 / 3] * 3, [0, 0.75, 0.25]]))
    torch.testing.assert_close(normalise_scores(s, multilabel=True)[2], torch.tensor([0, 1, 1 / 3]))


def _recipe_args(tmp_path: Path, ckpt: str) -> list[str]:
    return [
        "--config", RECIPE,
        "--model.init_args.backbone.init_args.model_name=vlweak-tiny",
        f"--model.init_args.backbone.init_args.pretrained={ckpt}",
        "--data.init_args.n_train=30", "--data.init_args.n_test=13", "--data.init_args.batch_size=4",
        f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false",
        "--trainer.accelerator=cpu",
    ]


def test_recipe_runs_through_the_cli_and_ddp_matches_one_process(tmp_path, tiny_ckpt):
    """2-process CPU DDP: 13 test images over 2 ranks (the sampler repeats one); features gathered
    and de-duplicated, one solve, one artifact equal to the single-process run."""
    from tests.cli.test_ddp_methods import _two_processes
    from vlweak.cli import build_cli

    single = build_cli(["test", *_recipe_args(tmp_path / "single", tiny_ckpt)])
    assert isinstance(single.model, ZLaP) and single.model.mode == "transductive"
    ref = PseudoLabels.load(single.model.last_artifact)
    proc = _two_processes(["test", *_recipe_args(tmp_path / "ddp", tiny_ckpt), "--trainer.devices=2",
                           "--trainer.strategy=ddp"], timeout=300)  # started by torchrun
    assert proc.returncode == 0, proc.stderr[-3000:]
    arts = list((tmp_path / "ddp").rglob("pseudolabels-test.safetensors"))
    assert len(arts) == 1
    pl = PseudoLabels.load(arts[0])
    assert pl.indices.tolist() == list(range(13))
    assert torch.allclose(pl.scores, ref.scores, atol=1e-5)
    rows = list(csv.DictReader(open(arts[0].parent / "metrics.csv")))
    assert float(rows[0]["test/acc"]) == pytest.approx(single.model.last_metrics["test/acc"])


# ----------------------------------------------------------------------------- the claim
def _zlap_against_zero_shot(backbone, tmp_path, **options) -> tuple[float, float]:
    dm = ShapesWorldDataModule(n_train=1000, n_val=0, n_test=500, shift=1.0, batch_size=250)
    zs = ZeroShot(backbone=backbone, classnames=dm.classnames, artifact_path="")
    _trainer(tmp_path / "zs").test(zs, datamodule=dm)
    zlap = ZLaP(backbone=backbone, classnames=dm.classnames, artifact_path="", **options)
    _trainer(tmp_path / "zlap").test(zlap, datamodule=dm)
    return zlap.last_metrics["test/acc"], zs.last_metrics["test/acc"]


def test_transductive_zlap_corrects_a_biased_zero_shot_on_the_shifted_world(noisy_backbone, tmp_path):
    # the noisy-caption model calls most shifted-domain ellipses, arrows and squares by a look-alike's
    # name, while its image features still group them: propagation over the pool corrects that
    zlap, zs = _zlap_against_zero_shot(noisy_backbone, tmp_path)
    assert zlap >= zs + 0.05, (zlap, zs)


@pytest.mark.parametrize("mode", ["inductive", "sparse-inductive"])
def test_degree_normalised_inductive_zlap_corrects_a_biased_zero_shot(noisy_backbone, tmp_path, mode):
    # a test image joins the pool's graph with its edges scaled like the graph's own
    # (query_norm: degree); with the paper's raw similarities it gains little here (0.700 / 0.740)
    zlap, zs = _zlap_against_zero_shot(noisy_backbone, tmp_path, mode=mode, query_norm="degree")
    assert zlap >= zs + 0.05, (mode, zlap, zs)


@pytest.mark.xfail(strict=True, reason="not reached with the clean-caption model: transductive ZLaP 0.828 against "
                   "zero-shot 0.832 on the shifted world, whose images' 10 nearest neighbours share their shape only 53% of the time")
def test_transductive_zlap_beats_zero_shot_on_the_shifted_world(shapes_backbone, tmp_path):
    zlap, zs = _zlap_against_zero_shot(shapes_backbone, tmp_path)
    assert zlap >= zs + 0.03, (zlap, zs)


# ----------------------------------------------------------------------------- sub-class text nodes
def test_subclass_nodes_map_back_to_their_classes(tiny_backbone, tmp_path):
    from vlweak.data.world import SHAPE_HIERARCHY

    dm = ShapesWorldDataModule(task="coarse", n_train=48, n_val=0, n_test=20, batch_size=8)
    for reduce in ("sum", "max"):
        model = ZLaP(backbone=tiny_backbone, classnames=dm.classnames, hierarchy="shapes", subclass_reduce=reduce)
        _trainer(tmp_path / reduce).test(model, datamodule=dm)
        subs = model.text_node_names()
        assert sorted(subs) == sorted(s for c in dm.classnames for s in SHAPE_HIERARCHY[c])
        assert model.classifier().shape == (len(subs), tiny_backbone.embed_dim)  # one node per sub-class
        nodes = model.propagate_nodes(model.pool_features(), "train")
        direct = torch.stack(
            [nodes[:, [j for j, s in enumerate(subs) if s in SHAPE_HIERARCHY[c]]] for c in dm.classnames]
        )  # [C, M, S_c]
        want = direct.sum(-1).T if reduce == "sum" else direct.amax(-1).T
        torch.testing.assert_close(model.propagate(model.pool_features(), "train"), want)
        pl = PseudoLabels.load(model.last_artifact, classnames=dm.classnames)  # the artifact is over classes
        assert pl.scores.shape == (20, 3)


def test_a_hierarchy_naming_unknown_classes_is_refused(tiny_backbone):
    from vlweak.labels.hierarchy_errors import UnknownParentError

    with pytest.raises(UnknownParentError, match=r"1 of its 2 classes are not among the dataset's 2: \['curve'\]; dataset classes the hierarchy lacks: \['blob'\]"):
        ZLaP(backbone=tiny_backbone, classnames=["polygon", "blob"], hierarchy={"polygon": ["triangle"], "curve": ["circle"]})
    with pytest.raises(ValueError, match="subclass_reduce .* got 'mean'"):
        ZLaP(backbone=tiny_backbone, classnames=["a"], hierarchy={"a": ["b"]}, subclass_reduce="mean")


def test_subclass_nodes_beat_coarse_names_on_the_coarse_task(shapes_backbone, tmp_path):
    # the coarse names never occur in the world's captions; the shapes do (CHiLS's premise)
    dm = ShapesWorldDataModule(task="coarse", n_train=600, n_val=0, n_test=300, batch_size=300)
    accs = {}
    for hierarchy in (None, "shapes"):
        model = ZLaP(backbone=shapes_backbone, classnames=dm.classnames, hierarchy=hierarchy, artifact_path="")
        _trainer(tmp_path / str(hierarchy)).test(model, datamodule=dm)
        accs[hierarchy] = model.last_metrics["test/acc"]
    assert accs["shapes"] >= accs[None] + 0.3, accs
