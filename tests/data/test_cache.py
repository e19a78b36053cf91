import pytest
import torch

from tests.conftest import write_image_folder
from vlweak.backbones import OpenCLIPBackbone
from vlweak.data import (
    EmbeddingCache,
    ImageLoadError,
    ManifestDataModule,
    ShapesWorld,
    ShapesWorldDataset,
    image_embeddings,
)


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


def test_skip_bad_is_part_of_the_key(tmp_path, tiny_backbone, monkeypatch):
    # a run that skipped unreadable images must not serve its entry to one that should fail on them
    root = write_image_folder(tmp_path / "imgs", {"cat": 6, "dog": 6}, size=8)
    for name in ("1.png", "3.png", "5.png"):
        (root / "dog" / name).write_bytes(b"not an image")
    rows = [f"imgs/{c}/{k}.png,{c}" for c in ("cat", "dog") for k in range(6)]
    (tmp_path / "test.csv").write_text("path,label\n" + "\n".join(rows) + "\n")

    def datamodule(skip_bad):
        dm = ManifestDataModule(test=str(tmp_path / "test.csv"), skip_bad=skip_bad, embeddings=True,
                                cache_dir=str(tmp_path / "cache"), transform=tiny_backbone.transform)
        monkeypatch.setattr(dm, "_model_backbone", lambda: tiny_backbone)
        return dm

    lenient = datamodule(True)
    with pytest.warns(UserWarning, match="skipping unreadable image"):
        lenient.setup("test")
    assert len(lenient.datasets["test"]) == 9
    again = datamodule(True)  # served from the cache: no image is read, the skipped ones still said
    with pytest.warns(UserWarning, match="3 of the 12 images of the test split were skipped as unreadable"):
        again.setup("test")
    assert again.cache.hits == 1 and len(again.datasets["test"]) == 9
    strict = datamodule(False)
    with pytest.raises(ImageLoadError, match=r"dog.1\.png"):
        strict.setup("test")
    assert strict.cache.misses == 1 and strict.cache.hits == 0
    # the streaming (sharded) path looks up the same key
    cache = EmbeddingCache(tmp_path / "cache")
    with pytest.raises(ImageLoadError, match=r"dog.1\.png"):
        image_embeddings(tiny_backbone, strict.raw("test"), tiny_backbone.transform, cache, stream=True)


def test_files_swapped_or_replaced_keeping_size_and_time_are_encoded_again(tmp_path, tiny_backbone):
    import os
    import shutil

    from vlweak.data.datasets import ImageFolderReader

    root = write_image_folder(tmp_path / "imgs", {"cat": 2, "dog": 2}, size=8)  # same-size PNGs
    cache = EmbeddingCache(tmp_path / "cache")

    def encoded():
        return image_embeddings(tiny_backbone, ImageFolderReader.read(root), tiny_backbone.transform, cache)["features"]

    before = encoded()
    a, b = root / "cat" / "0.png", root / "dog" / "0.png"
    assert a.stat().st_size == b.stat().st_size
    # two files swapped by renaming (each keeps its own times)
    os.rename(a, tmp_path / "swap.png"); os.rename(b, a); os.rename(tmp_path / "swap.png", b)
    swapped = encoded()
    torch.testing.assert_close(swapped[0], before[2])
    torch.testing.assert_close(swapped[2], before[0])
    # a file rewritten in place with another's bytes and given back its time (cp -p, touch -r)
    st = a.stat()
    shutil.copyfile(root / "cat" / "1.png", a)
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns))
    torch.testing.assert_close(encoded()[0], before[1])
    assert cache.misses == 3
