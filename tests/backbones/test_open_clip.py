import open_clip
import pytest
import torch
from safetensors.torch import save_file

from vlweak.backbones import (
    CheckpointMismatchError,
    OpenCLIPBackbone,
    UnknownArchitectureError,
    WeightsUnavailableError,
)


def test_unknown_architecture_lists_close_names():
    with pytest.raises(UnknownArchitectureError, match="ViT-B-32"):
        OpenCLIPBackbone("ViT-B-23", pretrained=None)


def test_shipped_tags_load_into_their_architecture_only():
    from safetensors.torch import load_file

    from vlweak.backbones import SHIPPED_WEIGHTS

    # a weights tag given as the architecture: the error says how to write it
    with pytest.raises(UnknownArchitectureError, match="model_name: vlweak-shapes, pretrained: vlweak-shapes-noisy"):
        OpenCLIPBackbone("vlweak-shapes-noisy", pretrained="vlweak-shapes-noisy")
    with pytest.raises(CheckpointMismatchError, match="'vlweak-shapes-noisy' are for the vlweak-shapes architecture, not vlweak-tiny"):
        OpenCLIPBackbone("vlweak-tiny", pretrained="vlweak-shapes-noisy")
    # each tag loads its own file
    noisy = OpenCLIPBackbone("vlweak-shapes", pretrained="vlweak-shapes-noisy").model.state_dict()
    clean = OpenCLIPBackbone("vlweak-shapes", pretrained="vlweak-shapes").model.state_dict()
    stored = load_file(str(SHIPPED_WEIGHTS["vlweak-shapes-noisy"]))
    assert all(torch.equal(noisy[k], stored[k].to(noisy[k].dtype)) for k in stored)
    assert any(not torch.equal(noisy[k], clean[k]) for k in stored)


def test_local_checkpoint_round_trip(tmp_path):
    torch.manual_seed(1)
    src = OpenCLIPBackbone("vlweak-tiny", pretrained=None)
    path = tmp_path / "tiny.safetensors"
    save_file(src.model.state_dict(), str(path))
    loaded = OpenCLIPBackbone("vlweak-tiny", pretrained=str(path))
    for k, v in src.model.state_dict().items():
        assert torch.equal(v, loaded.model.state_dict()[k]), k
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(src.encode_image(x), loaded.encode_image(x))
    # a Lightning checkpoint of a pretraining run loads through the same path
    ckpt = tmp_path / "run.ckpt"
    torch.save({"state_dict": {f"backbone.model.{k}": v for k, v in src.model.state_dict().items()}}, ckpt)
    assert torch.allclose(OpenCLIPBackbone("vlweak-tiny", pretrained=str(ckpt)).encode_image(x), src.encode_image(x))


def test_missing_file_and_mismatched_checkpoint(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.safetensors"):
        OpenCLIPBackbone("vlweak-tiny", pretrained=str(tmp_path / "nowhere.safetensors"))
    rn = OpenCLIPBackbone("vlweak-tiny-rn", pretrained=None)
    path = tmp_path / "rn.safetensors"
    save_file(rn.model.state_dict(), str(path))
    with pytest.raises(CheckpointMismatchError, match=r"(?s)rn.safetensors.*(missing|shape).*visual\."):
        OpenCLIPBackbone("vlweak-tiny", pretrained=str(path))


def test_offline_download_says_how_to_use_a_file(monkeypatch):
    real = open_clip.create_model

    def offline(name, pretrained=None, **kw):
        if pretrained:
            raise OSError("We couldn't connect to the hub")
        return real(name, pretrained=None, **kw)

    monkeypatch.setattr(open_clip, "create_model", offline)
    monkeypatch.setattr(open_clip, "list_pretrained_tags_by_model", lambda name: ["laion_fake"])
    with pytest.raises(WeightsUnavailableError, match=r"pretrained: /path/to/weights.safetensors"):
        OpenCLIPBackbone("vlweak-tiny", pretrained="laion_fake")
    with pytest.raises(WeightsUnavailableError, match="neither a local file nor an open_clip pretrained tag") as info:
        OpenCLIPBackbone("vlweak-tiny", pretrained="no_such_tag")
    assert "did you mean" not in str(info.value)
    with pytest.raises(WeightsUnavailableError, match=r"\(tags: laion_fake\); did you mean 'laion_fake'\?"):
        OpenCLIPBackbone("vlweak-tiny", pretrained="laion-fake")  # a typo gets the near tag


def test_openai_style_tag_builds_quick_gelu(monkeypatch, tmp_path):
    # OpenAI's weights were trained with QuickGELU; open_clip's plain names (ViT-B-32) build GELU
    real = open_clip.create_model
    torch.manual_seed(0)
    source = real("vlweak-tiny", pretrained=None, force_quick_gelu=True)

    def hub(name, pretrained=None, **kw):  # the tag "downloads" the source weights
        model = real(name, pretrained=None, **kw)
        if pretrained:
            model.load_state_dict(source.state_dict())
        return model

    monkeypatch.setattr(open_clip, "create_model", hub)
    monkeypatch.setattr(open_clip, "list_pretrained_tags_by_model", lambda name: ["openai_like", "laion_like"])
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda name, tag: {"quick_gelu": tag == "openai_like"})

    def acts(backbone):
        return {type(m).__name__ for m in backbone.model.modules() if type(m).__name__ in ("GELU", "QuickGELU")}

    tagged = OpenCLIPBackbone("vlweak-tiny", pretrained="openai_like")
    assert acts(tagged) == {"QuickGELU"} and tagged.fingerprint_parts()["activation"] == "quick_gelu"
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(tagged.encode_image(x), torch.nn.functional.normalize(source.encode_image(x), dim=-1), atol=1e-5)
    plain = OpenCLIPBackbone("vlweak-tiny", pretrained="laion_like")
    assert acts(plain) == {"GELU"} and "activation" not in plain.fingerprint_parts()
    assert acts(OpenCLIPBackbone("vlweak-tiny", pretrained=None)) == {"GELU"}


def test_text_from_embeddings_and_dense_features(tiny_backbone):
    ids = tiny_backbone.tokenize(["a photo of a cat.", "a dog"])
    direct = tiny_backbone.encode_text(["a photo of a cat.", "a dog"], normalize=False)
    via = tiny_backbone.encode_text_embeddings(tiny_backbone.token_embedding(ids), ids)
    assert torch.allclose(direct, tiny_backbone.model.encode_text(ids), atol=1e-5)
    assert torch.allclose(via, direct, atol=1e-5)
    x = torch.randn(2, 3, 32, 32)
    pooled, dense = tiny_backbone.dense_features(x)
    assert pooled.shape == (2, 32) and dense.shape == (2, 16, 32)
    assert torch.allclose(pooled, tiny_backbone.encode_image(x), atol=1e-5)
    p, _ = tiny_backbone.encode_image_tokens(x, torch.zeros(3, tiny_backbone.visual_width))
    assert not torch.allclose(p, tiny_backbone.encode_image(x, normalize=False))


def test_visual_prompts_enter_before_the_pre_norm(tiny_backbone):
    # by hand: [class, prompts, patches] + positions (prompts get none), through ln_pre and the tower
    v = tiny_backbone.model.visual
    x = torch.randn(2, 3, 32, 32)
    prompts = torch.randn(3, tiny_backbone.visual_width, generator=torch.Generator().manual_seed(0)) * 0.02
    with torch.no_grad():
        t = v.conv1(x).flatten(2).transpose(1, 2)
        t = torch.cat([v.class_embedding.expand(2, 1, -1), t], 1) + v.positional_embedding
        t = torch.cat([t[:, :1], prompts.expand(2, -1, -1), t[:, 1:]], 1)
        t = v.transformer(v.ln_pre(t))
        want = v.ln_post(t[:, 0]) @ v.proj
        got, _ = tiny_backbone.encode_image_tokens(x, prompts)
        # the pre-norm sets the scale: prompts 50x larger are the same prompts to the tower
        big, _ = tiny_backbone.encode_image_tokens(x, prompts * 50)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(big, got, atol=1e-4, rtol=1e-3)


def test_resnet_dense_features_and_frozen():
    rn = OpenCLIPBackbone("vlweak-tiny-rn", pretrained=None)
    x = torch.randn(2, 3, 64, 64)
    pooled, dense = rn.dense_features(x, normalize=False)
    assert torch.allclose(pooled, rn.model.encode_image(x), atol=1e-5)
    assert dense.shape == (2, 4, 32)
    assert all(not p.requires_grad for p in rn.parameters())
    rn.train()
    assert not rn.training  # a frozen backbone stays in eval mode


def test_bf16_autocast_on_cpu(tiny_backbone):
    bf = OpenCLIPBackbone("vlweak-tiny", pretrained=None, precision="bf16")
    bf.load_state_dict(tiny_backbone.state_dict())
    x = torch.randn(2, 3, 32, 32)
    out = bf.encode_image(x)
    assert out.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(out, tiny_backbone.encode_image(x)).min() > 0.98
    with pytest.raises(ValueError, match="precision"):
        OpenCLIPBackbone("vlweak-tiny", pretrained=None, precision="fp8")


def test_config_overrides_change_the_architecture_and_the_fingerprint(tmp_path):
    torch.manual_seed(0)
    tok = OpenCLIPBackbone("vlweak-tiny", pretrained=None, config_overrides={"vision_cfg": {"pool_type": "tok"}})
    avg = OpenCLIPBackbone("vlweak-tiny", pretrained=None, config_overrides={"vision_cfg": {"pool_type": "avg"}})
    assert (tok.model.visual.pool_type, avg.model.visual.pool_type) == ("tok", "avg")
    # the rest of the nested config is kept: the same parameters load into both poolings
    path = tmp_path / "w.safetensors"
    save_file(tok.model.state_dict(), str(path))
    a = OpenCLIPBackbone("vlweak-tiny", pretrained=str(path), config_overrides={"vision_cfg": {"pool_type": "avg"}})
    t = OpenCLIPBackbone("vlweak-tiny", pretrained=str(path), config_overrides={"vision_cfg": {"pool_type": "tok"}})
    x = torch.randn(2, 3, 32, 32)
    assert not torch.allclose(a.encode_image(x), t.encode_image(x))
    assert a.fingerprint() != t.fingerprint()  # the embedding cache keeps them apart
    # mean-pooled: the global feature is the mean of the projected region features
    pooled, dense = a.dense_features(x, normalize=False)
    assert torch.allclose(pooled, dense.mean(1), atol=1e-5)
    with pytest.raises(ValueError, match="vison_cfg"):
        OpenCLIPBackbone("vlweak-tiny", pretrained=None, config_overrides={"vison_cfg": {"pool_type": "avg"}})


def test_pretrained_null_from_the_command_line_means_random_init():
    # `--...pretrained=null` after a config that set a file reaches the backbone as the string "None"
    for value in ("None", "null", ""):
        assert OpenCLIPBackbone("vlweak-tiny", pretrained=value).weights == "random-init"


@pytest.mark.parametrize("name, native, stride", [("vlweak-tiny", 32, 8), ("vlweak-tiny-rn", 64, 32)])
def test_image_size_runs_pretrained_weights_at_another_resolution(tmp_path, name, native, stride):
    torch.manual_seed(2)
    src = OpenCLIPBackbone(name, pretrained=None)
    path = tmp_path / f"{name}.safetensors"
    save_file(src.model.state_dict(), str(path))
    big = OpenCLIPBackbone(name, pretrained=str(path), image_size=2 * native)
    key = "visual.positional_embedding" if stride != 32 else "visual.attnpool.positional_embedding"
    small_sd, big_sd = src.model.state_dict(), big.model.state_dict()
    for k, v in small_sd.items():  # every other weight loads unchanged
        if k != key:
            assert torch.equal(v, big_sd[k]), k
    g = native // stride
    assert big_sd[key].shape == (1 + (2 * g) ** 2, small_sd[key].shape[1])
    assert torch.equal(big_sd[key][0], small_sd[key][0])  # the class position is kept
    # the model runs at the new size, its preprocessing too, with 4x the regions
    assert big.image_size == 2 * native and big.transform(torch.zeros(3, 10, 10, dtype=torch.uint8)).shape[-1] == 2 * native
    pooled, dense = big.dense_features(torch.randn(2, 3, 2 * native, 2 * native))
    assert pooled.shape == (2, big.embed_dim) and dense.shape == (2, (2 * g) ** 2, big.embed_dim)
    native_fp = OpenCLIPBackbone(name, pretrained=str(path)).fingerprint()
    assert big.fingerprint() != native_fp
    assert OpenCLIPBackbone(name, pretrained=str(path), image_size=native).fingerprint() == native_fp
    # without image_size the resized weights are another architecture's, named as such
    resized = tmp_path / "big.safetensors"
    save_file(big.model.state_dict(), str(resized))
    with pytest.raises(CheckpointMismatchError, match=key.replace(".", r"\.")):
        OpenCLIPBackbone(name, pretrained=str(resized))


def test_resized_positions_interpolate_the_grid():
    from vlweak.backbones.open_clip import resize_positions

    # a ramp along x (same on every row), 4x4 grid plus the class position, resized to 8x8
    ramp = torch.arange(4.0).repeat(4).reshape(16, 1).expand(16, 3)
    pos = torch.cat([torch.full((1, 3), 7.0), ramp])
    out = resize_positions(pos, 64)
    assert out.shape == (65, 3) and torch.equal(out[0], pos[0])
    grid = out[1:, 0].reshape(8, 8)
    assert torch.allclose(grid, grid[:1].expand(8, 8), atol=1e-5)  # rows stay equal
    assert (grid[0, 1:] >= grid[0, :-1] - 1e-6).all() and grid[0, 0] < grid[0, -1]  # still a ramp
    assert torch.allclose(resize_positions(pos, 16), pos)  # the same grid is unchanged
    with pytest.raises(CheckpointMismatchError, match="square"):
        resize_positions(pos, 50)


def test_image_size_must_fit_the_tower():
    with pytest.raises(ValueError, match="multiple of vlweak-tiny's patch size 8, got 36"):
        OpenCLIPBackbone("vlweak-tiny", pretrained=None, image_size=36)
    with pytest.raises(ValueError, match="multiple of vlweak-tiny-rn's ResNet stride 32, got 80"):
        OpenCLIPBackbone("vlweak-tiny-rn", pretrained=None, image_size=80)


def test_image_size_with_a_pretrained_tag(monkeypatch):
    real = open_clip.create_model
    torch.manual_seed(3)
    source = real("vlweak-tiny", pretrained=None)

    def hub(name, pretrained=None, **kw):  # the tag "downloads" the source weights at the native size
        model = real(name, pretrained=None, **kw)
        if pretrained:
            model.load_state_dict(source.state_dict())
        return model

    monkeypatch.setattr(open_clip, "create_model", hub)
    monkeypatch.setattr(open_clip, "list_pretrained_tags_by_model", lambda name: ["laion_like"])
    monkeypatch.setattr(open_clip, "get_pretrained_cfg", lambda name, tag: {})
    big = OpenCLIPBackbone("vlweak-tiny", pretrained="laion_like", image_size=64)
    assert big.model.visual.positional_embedding.shape == (1 + 8 * 8, 32)
    assert torch.equal(big.model.visual.conv1.weight, source.visual.conv1.weight)


def test_visual_prompts_on_a_resnet_tower_are_refused_in_one_line():
    # an input vlweak refuses: the CLI ends the run with its message and exit status 2
    from vlweak.backbones import VisualPromptError
    from vlweak.cli import is_user_error
    from vlweak.methods import PromptTuning

    rn = OpenCLIPBackbone("RN50-quickgelu", pretrained=None)
    with pytest.raises(VisualPromptError, match=r"RN50-quickgelu's tower is a ModifiedResNet: use prompt: textual") as err:
        PromptTuning(backbone=rn, classnames=["cat", "dog"], prompt="visual")
    assert is_user_error(err.value)


def test_cpu_precisions_say_what_runs(tiny_ckpt):
    import warnings

    import vlweak.backbones.base as base

    base._WARNED.clear()
    fp16 = OpenCLIPBackbone("vlweak-tiny", pretrained=tiny_ckpt, precision="fp16")
    assert fp16.effective_precision == "fp32"
    # fp16 runs as fp32 on a CPU, so its embeddings are the fp32 ones, cached under that key
    assert fp16.fingerprint() == OpenCLIPBackbone("vlweak-tiny", pretrained=tiny_ckpt).fingerprint()
    with pytest.warns(UserWarning, match="fp16 runs as fp32 on a CPU"):
        fp16.encode_image(torch.rand(1, 3, 32, 32))
    bf16 = OpenCLIPBackbone("vlweak-tiny", pretrained=None, precision="bf16")
    with pytest.warns(UserWarning, match="bf16 on a CPU: unless the CPU has bf16 matrix units"):
        bf16.encode_image(torch.rand(1, 3, 32, 32))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bf16.encode_image(torch.rand(1, 3, 32, 32))  # once per process


def test_a_file_named_like_openais_weights_under_a_gelu_name_is_warned_of(tmp_path):
    import warnings

    from safetensors.torch import save_file

    path = tmp_path / "RN50-openai.safetensors"
    save_file(OpenCLIPBackbone("RN50-quickgelu", pretrained=None).model.state_dict(), str(path))
    with pytest.warns(UserWarning, match=r"looks like OpenAI's weights.*model_name: RN50-quickgelu"):
        OpenCLIPBackbone("RN50", pretrained=str(path))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        OpenCLIPBackbone("RN50-quickgelu", pretrained=str(path))
