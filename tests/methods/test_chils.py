"""CHiLS: the reweighting math against direct computation, the Lightning module end to end,
errors, and CHiLS beating superclass zero-shot on the built-in world."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import pytest
import torch

from tests.conftest import REPO

from vlweak.data import ShapesWorldDataModule
from vlweak.data.world import COARSE
from vlweak.labels import PseudoLabels, UnknownParentError
from vlweak.methods import CHiLS
from vlweak.methods.chils import (
    aggregate,
    all_predictions,
    best_per_parent,
    reweight,
    sum_per_parent,
    variant_scores,
)

# ----------------------------------------------------------------------------- the math, by hand
# 2 classes: A = {a1, a2}, B = {b1}; sub-class -> parent map [0, 0, 1]
PARENT = torch.tensor([0, 0, 1])
P_SUB = torch.tensor([[0.30, 0.30, 0.40],   # sub-class argmax b1 -> B
                      [0.10, 0.60, 0.30],
                      [0.45, 0.05, 0.50]])
P_SUP = torch.tensor([[0.80, 0.20],          # the superclass disagrees: A
                      [0.25, 0.75],
                      [0.50, 0.50]])


def direct(p_sub, p_sup, parent):
    """Loop-by-loop reference of every variant's class scores."""
    n, s = p_sub.shape
    c = p_sup.shape[1]
    rw = torch.zeros(n, s)
    best_sub, best_rw, agg = torch.full((n, c), -1.0), torch.full((n, c), -1.0), torch.zeros(n, c)
    for i in range(n):
        for j in range(s):
            p = int(parent[j])
            rw[i, j] = p_sub[i, j] * p_sup[i, p]
            best_sub[i, p] = max(best_sub[i, p], p_sub[i, j])
            best_rw[i, p] = max(best_rw[i, p], rw[i, j])
            agg[i, p] += p_sub[i, j]
        agg[i] *= p_sup[i]
    return rw, best_sub, best_rw, agg


def test_math_matches_direct_computation():
    rw, best_sub, best_rw, agg = direct(P_SUB, P_SUP, PARENT)
    torch.testing.assert_close(reweight(P_SUB, P_SUP, PARENT), rw)
    torch.testing.assert_close(best_per_parent(P_SUB, PARENT, 2), best_sub)
    torch.testing.assert_close(best_per_parent(rw, PARENT, 2), best_rw)
    torch.testing.assert_close(sum_per_parent(P_SUB, PARENT, 2), agg / P_SUP)
    torch.testing.assert_close(aggregate(P_SUB, P_SUP, PARENT), agg)
    # hand-worked row 0: rw = [0.24, 0.24, 0.08] -> A; sub-class argmax b1 -> B; aggregate 0.48 vs 0.08 -> A
    torch.testing.assert_close(rw[0], torch.tensor([0.24, 0.24, 0.08]))
    preds = all_predictions(P_SUB, P_SUP, PARENT)
    assert preds["superclass"].tolist() == [0, 1, 0]
    assert preds["subclass"].tolist() == [1, 0, 1]
    # row 1: a2 0.6*0.25=0.15 < b1 0.3*0.75=0.225 -> B; row 2: a1 0.45*0.5 < b1 0.5*0.5 -> B
    assert preds["reweight"].tolist() == [0, 1, 1]
    assert preds["aggregate"].tolist() == [0, 1, 0]  # row 1: A 0.25*0.7=0.175 < B 0.75*0.3=0.225


def test_variant_scores_agree_with_predictions():
    torch.manual_seed(0)
    p_sub = torch.randn(50, 7).softmax(1)
    p_sup = torch.randn(50, 3).softmax(1)
    parent = torch.tensor([0, 0, 1, 1, 1, 2, 2])
    preds = all_predictions(p_sub, p_sup, parent)
    rw, best_sub, best_rw, agg = direct(p_sub, p_sup, parent)
    for v, ref in (("superclass", p_sup), ("subclass", best_sub), ("reweight", best_rw), ("aggregate", agg)):
        scores, sub_scores = variant_scores(p_sub, p_sup, parent, v)
        torch.testing.assert_close(scores.sum(1), torch.ones(50))
        torch.testing.assert_close(scores, ref / ref.sum(1, keepdim=True))
        assert torch.equal(scores.argmax(1), preds[v]), v
        assert sub_scores.shape == (50, 7)
    # CHiLS's prediction is the parent of the best reweighted sub-class
    _, sub = variant_scores(p_sub, p_sup, parent, "reweight")
    assert torch.equal(parent[sub.argmax(1)], preds["reweight"])
    with pytest.raises(ValueError):
        variant_scores(p_sub, p_sup, parent, "nope")


# ----------------------------------------------------------------------------- the module
def _trainer(tmp_path) -> L.Trainer:
    from lightning.pytorch.loggers import CSVLogger

    return L.Trainer(
        accelerator="cpu", devices=1, logger=CSVLogger(tmp_path), enable_progress_bar=False,
        enable_checkpointing=False, enable_model_summary=False, default_root_dir=tmp_path,
    )


def _coarse(n_test: int) -> ShapesWorldDataModule:
    return ShapesWorldDataModule(task="coarse", n_train=0, n_val=0, n_test=n_test, batch_size=16)


def test_module_test_loop_artifacts_and_side_by_side_metrics(tiny_backbone, tmp_path, monkeypatch):
    calls = []
    encode_text = type(tiny_backbone).encode_text
    monkeypatch.setattr(type(tiny_backbone), "encode_text", lambda self, t, **kw: calls.append(len(t)) or encode_text(self, t, **kw))
    dm = _coarse(40)
    model = CHiLS(backbone=tiny_backbone, classnames=dm.classnames, hierarchy="shapes", templates=["a {}.", "the {}."])
    trainer = _trainer(tmp_path)
    trainer.test(model, datamodule=dm)
    # class and sub-class text embeddings: 15 names x 2 templates, encoded once
    assert sum(calls) == 15 * 2
    for v in ("superclass", "subclass", "reweight", "aggregate"):
        assert 0.0 <= model.last_metrics[f"test/acc_{v}"] <= 1.0
    assert model.last_metrics["test/acc"] == pytest.approx(model.last_metrics["test/acc_reweight"])
    main = PseudoLabels.load(model.last_artifact, classnames=COARSE)
    sub = PseudoLabels.load(model.last_subclass_artifact)
    assert len(main) == len(sub) == 40 and sub.classnames == model.subclassnames
    # the logged accuracy is the accuracy of the artifact's labels
    truth = dm.raw("test").targets()
    assert model.last_metrics["test/acc"] == pytest.approx((main.labels == truth).float().mean().item(), abs=1e-6)
    assert sub.provenance["variant"] == "reweight" and main.provenance["method"] == "CHiLS"
    assert sub.provenance["split"] == main.provenance["split"] == "test" and sub.sample_ids == main.sample_ids
    # the class pseudolabel is the parent of the predicted sub-class
    assert torch.equal(model.parent.cpu()[sub.labels], main.labels)
    # a second epoch and a fresh module reuse the embeddings (the latter from the embedding cache)
    trainer.test(model, datamodule=dm)
    CHiLS(backbone=tiny_backbone, classnames=dm.classnames, hierarchy="shapes", templates=["a {}.", "the {}."]).build_classifier()
    assert sum(calls) == 15 * 2


def test_predict_on_a_labelled_split_logs_every_variant(tiny_backbone, tmp_path):
    # predict hooks cannot self.log: the side-by-side accuracies go to the loggers directly
    dm = _coarse(24)
    model = CHiLS(backbone=tiny_backbone, classnames=dm.classnames, hierarchy="shapes", templates=["a {}."])
    trainer = _trainer(tmp_path)
    trainer.predict(model, datamodule=dm)
    assert {f"predict/acc_{v}" for v in ("superclass", "subclass", "reweight", "aggregate")} <= set(model.last_metrics)
    logged = (Path(trainer.logger.log_dir) / "metrics.csv").read_text().splitlines()[0].split(",")
    assert "predict/acc_aggregate" in logged and "predict/acc" in logged
    assert PseudoLabels.load(model.last_artifact).provenance["stage"] == "predict"


def test_an_unlabeled_split_is_pseudolabelled_without_metrics(tiny_backbone, tmp_path):
    # a folder of images without labels (or a manifest without them)
    from tests.conftest import write_image_folder
    from vlweak.data import ImageFolderDataModule

    photos = write_image_folder(tmp_path / "photos", {"x": 16}, size=32) / "x"
    dm = ImageFolderDataModule(root=str(photos), classnames=list(COARSE))
    model = CHiLS(backbone=tiny_backbone, classnames=dm.classnames, hierarchy="shapes", templates=["a {}."])
    _trainer(tmp_path).predict(model, datamodule=dm)
    assert len(PseudoLabels.load(model.last_artifact)) == 16 and not model.last_metrics


def test_forward_and_variants(tiny_backbone):
    h = {"polygon": ["triangle", "square"], "curved shape": ["circle"], "symbol": ["star", "ring"]}
    images = torch.randn(3, 3, tiny_backbone.image_size, tiny_backbone.image_size)
    for v in ("superclass", "subclass", "reweight", "aggregate"):
        m = CHiLS(backbone=tiny_backbone, classnames=COARSE, hierarchy=h, variant=v, cache_text=False)
        out = m(images)
        assert out.shape == (3, 3)
        torch.testing.assert_close(out.sum(1), torch.ones(3))


def test_a_subclass_named_like_its_class(tiny_backbone):
    # CHiLS's published sets list each class among its own sub-classes ('clean' adds it too): the
    # name is encoded once and scores in both places
    h = {"polygon": ["polygon", "triangle"], "curved shape": ["circle"], "symbol": ["symbol", "star"]}
    m = CHiLS(backbone=tiny_backbone, classnames=COARSE, hierarchy=h, cache_text=False)
    w = m.build_classifier()
    names = m.hierarchy.parents + m.hierarchy.subclasses
    assert w.shape[0] == len(names) == 8
    torch.testing.assert_close(w[names.index("polygon")], w[3 + m.hierarchy.subclasses.index("polygon")])
    from vlweak.prompts import text_classifier

    torch.testing.assert_close(w, text_classifier(tiny_backbone, list(dict.fromkeys(names)))[
        torch.tensor([list(dict.fromkeys(names)).index(n) for n in names])])
    images = torch.randn(2, 3, tiny_backbone.image_size, tiny_backbone.image_size)
    torch.testing.assert_close(m(images).sum(1), torch.ones(2))
    cleaned = CHiLS(backbone=tiny_backbone, classnames=COARSE, hierarchy="shapes", clean=True, cache_text=False)
    assert cleaned.build_classifier().shape[0] == 3 + len(cleaned.subclassnames)


def test_a_subclass_under_two_classes(tiny_backbone):
    from vlweak.labels.hierarchy import MultipleParentsError

    h = {"polygon": ["triangle", "star"], "curved shape": ["circle"], "symbol": ["star", "ring"]}
    with pytest.raises(MultipleParentsError, match=r"'star' is listed under several parents .*duplicates: qualify"):
        CHiLS(backbone=tiny_backbone, classnames=COARSE, hierarchy=h, cache_text=False)
    m = CHiLS(backbone=tiny_backbone, classnames=COARSE, hierarchy=h, duplicates="qualify", cache_text=False)
    assert "star polygon" in m.subclassnames and "star symbol" in m.subclassnames
    from vlweak.methods import ZLaP

    z = ZLaP(backbone=tiny_backbone, classnames=COARSE, hierarchy=h, duplicates="qualify")
    assert "star symbol" in z.vocabulary_hierarchy().subclasses


def test_errors(tiny_backbone):
    with pytest.raises(ValueError, match="single-label"):
        CHiLS(backbone=tiny_backbone, classnames=COARSE, multilabel=True, hierarchy="shapes")
    with pytest.raises(ValueError, match="needs a hierarchy"):
        CHiLS(backbone=tiny_backbone, classnames=COARSE)
    with pytest.raises(ValueError, match="variant"):
        CHiLS(backbone=tiny_backbone, classnames=COARSE, hierarchy="shapes", variant="best")
    with pytest.raises(UnknownParentError, match=r"\['curved shape', 'symbol'\]; dataset classes the hierarchy lacks: \['curved'\]"):
        CHiLS(backbone=tiny_backbone, classnames=["polygon", "curved"], hierarchy="shapes")
    # a dataset of some of the hierarchy's classes takes theirs
    assert CHiLS(backbone=tiny_backbone, classnames=["polygon", "curved shape"], hierarchy="shapes").hierarchy.parents == [
        "polygon", "curved shape"]
    m = CHiLS(backbone=tiny_backbone, classnames=COARSE + ["blob"], hierarchy="shapes", missing="self")
    assert m.subclassnames[-1] == "blob"


def test_recipe_runs_through_the_cli(tmp_path):
    from vlweak.cli import build_cli

    cli = build_cli(
        [
            "test", "--config", str(REPO / "recipes/chils/shapes_coarse.yaml"),
            "--model.init_args.backbone.init_args.model_name=vlweak-tiny",
            "--model.init_args.backbone.init_args.pretrained=",  # random init
            "--data.init_args.n_test=16", "--data.init_args.batch_size=16",
            f"--trainer.logger.init_args.save_dir={tmp_path}", "--trainer.enable_progress_bar=false",
            "--trainer.accelerator=cpu", f"--data.init_args.cache_dir={tmp_path / 'cache'}",
        ]
    )
    assert isinstance(cli.model, CHiLS) and cli.model.hierarchy.parents == COARSE
    assert any(p.is_file() for p in (tmp_path / "cache").rglob("*"))  # text embeddings in the data's cache_dir
    assert "test/acc_superclass" in cli.model.last_metrics and cli.model.last_artifact.is_file()


# ----------------------------------------------------------------------------- the claim
def test_chils_beats_superclass_zeroshot_on_the_world(shapes_backbone, tmp_path):
    dm = _coarse(600)
    model = CHiLS(backbone=shapes_backbone, classnames=dm.classnames, hierarchy="shapes", artifact_path="")
    _trainer(tmp_path).test(model, datamodule=dm)
    m = model.last_metrics
    assert m["test/acc_reweight"] >= m["test/acc_superclass"] + 0.10, m
    assert m["test/acc_reweight"] >= 0.6, m
