"""Unreadable local checkpoints name the path and the reason, in vlweak's own error types."""

import pytest
import torch
from safetensors.torch import save_file

from vlweak.backbones import CheckpointMismatchError, OpenCLIPBackbone
from vlweak.backbones.open_clip import load_state_dict_file


def _bad(tmp_path):
    good = tmp_path / "good.safetensors"
    save_file({"w": torch.zeros(64, 64)}, str(good))
    data = good.read_bytes()
    files = {
        "zero.safetensors": b"",
        "trunc.safetensors": data[: len(data) // 2],
        "garbage.safetensors": b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":1}",
        "garbage.pt": b"not a pickle at all",
        "empty.pt": b"",
    }
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)
    return files


@pytest.mark.parametrize(
    "name, reason",
    [
        ("zero.safetensors", "empty file"),
        ("trunc.safetensors", "safetensors: .*header"),
        ("garbage.safetensors", "safetensors: .*header"),
        ("garbage.pt", "not a torch checkpoint"),
        ("empty.pt", "empty file"),
    ],
)
def test_corrupt_files(tmp_path, name, reason):
    _bad(tmp_path)
    path = tmp_path / name
    with pytest.raises(CheckpointMismatchError, match=rf"{name} is not a readable checkpoint \({reason}") as info:
        load_state_dict_file(path)
    assert "weights_only set to False" not in str(info.value) and "weights_only` set to `False" not in str(info.value)


def test_torch_load_failures_hide_the_unsafe_retry_advice(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a pickle at all")
    with pytest.raises(CheckpointMismatchError) as info:
        load_state_dict_file(tmp_path / "garbage.pt")
    assert info.value.__cause__ is None and info.value.__suppress_context__
    truncated = tmp_path / "trunc.pt"
    torch.save({"w": torch.zeros(64, 64)}, truncated)
    truncated.write_bytes(truncated.read_bytes()[:200])
    with pytest.raises(CheckpointMismatchError, match=r"trunc.pt is not a readable checkpoint \(truncated or corrupt"):
        load_state_dict_file(truncated)


def test_objects_a_safe_load_refuses_are_named(tmp_path):
    import numpy as np
    path = tmp_path / "np.pt"
    torch.save({"w": np.zeros(2)}, path)
    with pytest.raises(CheckpointMismatchError, match=r"np.pt is not a readable checkpoint \(.*numpy.*safe weights_only") as info:
        load_state_dict_file(path)
    assert "weights_only` set to `False" not in str(info.value)


def test_files_that_hold_no_state_dict(tmp_path):
    torch.save([1, 2, 3], tmp_path / "list.pt")
    with pytest.raises(CheckpointMismatchError, match=r"list.pt is not a readable checkpoint \(it holds a list"):
        load_state_dict_file(tmp_path / "list.pt")
    torch.save({"epoch": 3, "w": torch.zeros(2)}, tmp_path / "mixed.pt")
    with pytest.raises(CheckpointMismatchError, match=r"mixed.pt is not a readable checkpoint \(.*'epoch' \(int\)"):
        load_state_dict_file(tmp_path / "mixed.pt")


def test_directories_are_not_files_and_missing_files_are_not_found(tmp_path):
    for name in ("adir", "adir.safetensors"):
        (tmp_path / name).mkdir()
        with pytest.raises(CheckpointMismatchError, match=rf"{name} is a directory, expected a checkpoint file"):
            load_state_dict_file(tmp_path / name)
    (tmp_path / "adir" / "w.safetensors").write_bytes(b"")
    with pytest.raises(CheckpointMismatchError, match=r"it holds w.safetensors"):
        load_state_dict_file(tmp_path / "adir")
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text("{}")
    with pytest.raises(CheckpointMismatchError, match="HFCLIPBackbone"):
        load_state_dict_file(tmp_path / "hf")
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_state_dict_file(tmp_path / "nowhere.pt")


def test_backbone_reports_the_path(tmp_path, monkeypatch):
    _bad(tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"zero.safetensors is not a readable checkpoint"):
        OpenCLIPBackbone("vlweak-tiny", pretrained=str(tmp_path / "zero.safetensors"))
    # an existing directory given without a separator or suffix is still a path, not a pretrained tag
    (tmp_path / "weights_dir").mkdir()
    monkeypatch.chdir(tmp_path)
    with pytest.raises(CheckpointMismatchError, match=r"(?s)^weights_dir/? is a directory"):
        OpenCLIPBackbone("vlweak-tiny", pretrained="weights_dir")


def test_a_fits_prompt_checkpoint_given_as_weights_says_where_it_goes(tmp_path, tiny_ckpt):
    # a prompt-tuning or DualCoOp last.ckpt names its frozen backbone instead of holding it
    from tests.methods.test_dualcoop import _cli

    fitted = _cli("fit", "shapes_partial.yaml", tmp_path, tiny_ckpt, "--trainer.limit_val_batches=0")
    (ckpt,) = tmp_path.rglob("last.ckpt")
    with pytest.raises(CheckpointMismatchError, match=r"last.ckpt is a checkpoint of a fit's prompts or heads, without backbone "
                                                      r"weights .* give it as --ckpt_path"):
        OpenCLIPBackbone("vlweak-tiny", pretrained=str(ckpt))
    assert fitted.trainer.global_step > 0


def test_a_checkpoint_of_another_prompt_type_is_named_not_a_strict_load_error(tiny_backbone):
    # a visual-prompt fit tested through the textual recipe: the keys differ, not their shapes
    from vlweak.methods import PromptTuning

    names = ["circle", "square", "star"]
    visual = PromptTuning(backbone=tiny_backbone, classnames=names, prompt="visual", n_visual_tokens=2)
    textual = PromptTuning(backbone=tiny_backbone, classnames=names, prompt="textual", n_ctx=2)
    with pytest.raises(CheckpointMismatchError, match=r"not this PromptTuning's \(visual_prompt\.tokens in the checkpoint "
                                                      r"only; text_prompt\.ctx in this model only\).*--config files of its fit"):
        textual.on_load_checkpoint({"state_dict": visual.state_dict()})
