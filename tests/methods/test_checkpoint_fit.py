"""A checkpoint read into a method: per-class parameters serve their own class vocabulary in their own
order, and tensors of another shape are named, before Lightning's raw size-mismatch error."""

from __future__ import annotations

import pytest
import torch

from vlweak.backbones import CheckpointMismatchError, OpenCLIPBackbone
from vlweak.methods import CDUL, CoOp, DualCoOp

NAMES = ["circle", "square", "star"]


def _checkpoint(model) -> dict:
    return {"hyper_parameters": dict(model.hparams), "state_dict": {k: v.clone() for k, v in model.state_dict().items()}}


@pytest.mark.parametrize("build", [
    lambda bb, names: CoOp(backbone=bb, classnames=names, n_ctx=2, class_specific=True),
    lambda bb, names: DualCoOp(backbone=bb, classnames=names, multilabel=True, n_ctx=2),
    lambda bb, names: CDUL(backbone=bb, classnames=names, multilabel=True),
])
def test_per_class_parameters_serve_their_own_vocabulary_only(tiny_backbone, build):
    saved = _checkpoint(build(tiny_backbone, NAMES))
    build(tiny_backbone, NAMES).on_load_checkpoint(saved)  # the same classes: read
    with pytest.raises(CheckpointMismatchError, match=r"for its classes in the order \['circle', 'square', 'star'\]; "
                                                      r"this run's data lists them as \['star', 'circle', 'square'\]"):
        build(tiny_backbone, ["star", "circle", "square"]).on_load_checkpoint(saved)
    with pytest.raises(CheckpointMismatchError, match=r"trained for 3 classes .* this run has 2, 1 of them not among its classes \(\['ring'\]\)"):
        build(tiny_backbone, ["circle", "ring"]).on_load_checkpoint(saved)


def test_shared_prompts_transfer_to_other_classes(tiny_backbone):
    saved = _checkpoint(CoOp(backbone=tiny_backbone, classnames=NAMES, n_ctx=2))
    other = CoOp(backbone=tiny_backbone, classnames=["ring", "cross"], n_ctx=2)
    other.on_load_checkpoint(saved)
    other.load_state_dict(saved["state_dict"])
    assert torch.equal(other.text_prompt.ctx, saved["state_dict"]["text_prompt.ctx"])


def test_tensors_of_another_shape_are_named(tiny_backbone):
    saved = _checkpoint(CoOp(backbone=tiny_backbone, classnames=NAMES, n_ctx=2))
    with pytest.raises(CheckpointMismatchError, match=r"do not fit this CoOp: text_prompt\.ctx \(2, \d+\) there, \(4, \d+\) here"):
        CoOp(backbone=tiny_backbone, classnames=NAMES, n_ctx=4).on_load_checkpoint(saved)
    # a checkpoint without its frozen backbone, read with another backbone: both are named
    saved["vlweak_backbone"] = {"model": "vlweak-shapes", "weights": "tag:vlweak-shapes"}
    saved["state_dict"] = {k: v for k, v in saved["state_dict"].items() if not k.startswith("backbone.")}
    saved["state_dict"]["text_prompt.ctx"] = torch.zeros(2, 7)
    with pytest.warns(UserWarning, match="trained with the backbone"):
        with pytest.raises(CheckpointMismatchError, match=r"text_prompt\.ctx \(2, 7\) there.*\(it was trained with the backbone \{'model': 'vlweak-shapes'"):
            CoOp(backbone=OpenCLIPBackbone("vlweak-tiny", pretrained=None), classnames=NAMES, n_ctx=2).on_load_checkpoint(saved)
