"""Hub-tagged weights on a machine without network: read from the hub's cache at once, or a clear error.

Without the resolver check each hub request retried with back-off for about a minute first.
"""

from __future__ import annotations

import shutil
import socket
from pathlib import Path

import open_clip
import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import save_file

from vlweak.backbones import HFCLIPBackbone, OpenCLIPBackbone, WeightsUnavailableError
from vlweak.backbones.base import hub_unreachable

from test_hf_clip import _save, _tiny_model, _tiny_tokenizer

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _hub_cache(root: Path, repo_id: str) -> Path:
    """The hub cache's layout for one repository: its snapshot folder (files go there) and refs/main."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    return snapshot


@pytest.fixture
def no_network(monkeypatch):
    host = constants.ENDPOINT.split("://")[-1].split("/")[0]
    real = socket.getaddrinfo
    asked: list[str] = []

    def resolve(name, *args, **kwargs):
        asked.append(name)
        if name == host:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return real(name, *args, **kwargs)

    monkeypatch.setattr(socket, "getaddrinfo", resolve)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    return asked


def test_unresolvable_hub_is_detected(no_network):
    assert hub_unreachable() and no_network


@pytest.fixture
def hub_tag(monkeypatch):
    """An open_clip tag of vlweak-tiny published on the hub (as open_clip lists its real tags)."""
    tags = dict(open_clip.pretrained._PRETRAINED.get("vlweak-tiny", {}))
    tags["hubtag"] = open_clip.pretrained._pcfg(hf_hub="vlweak/tiny-clip/")
    monkeypatch.setitem(open_clip.pretrained._PRETRAINED, "vlweak-tiny", tags)
    return "vlweak/tiny-clip"


def test_open_clip_tag_reads_the_hub_cache_without_network(no_network, hub_tag, tmp_path):
    torch.manual_seed(3)
    source = open_clip.create_model("vlweak-tiny", pretrained=None)
    snapshot = _hub_cache(tmp_path, hub_tag)
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(snapshot / "open_clip_model.safetensors"))

    loaded = OpenCLIPBackbone("vlweak-tiny", pretrained="hubtag", cache_dir=str(tmp_path))
    got = loaded.model.state_dict()
    assert all(torch.equal(got[k], v) for k, v in source.state_dict().items())
    assert constants.HF_HUB_OFFLINE is False  # offline mode lasted the load only

    with pytest.raises(WeightsUnavailableError, match=r"vlweak-tiny/hubtag \(no network: the Hugging Face hub's host does not resolve"):
        OpenCLIPBackbone("vlweak-tiny", pretrained="hubtag", cache_dir=str(tmp_path / "empty"))
    assert constants.HF_HUB_OFFLINE is False


def test_hf_hub_id_reads_the_hub_cache_without_network(no_network, tmp_path):
    tok = _tiny_tokenizer()
    model = _tiny_model(tok, seed=2)
    saved = _save(tmp_path / "saved", model, tok)
    snapshot = _hub_cache(tmp_path / "cache", "vlweak/tiny-hf-clip")
    for f in saved.iterdir():
        shutil.copy(f, snapshot)

    backbone = HFCLIPBackbone(model_id="vlweak/tiny-hf-clip", cache_dir=str(tmp_path / "cache"))
    assert backbone.local_files_only
    assert all(torch.equal(backbone.model.state_dict()[k], v) for k, v in model.state_dict().items())

    with pytest.raises(WeightsUnavailableError, match=r"no network: the Hugging Face hub's host does not resolve, so only its cache was read"):
        HFCLIPBackbone(model_id="vlweak/other-clip", cache_dir=str(tmp_path / "cache"))
