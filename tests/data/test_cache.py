import torch

from vlweak.backbones import OpenCLIPBackbone
from vlweak.data import EmbeddingCache, ShapesWorld, ShapesWorldDataset, image_embeddings


def test_cache_hit_and_invalidation(tmp_path, tiny_backbone, monkeypatch):
    cache = EmbeddingCache(tmp_path)
    ds = ShapesWorldDataset(ShapesWorld(seed=0, image_size=32), "test", 12)
    calls = []
    real = tiny_backbone.encode_image

    def counting(x, normalize=True):
        calls.append(len(x))
        return real(x, normalize)

    monkeypatch.setattr(tiny_backbone, "encode_image", counting)
    first = image_embeddings(tiny_backbone, ds, tiny_backbone.transform, cache, batch_size=5)
    assert sum(calls) == 12 and cache.misses == 1
    second = image_embeddings(tiny_backbone, ds, tiny_backbone.transform, cache, batch_size=5)
    assert sum(calls) == 12 and cache.hits == 1  # nothing re-encoded
    assert torch.equal(first["features"], second["features"])
    # a different dataset (other seed) or other weights is a different key: never stale
    other = ShapesWorldDataset(ShapesWorld(seed=1, image_size=32), "test", 12)
    image_embeddings(tiny_backbone, other, tiny_backbone.transform, cache, batch_size=5)
    assert sum(calls) == 24
    torch.manual_seed(5)
    fresh = OpenCLIPBackbone("vlweak-tiny", pretrained=None)
    path = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file(fresh.model.state_dict(), str(path))
    reloaded = OpenCLIPBackbone("vlweak-tiny", pretrained=str(path))
    assert reloaded.fingerprint() != OpenCLIPBackbone("vlweak-tiny", pretrained=None).fingerprint()
    third = image_embeddings(reloaded, ds, reloaded.transform, cache, batch_size=5)
    assert not torch.allclose(third["features"], first["features"])
    assert len(list((tmp_path / "embeddings").glob("*.safetensors"))) == 3


def test_precision_changes_key(tiny_backbone):
    bf = OpenCLIPBackbone("vlweak-tiny", pretrained=None, precision="bf16")
    assert bf.fingerprint() != OpenCLIPBackbone("vlweak-tiny", pretrained=None).fingerprint()
