"""Bad option values fail when the method is built, naming the option, before any data is read."""

import pytest
import torch

from vlweak.labels import PseudoLabels
from vlweak.methods import CDUL, CHiLS, CoOp, DualCoOp, PromptTuning, ZeroShot, ZLaP
from vlweak.prompts import resolve_templates

NAMES = ["circle", "square", "star"]

CASES = [
    (ZeroShot, {}, {"templates": []}, "template list is empty"),
    (ZeroShot, {}, {"templates": "imagenet81"}, "unknown template set 'imagenet81'"),
    (ZeroShot, {}, {"temperature": -0.01}, "temperature must be > 0"),
    (ZeroShot, {}, {"temperature": 0.0}, "temperature must be > 0"),
    (ZeroShot, {"multilabel": True}, {"threshold": 1.5}, r"threshold must be in \[0.0, 1.0\], got 1.5"),
    (ZLaP, {}, {"templates": []}, "template list is empty"),
    (ZLaP, {}, {"tol": -1.0}, "tol >= 0"),
    (ZLaP, {}, {"threshold": -1.0}, "threshold"),
    (CHiLS, {"hierarchy": {"circle": ["ring"], "square": ["box"], "star": ["asterisk"]}}, {"temperature": 0.0}, "temperature"),
    (CHiLS, {"hierarchy": {"circle": ["ring"], "square": ["box"], "star": ["asterisk"]}}, {"templates": ["{} and {}"]}, "placeholder"),
    (CDUL, {"multilabel": True}, {"threshold": -1.0}, "threshold"),
    (CDUL, {"multilabel": True}, {"temperature": -1.0}, "temperature"),
    (CDUL, {"multilabel": True}, {"snippet_threshold": 5.0}, "snippet_threshold"),
    (CDUL, {"multilabel": True}, {"hidden_dim": 0}, "hidden_dim must be >= 1"),
    (DualCoOp, {"multilabel": True}, {"n_ctx": -1}, "n_ctx must be >= 1, got -1"),
    (DualCoOp, {"multilabel": True}, {"clip": -1.0}, "clip"),
    (DualCoOp, {"multilabel": True}, {"gamma_neg": -1.0}, "gamma_neg"),
    (DualCoOp, {"multilabel": True}, {"apl_neg_proportion": 2.0}, "apl_neg_proportion"),
    (DualCoOp, {"multilabel": True}, {"logit_scale": -1.0}, "logit_scale"),
    (DualCoOp, {"multilabel": True}, {"loss_reduction": "avg"}, "loss_reduction"),
    (DualCoOp, {"multilabel": True}, {"region_cache_gb": -1.0}, "region_cache_gb must be >= 0"),
    (PromptTuning, {}, {"n_ctx": -1}, "n_ctx must be >= 1"),
    (PromptTuning, {}, {"momentum": 2.0}, "momentum"),
    (PromptTuning, {}, {"templates": []}, "template list is empty"),
    (PromptTuning, {}, {"epochs_per_round": 3, "warmup_epochs": 3}, r"warmup_epochs \(3\) must be below epochs_per_round \(3\)"),
    (PromptTuning, {}, {"pseudolabels": "zero-shot"}, "'zero-shot' is neither"),
    (PromptTuning, {}, {"pseudolabels": "missing/zlap.txt"}, "'missing/zlap.txt' is neither"),
    (PromptTuning, {}, {"position": "back"}, "position .* got 'back'"),
    (CoOp, {}, {"epochs": 1}, r"warmup_epochs \(1\) must be below epochs \(1\)"),
    (CoOp, {}, {"epochs": 0}, "epochs must be >= 1, got 0"),
    (CoOp, {}, {"n_ctx": 0}, "n_ctx must be >= 1"),
    (CoOp, {}, {"momentum": -0.5}, "momentum"),
    (CoOp, {}, {"warmup_epochs": -1}, r"warmup_epochs must be >= 0, got -1"),  # CoOp has no k or rounds to name
    (CoOp, {}, {"lr": -1.0}, r"lr must be > 0, got -1.0"),
    (CoOp, {}, {"lr": 0.0}, r"lr must be > 0, got 0.0"),
    (CoOp, {}, {"warmup_lr": -1.0}, r"warmup_lr must be >= 0.0, got -1.0"),
    (PromptTuning, {}, {"weight_decay": -1.0}, r"weight_decay must be >= 0.0"),
    (DualCoOp, {"multilabel": True}, {"lr": -0.1}, r"lr must be > 0"),
    (DualCoOp, {"multilabel": True}, {"loss_weight": -1.0}, r"loss_weight must be > 0"),
    (CDUL, {"multilabel": True}, {"lr": -1.0}, r"lr must be > 0"),
    (CDUL, {"multilabel": True}, {"snippet_batch_size": 0}, r"snippet_batch_size must be >= 1"),
    (ZLaP, {}, {"alpha": 0.0}, r"alpha must be in \(0, 1\)"),
]


@pytest.mark.parametrize("cls,base,bad,match", CASES, ids=[f"{c.__name__}-{next(iter(b))}" for c, _, b, _ in CASES])
def test_bad_option_is_named_at_construction(tiny_backbone, cls, base, bad, match):
    with pytest.raises(ValueError, match=match):
        cls(backbone=tiny_backbone, classnames=NAMES, **base, **bad)


def test_template_with_stray_brace_is_named():
    with pytest.raises(ValueError, match=r"'a \{\}\} photo'"):
        resolve_templates(["a {}} photo"])
    assert resolve_templates(["a {{literal}} {}"]) == ["a {{literal}} {}"]


def test_prompt_tuning_artifact_of_another_vocabulary_fails_at_construction(tiny_backbone, tmp_path):
    path = PseudoLabels.from_scores(torch.rand(4, 2).softmax(1), ["cat", "dog"], [str(i) for i in range(4)]).save(tmp_path / "a.safetensors")
    with pytest.raises(ValueError, match="cat"):
        PromptTuning(backbone=tiny_backbone, classnames=NAMES, pseudolabels=str(path))


def test_pretraining_and_data_options_are_named_at_construction(tmp_path):
    from vlweak.backbones import OpenCLIPBackbone
    from vlweak.data import ShapesWorldDataModule
    from vlweak.methods import CLIPPretrain

    def backbone():
        return OpenCLIPBackbone("vlweak-tiny", pretrained=None, freeze=False)

    with pytest.raises(ValueError, match=r"lr must be > 0, got -1"):
        CLIPPretrain(backbone=backbone(), lr=-1)
    with pytest.raises(ValueError, match=r"export_dtype must be fp32, fp16 or bf16, got 'int8'"):
        CLIPPretrain(backbone=backbone(), export_dtype="int8")
    with pytest.raises(ValueError, match=r"export_path .* is a folder: give the weights file to write"):
        CLIPPretrain(backbone=backbone(), export_path=str(tmp_path))
    with pytest.raises(ValueError, match=r"batch_size must be a positive integer, got 0"):
        ShapesWorldDataModule(batch_size=0)
    with pytest.raises(ValueError, match=r"image_size must be >= 8"):
        ShapesWorldDataModule(image_size=7)
    with pytest.raises(ValueError, match=r"seed must be >= 0"):
        ShapesWorldDataModule(seed=-1)
