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
