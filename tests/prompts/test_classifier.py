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


def test_many_prompts_show_a_progress_bar(tiny_backbone, monkeypatch, capsys):
    from vlweak.prompts import classifier

    monkeypatch.setattr(classifier, "PROGRESS_MIN_PROMPTS", 40)
    few = text_classifier(tiny_backbone, ["cat", "dog"], ["a {}.", "the {}."], batch_size=4)
    assert "prompts" not in capsys.readouterr().err
    names = [f"class {k}" for k in range(20)]
    many = text_classifier(tiny_backbone, names, ["a {}.", "the {}."], batch_size=4)
    assert "encoding 40 prompts" in capsys.readouterr().err
    torch.testing.assert_close(many[:2], text_classifier(tiny_backbone, names[:2], ["a {}.", "the {}."]))
    assert few.shape == (2, many.shape[1])


def test_template_sets_and_errors():
    assert len(IMAGENET80) == 80 and all("{}" in t for t in IMAGENET80)
    assert resolve_templates("simple") == ["a photo of a {}."]
    with pytest.raises(ValueError, match="unknown template set"):
        resolve_templates("fancy")
    with pytest.raises(ValueError, match="placeholder"):
        resolve_templates(["no placeholder here"])
    # one string is one template, checked as a list's are (two placeholders failed at formatting)
    assert resolve_templates("a blurry photo of a {}.") == ["a blurry photo of a {}."]
    with pytest.raises(ValueError, match=r"exactly one '\{\}' placeholder .*'a \{\} next to a \{\}'"):
        resolve_templates("a {} next to a {}")
    # an unquoted list on the command line arrives as one string: said how to quote it
    with pytest.raises(ValueError, match=r"reads as one string, not a list: quote each template"):
        resolve_templates("[a photo of a {}., a drawing of a {}.]")


def test_template_files(tmp_path):
    txt = tmp_path / "mine.txt"
    txt.write_text("# my templates\na photo of a {}.\n\na sketch of a {}.\n")
    assert resolve_templates(str(txt)) == ["a photo of a {}.", "a sketch of a {}."]
    yml = tmp_path / "mine.yaml"
    yml.write_text('- "a photo of a {}."\n- "itap of a {}."\n')
    assert resolve_templates(str(yml)) == ["a photo of a {}.", "itap of a {}."]
    with pytest.raises(FileNotFoundError, match="template file not found: .*gone.txt"):
        resolve_templates(str(tmp_path / "gone.txt"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("photo: a photo of a {}.\n")
    with pytest.raises(ValueError, match=r"bad.yaml holds a dict: expected a list of templates"):
        resolve_templates(str(bad))
    broken = tmp_path / "broken.txt"
    broken.write_text("a photo of a thing\n")
    with pytest.raises(ValueError, match="placeholder.*'a photo of a thing'"):
        resolve_templates(str(broken))


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
    with pytest.raises(ValueError, match="context of 16 tokens with 13 learned context tokens .*'cat'.*smaller n_ctx"):
        TextPromptLearner(tiny_backbone, ["cat", "dog"], n_ctx=13)
    with pytest.raises(ValueError, match="too long.*'sweet pepper'") as err:
        TextPromptLearner(tiny_backbone, ["cat", "sweet pepper"], n_ctx=12)
    assert "'cat'" not in str(err.value)


@pytest.mark.parametrize("position,template", [
    ("end", "X X X X {}."), ("middle", "X X {} X X."), ("front", "{} X X X X."),
])
def test_class_name_position_places_the_name_among_the_context(tiny_backbone, position, template):
    # CoOp's class token position: the prompt's tokens are those of the same text with the context
    # as placeholders, the context vectors sit where the placeholders are, the rest is the text's
    names = ["cat", "sweet pepper", "dog"]
    learner = TextPromptLearner(tiny_backbone, names, n_ctx=4, position=position)
    with torch.no_grad():
        learner.ctx.copy_(torch.arange(4)[:, None].float().expand_as(learner.ctx) + 100)
    want = tiny_backbone.tokenize([template.format(n) for n in names])
    assert torch.equal(learner.token_ids, want)
    emb, words = learner.embeddings(), tiny_backbone.token_embedding(want).float()
    ctx_at = want == tiny_backbone.tokenize(["X"])[0, 1]
    assert torch.equal(emb[ctx_at], learner.ctx.detach().repeat(len(names), 1))  # in order, each row
    assert torch.allclose(emb[~ctx_at], words[~ctx_at])
    learner().sum().backward()  # the context still learns through the reordering
    assert learner.ctx.grad.abs().sum() > 0


def test_class_name_position_is_checked(tiny_backbone):
    with pytest.raises(ValueError, match="position .*'back'"):
        TextPromptLearner(tiny_backbone, ["cat"], position="back")


def test_class_names_cut_by_the_text_encoders_context_are_warned_of(tiny_backbone):
    # the tiny model's context is 16 tokens: two long names sharing a beginning would score alike
    long_names = ["very " * 12 + "red circle", "very " * 12 + "blue triangle"]
    with pytest.warns(UserWarning, match=r"the prompts of 2 class\(es\) are longer than the text encoder's context"):
        w = text_classifier(tiny_backbone, [*long_names, "dog"])
    assert torch.allclose(w[0], w[1])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        text_classifier(tiny_backbone, ["cat", "dog"])  # "a photo of a cat." fits: no warning
