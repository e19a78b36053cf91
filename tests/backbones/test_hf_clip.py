"""HFCLIPBackbone against a tiny transformers CLIPModel saved to disk (no hub access)."""

from __future__ import annotations

import json
import shutil
import string
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel, CLIPTokenizer

from vlweak.backbones import CheckpointMismatchError, HFCLIPBackbone, WeightsUnavailableError

CONTEXT = 16
MEAN, STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
TEXTS = ["a photo of the cat", "the dog", "a very long sentence that is cut off by the context length"]


def _tiny_tokenizer(specials_first: bool = False) -> CLIPTokenizer:
    """Byte-level BPE over lowercase letters (word-final variants) plus one merge; no download.
    ``specials_first`` numbers the start- and end-of-text tokens 0 and 1, below the words (and
    adds '.', which would otherwise read as the unknown token, the end-of-text)."""
    specials = ["<|startoftext|>", "<|endoftext|>"]
    vocab: dict[str, int] = {s: i for i, s in enumerate(specials)} if specials_first else {}
    for c in string.ascii_lowercase:
        vocab[c] = len(vocab)
    for c in string.ascii_lowercase:
        vocab[c + "</w>"] = len(vocab)
    vocab["th"] = len(vocab)
    for s in [".</w>"] if specials_first else specials:
        vocab[s] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[("t", "h")])


def _tiny_model(tok: CLIPTokenizer, seed: int = 0) -> CLIPModel:
    text = dict(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=CONTEXT, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    vision = dict(hidden_size=24, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, image_size=32,
                  patch_size=8)
    torch.manual_seed(seed)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).eval()
    with torch.no_grad():  # break the init symmetry of norms so that they matter in the comparison
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model


def _save(directory: Path, model: CLIPModel, tok: CLIPTokenizer) -> Path:
    model.save_pretrained(directory)
    tok.save_pretrained(directory)
    CLIPImageProcessor(size=32, crop_size=32, image_mean=list(MEAN), image_std=list(STD)).save_pretrained(directory)
    return directory


def _features(out) -> torch.Tensor:
    """transformers 5 returns a ModelOutput from get_*_features (projected pooler_output); 4.x a tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> tuple[Path, CLIPModel]:
    tok = _tiny_tokenizer()
    model = _tiny_model(tok)
    return _save(tmp_path_factory.mktemp("hf-clip"), model, tok), model


@pytest.fixture(scope="module")
def backbone(saved) -> HFCLIPBackbone:
    return HFCLIPBackbone(model_id=str(saved[0]))


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def test_properties(backbone, saved):
    model = saved[1]
    sizes = (backbone.image_size, backbone.embed_dim, backbone.visual_width, backbone.context_length)
    assert sizes == (32, 16, 24, CONTEXT)
    assert backbone.image_mean == pytest.approx(MEAN) and backbone.image_std == pytest.approx(STD)
    assert torch.allclose(backbone.logit_scale, model.logit_scale.exp())
    assert not any(p.requires_grad for p in backbone.parameters())
    backbone.train()
    assert not backbone.training
    assert backbone.weights == str(saved[0])


def test_tokenize_pads_truncates_and_keeps_eos(backbone):
    ids = backbone.tokenize(TEXTS)
    tok = backbone._tokenizer
    assert ids.shape == (len(TEXTS), CONTEXT) and ids.dtype == torch.long
    assert (ids[:, 0] == tok.bos_token_id).all()
    assert ids[2, -1] == tok.eos_token_id  # truncated, EOS still last
    assert ids[1, 6] == tok.eos_token_id  # <bos> th e</w> d o g</w> <eos>
    assert (ids[1, 7:] == tok.pad_token_id).all()


def test_encode_text_matches_get_text_features(backbone, saved):
    model = saved[1]
    ids = backbone.tokenize(TEXTS)
    with torch.no_grad():
        ref = F.normalize(_features(model.get_text_features(input_ids=ids)), dim=-1)
    assert torch.allclose(backbone.encode_text(TEXTS), ref, atol=1e-5)
    assert torch.allclose(backbone.encode_text(ids), ref, atol=1e-5)


def test_text_forward_on_embeddings_reproduces_encode_text(backbone):
    ids = backbone.tokenize(TEXTS)
    emb = backbone.token_embedding(ids)
    assert emb.shape == (len(TEXTS), CONTEXT, 32)
    out = backbone.encode_text_embeddings(emb, ids)
    assert out.shape == (len(TEXTS), 16)
    assert torch.allclose(out, backbone.encode_text(ids, normalize=False), atol=1e-5)
    # the causal mask: changing a token after EOS leaves the feature unchanged, before EOS changes it
    g = torch.Generator().manual_seed(3)
    emb2 = emb.clone()
    emb2[1, -1] += torch.randn(32, generator=g)
    assert torch.allclose(backbone.encode_text_embeddings(emb2, ids)[1], out[1], atol=1e-6)
    emb2[1, 1] += torch.randn(32, generator=g)
    assert not torch.allclose(backbone.encode_text_embeddings(emb2, ids)[1], out[1], atol=1e-4)
    with pytest.raises(ValueError, match="agree"):
        backbone.encode_text_embeddings(emb[:, :-1], ids)


def test_learnable_context_gets_gradients(backbone):
    ids = backbone.tokenize(["x x x the cat"])
    ctx = torch.zeros(1, 3, 32, requires_grad=True)
    emb = backbone.token_embedding(ids)
    emb = torch.cat([emb[:, :1], ctx, emb[:, 4:]], dim=1)
    backbone.encode_text_embeddings(emb, ids).sum().backward()
    assert ctx.grad is not None and ctx.grad.abs().sum() > 0


def test_legacy_eos_pooling(saved, tmp_path):
    """Configs with eos_token_id == 2 (pre transformers#24773) pool at the highest id, like the model."""
    directory = shutil.copytree(saved[0], tmp_path / "legacy")
    cfg = json.loads((directory / "config.json").read_text())
    cfg["text_config"]["eos_token_id"] = 2
    (directory / "config.json").write_text(json.dumps(cfg))
    bb = HFCLIPBackbone(model_id=str(directory))
    ref_model = CLIPModel.from_pretrained(directory).eval()
    assert ref_model.text_model.eos_token_id == 2
    ids = bb.tokenize(TEXTS)
    with torch.no_grad():
        ref = F.normalize(_features(ref_model.get_text_features(input_ids=ids)), dim=-1)
    assert torch.allclose(bb.encode_text(ids), ref, atol=1e-5)


def test_encode_image_matches_get_image_features(backbone, saved, images):
    with torch.no_grad():
        ref = F.normalize(_features(saved[1].get_image_features(pixel_values=images)), dim=-1)
    assert torch.allclose(backbone.encode_image(images), ref, atol=1e-5)


def test_dense_features_and_visual_prompts(backbone, saved, images):
    model = saved[1]
    pooled, dense = backbone.encode_image_tokens(images)
    assert pooled.shape == (3, 16) and dense.shape == (3, 16, 16)  # (32 / 8) ** 2 patches
    with torch.no_grad():
        hidden = model.vision_model(pixel_values=images).last_hidden_state
        ref_dense = model.visual_projection(model.vision_model.post_layernorm(hidden[:, 1:]))
    assert torch.allclose(dense, ref_dense, atol=1e-5)
    assert torch.allclose(pooled, backbone.encode_image(images, normalize=False), atol=1e-5)

    g = torch.Generator().manual_seed(2)
    shared = torch.randn(4, 24, generator=g)
    p_pooled, p_dense = backbone.encode_image_tokens(images, prompts=shared)
    assert p_pooled.shape == pooled.shape and p_dense.shape == dense.shape
    assert not torch.allclose(p_pooled, pooled, atol=1e-4)
    with torch.no_grad():  # by hand: the prompts join the sequence before pre_layrnorm
        vm = model.vision_model
        seq = vm.embeddings(images)
        seq = torch.cat([seq[:, :1], shared.expand(3, -1, -1), seq[:, 1:]], 1)
        hidden = vm.encoder(inputs_embeds=vm.pre_layrnorm(seq)).last_hidden_state
        ref_pooled = model.visual_projection(vm.post_layernorm(hidden[:, 0]))
    assert torch.allclose(p_pooled, ref_pooled, atol=1e-5)
    per_image = shared.expand(3, -1, -1).clone()
    b_pooled, b_dense = backbone.encode_image_tokens(images, prompts=per_image)
    assert torch.allclose(b_pooled, p_pooled, atol=1e-5) and torch.allclose(b_dense, p_dense, atol=1e-5)

    n_pooled, n_dense = backbone.dense_features(images)
    assert torch.allclose(n_dense.norm(dim=-1), torch.ones(3, 16), atol=1e-5)
    assert n_pooled.shape == (3, 16)
    with pytest.raises(ValueError, match="visual prompts"):
        backbone.encode_image_tokens(images, prompts=torch.zeros(4, 7))


def test_fingerprint_follows_weights(backbone, saved, tmp_path):
    same = HFCLIPBackbone(model_id=str(saved[0]))
    assert same.fingerprint() == backbone.fingerprint()
    tok = _tiny_tokenizer()
    other = _save(tmp_path / saved[0].name, _tiny_model(tok, seed=1), tok)  # same directory name
    assert HFCLIPBackbone(model_id=str(other)).fingerprint() != backbone.fingerprint()
    assert HFCLIPBackbone(model_id=str(saved[0]), precision="bf16").fingerprint() != backbone.fingerprint()


def test_the_weight_loading_bar_follows_vlweaks_bars(saved, capsys):
    # a batch job's log (enable_progress_bar: false) gets no "Loading weights" bar from transformers either
    from transformers.utils import logging as transformers_logging

    from vlweak.progress import show_progress

    try:
        for shown in (True, False):
            show_progress(shown)
            HFCLIPBackbone(model_id=str(saved[0]))
            assert ("Loading weights" in capsys.readouterr().err) is shown
            assert transformers_logging.is_progress_bar_enabled()  # transformers' own setting, as it was
    finally:
        show_progress(True)


def test_offline_hub_id_says_how_to_use_a_local_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)  # no directory of that name here
    with pytest.raises(WeightsUnavailableError, match=r"model_id: /path/to/dir") as info:
        HFCLIPBackbone(model_id="openai/clip-vit-base-patch32", cache_dir=str(tmp_path / "hub"))
    assert "save_pretrained" in str(info.value)


def test_missing_directory(tmp_path):
    missing = tmp_path / "nowhere" / "clip"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        HFCLIPBackbone(model_id=str(missing))


def test_directory_without_weights_or_tokenizer(saved, tmp_path):
    no_weights = tmp_path / "no-weights"
    no_weights.mkdir()
    shutil.copy(saved[0] / "config.json", no_weights)
    with pytest.raises(FileNotFoundError, match="no weight files"):
        HFCLIPBackbone(model_id=str(no_weights))
    no_tok = tmp_path / "no-tok"
    no_tok.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(saved[0] / name, no_tok)
    with pytest.raises(FileNotFoundError, match="tokenizer"):
        HFCLIPBackbone(model_id=str(no_tok))


def test_weights_that_do_not_fit_the_config(saved, tmp_path):
    directory = shutil.copytree(saved[0], tmp_path / "bad")
    cfg = json.loads((directory / "config.json").read_text())
    cfg["projection_dim"] = 8
    (directory / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError, match="text_projection.weight"):
        HFCLIPBackbone(model_id=str(directory))
    cfg["model_type"] = "siglip"
    (directory / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointMismatchError):
        HFCLIPBackbone(model_id=str(directory))


def test_bf16_autocast_stays_close(backbone, saved, images):
    bf16 = HFCLIPBackbone(model_id=str(saved[0]), precision="bf16")
    text, image = bf16.encode_text(TEXTS), bf16.encode_image(images)
    assert text.dtype == image.dtype == torch.float32
    assert torch.allclose(text, backbone.encode_text(TEXTS), atol=3e-2)
    assert torch.allclose(image, backbone.encode_image(images), atol=3e-2)


def test_image_size_interpolates_the_positions(backbone, saved):
    from vlweak.backbones.open_clip import resize_positions

    big = HFCLIPBackbone(model_id=str(saved[0]), image_size=64)
    assert big.image_size == 64 and big.transform(torch.zeros(3, 10, 10, dtype=torch.uint8)).shape[-1] == 64
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = _features(saved[1].get_image_features(pixel_values=x, interpolate_pos_encoding=True))
    assert torch.allclose(big.encode_image(x), F.normalize(ref, dim=-1), atol=1e-5)
    pooled, dense = big.dense_features(x)
    assert dense.shape == (2, 64, 16) and torch.allclose(pooled, big.encode_image(x), atol=1e-5)
    # the same interpolation as the open_clip backbone's resized checkpoints
    emb = saved[1].vision_model.embeddings
    with torch.no_grad():
        hf = emb.interpolate_pos_encoding(torch.zeros(1, 65, 24), 64, 64)[0]
    assert torch.allclose(hf, resize_positions(emb.position_embedding.weight, 64), atol=1e-5)
    assert big.fingerprint() != backbone.fingerprint()
    assert HFCLIPBackbone(model_id=str(saved[0]), image_size=32).fingerprint() == backbone.fingerprint()
    with pytest.raises(ValueError, match="multiple of .* patch size 8, got 30"):
        HFCLIPBackbone(model_id=str(saved[0]), image_size=30)


def test_prompt_learners_find_the_end_of_text_wherever_the_tokenizer_numbers_it(tmp_path):
    # a tokenizer whose special tokens come first (ids 0 and 1): the end-of-text is not the highest id
    from vlweak.prompts import TextPromptLearner, text_classifier

    tok = _tiny_tokenizer(specials_first=True)
    model = _tiny_model(tok, seed=4)
    backbone = HFCLIPBackbone(model_id=str(_save(tmp_path / "specials-first", model, tok)))
    ids = backbone.tokenize(["a photo of a"])
    assert backbone.eot_positions(ids).item() != int(ids.argmax(-1).item())  # the highest id is a letter
    names = ["cat", "ox"]  # 16 tokens of context: SOS, the 9 of the phrase, the name, ".", EOS
    learner = TextPromptLearner(backbone, names, init="a photo of a")
    assert learner.n_ctx == int((ids[0] > 1).sum())  # every token of the phrase, none of the padding
    torch.testing.assert_close(learner(), text_classifier(backbone, names, "simple"), atol=1e-5, rtol=1e-4)
    front = TextPromptLearner(backbone, names, n_ctx=2, position="front")
    assert front.token_ids.shape == (2, ids.shape[1]) and front().shape == (2, backbone.embed_dim)
