import pytest
import torch
import torch.nn.functional as F

from vlweak.prompts import IMAGENET80, TextPromptLearner, resolve_templates, text_classifier


def test_classifier_matches_direct_computation(tiny_backbone):
    names = ["sweet_pepper", "cat"]
    temps = ["a photo of a {}.", "a drawing of a {}.", "{}"]
    w = text_classifier(tiny_backbone, names, temps)
    direct = []
    for n in ["sweet pepper", "cat"]:
        e = torch.stack([F.normalize(tiny_backbone.encode_text([t.format(n)], normalize=False)[0], dim=0) for t in temps])
        direct.append(F.normalize(e.mean(0), dim=0))
    assert torch.allclose(w, torch.stack(direct), atol=1e-5)
    assert torch.allclose(w.norm(dim=1), torch.ones(2))


def test_template_sets_and_errors():
    assert len(IMAGENET80) == 80 and all("{}" in t for t in IMAGENET80)
    assert resolve_templates("simple") == ["a photo of a {}."]
    with pytest.raises(ValueError, match="unknown template set"):
        resolve_templates("fancy")
    with pytest.raises(ValueError, match="placeholder"):
        resolve_templates(["no placeholder here"])


def test_coop_phrase_init_reproduces_zero_shot(tiny_backbone):
    names = ["triangle", "red square"]
    learner = TextPromptLearner(tiny_backbone, names, init="a photo of a")
    assert learner.n_ctx == 4
    assert torch.allclose(learner(), text_classifier(tiny_backbone, names, "simple"), atol=1e-5)
    learner().sum().backward()
    assert learner.ctx.grad is not None and learner.ctx.grad.abs().sum() > 0
    assert all(not p.requires_grad for p in tiny_backbone.parameters())


def test_prompt_that_exactly_fills_the_context_is_accepted(tiny_backbone):
    # tiny context: 16 tokens = SOS + n_ctx + "cat" + "." + EOS fits exactly at n_ctx = 12
    assert tiny_backbone.context_length == 16
    learner = TextPromptLearner(tiny_backbone, ["cat", "dog"], n_ctx=12)
    assert learner.token_ids.shape == (2, 16) and learner().shape[0] == 2
    with pytest.raises(ValueError, match="too long.*'cat'"):
        TextPromptLearner(tiny_backbone, ["cat", "dog"], n_ctx=13)
    with pytest.raises(ValueError, match="too long.*'sweet pepper'") as err:
        TextPromptLearner(tiny_backbone, ["cat", "sweet pepper"], n_ctx=12)
    assert "'cat'" not in str(err.value)
