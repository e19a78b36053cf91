import importlib

import pytest
import torch

from tests.conftest import write_image_folder
from vlweak.data import EmbeddingCache, ShapesWorld, ShapesWorldDataset, image_embeddings
from vlweak.data.cache import encode_images
from vlweak.data.datasets import ImageFolderReader, ImageLoadError, Transformed
from vlweak.data.extract import assemble, extract_embeddings, load_features, split_transform


class Interrupt(RuntimeError):
    pass


def _counting(monkeypatch, backbone, fail_at=None):
    calls = []
    real = backbone.encode_image

    def encode(x, normalize=True):
        if fail_at is not None and len(calls) == fail_at:
            raise Interrupt("interrupted")
        calls.append(len(x))
        return real(x, normalize)

    monkeypatch.setattr(backbone, "encode_image", encode)
    return calls


def test_interrupted_extraction_resumes_at_next_shard(tmp_path, tiny_backbone, monkeypatch):
    ds = ShapesWorldDataset(ShapesWorld(seed=0, image_size=32), "test", 20)
    tf = tiny_backbone.transform
    opts = dict(shard_size=6, batch_size=4, num_workers=0, progress=False)
    # shards of 6 = batches of 4 + 2: the 5th encoder call is the first batch of shard 2
    calls = _counting(monkeypatch, tiny_backbone, fail_at=4)
    with pytest.raises(Interrupt):
        extract_embeddings(tiny_backbone, ds, tf, tmp_path / "a.safetensors", **opts)
    work = tmp_path / "a.safetensors.shards"
    assert sorted(p.name for p in work.glob("shard-*")) == ["shard-000000.safetensors", "shard-000001.safetensors"]
    assert not (tmp_path / "a.safetensors").exists()
    monkeypatch.undo()
    calls = _counting(monkeypatch, tiny_backbone)
    extract_embeddings(tiny_backbone, ds, tf, tmp_path / "a.safetensors", **opts)
    assert sum(calls) == 20 - 12  # shards 0 and 1 were not encoded again
    assert not work.exists()  # the shards are removed once assembled
    resumed = load_features(tmp_path / "a.safetensors")
    extract_embeddings(tiny_backbone, ds, tf, tmp_path / "b.safetensors", **opts)
    whole = load_features(tmp_path / "b.safetensors")
    assert torch.equal(resumed["features"], whole["features"]) and resumed["index"].tolist() == list(range(20))
    # and the same numbers as the in-memory encoder (the transform split in two changes nothing)
    ref = encode_images(tiny_backbone, Transformed(ds, tf), batch_size=4, progress=False)
    assert torch.allclose(whole["features"], ref["features"], atol=1e-6)


def test_changed_shard_plan_starts_over(tmp_path, tiny_backbone, monkeypatch):
    ds = ShapesWorldDataset(ShapesWorld(seed=0, image_size=32), "test", 10)
    calls = _counting(monkeypatch, tiny_backbone, fail_at=1)
    with pytest.raises(Interrupt):
        extract_embeddings(tiny_backbone, ds, tiny_backbone.transform, tmp_path / "x.safetensors",
                           shard_size=4, batch_size=4, num_workers=0, progress=False)
    monkeypatch.undo()
    calls = _counting(monkeypatch, tiny_backbone)
    extract_embeddings(tiny_backbone, ds, tiny_backbone.transform, tmp_path / "x.safetensors",
                       shard_size=5, batch_size=5, num_workers=0, progress=False)
    assert sum(calls) == 10  # a shard of another plan is never reused


def test_image_folder_with_bad_file_and_cache_entry(tmp_path, tiny_backbone):
    root = write_image_folder(tmp_path / "imgs", {"cat": 5, "dog": 4}, size=40)
    (root / "dog" / "9.png").write_bytes(b"not an image")
    ds = ImageFolderReader.read(root, skip_bad=True)
    cache = EmbeddingCache(tmp_path / "cache")
    with pytest.warns(UserWarning, match="9.png"):
        streamed = image_embeddings(tiny_backbone, ds, tiny_backbone.transform, cache, batch_size=3, stream=True)
    assert streamed["index"].tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 8]  # the unreadable 10th is skipped
    assert cache.misses == 1 and cache.path(next(iter(_keys(cache)))).is_file()
    again = image_embeddings(tiny_backbone, ds, tiny_backbone.transform, cache, batch_size=3, stream=True)
    assert cache.hits == 1 and torch.equal(again["features"], streamed["features"])
    with pytest.warns(UserWarning):
        plain = image_embeddings(tiny_backbone, ds, tiny_backbone.transform, None, batch_size=3)
    assert torch.allclose(plain["features"], streamed["features"], atol=1e-6)


def test_a_small_jpeg_set_takes_the_gpu_decoder_where_it_applies(tmp_path, tiny_backbone, monkeypatch):
    """Under the streaming threshold, JPEG files a CUDA backbone can decode go through the extraction
    that decodes them on the GPU (its cache entry names the decoder); elsewhere the in-memory loop."""
    from vlweak.data import extract

    root = write_image_folder(tmp_path / "imgs", {"cat": 3, "dog": 3}, size=40, ext="jpg")
    ds = ImageFolderReader.read(root)
    cache = EmbeddingCache(tmp_path / "cache")
    streamed = []
    real = extract.extract_embeddings
    monkeypatch.setattr(extract, "extract_embeddings", lambda *a, **kw: streamed.append(len(a[1])) or real(*a, **kw))
    plain = image_embeddings(tiny_backbone, ds, tiny_backbone.transform, cache, batch_size=4)
    assert streamed == [] and len(_keys(cache)) == 1  # on CPU: the PIL loop
    monkeypatch.setattr(extract, "use_gpu_decode", lambda *a, **kw: True)  # as on a CUDA backbone
    decoded = image_embeddings(tiny_backbone, ds, tiny_backbone.transform, cache, batch_size=4)
    assert streamed == [6] and len(_keys(cache)) == 2  # its own entry: the decoder is in the key
    assert torch.allclose(decoded["features"], plain["features"], atol=0.01)  # decoders differ slightly
    image_embeddings(tiny_backbone, ds, tiny_backbone.transform, cache, batch_size=4, stream=False)
    assert streamed == [6] and cache.hits == 1  # stream=False: the PIL loop's entry


def test_a_corrupt_jpeg_on_the_gpu_decoding_path_is_skipped_or_named(tmp_path, tiny_backbone, monkeypatch):
    """The decoding path reads bytes only: a file that no decoder reads is named, and with skip_bad
    left out with the PIL path's warning, its neighbours in the batch encoded."""
    from vlweak.data import extract

    monkeypatch.setattr(extract, "use_gpu_decode", lambda *a, **kw: True)  # as on a CUDA backbone
    root = write_image_folder(tmp_path / "imgs", {"cat": 3, "dog": 3}, size=40, ext="jpg")
    (root / "dog" / "1.jpg").write_bytes(b"\xff\xd8 not a jpeg")
    with pytest.raises(ImageLoadError, match="1.jpg"):
        extract_embeddings(tiny_backbone, ImageFolderReader.read(root), tiny_backbone.transform,
                           tmp_path / "a.safetensors", batch_size=4, num_workers=0, progress=False)
    with pytest.warns(UserWarning, match=r"skipping unreadable image .*dog.1\.jpg"):
        extract_embeddings(tiny_backbone, ImageFolderReader.read(root, skip_bad=True), tiny_backbone.transform,
                           tmp_path / "b.safetensors", batch_size=4, num_workers=0, progress=False)
    f = load_features(tmp_path / "b.safetensors")
    assert sorted(f["index"].tolist()) == [0, 1, 2, 3, 5] and f["features"].shape[0] == 5


def test_a_torchcodec_that_cannot_decode_on_the_gpu_leaves_it_to_torchvision(monkeypatch):
    """PyPI's TorchCodec decodes on the CPU only: probed once on a CUDA device, it gives way there
    to torchvision's nvJPEG decoder, and stays the decoder on the CPU."""
    codecs = importlib.import_module("torchcodec.decoders")
    from vlweak.data import extract

    real, probes = codecs.decode_jpeg, []

    def cpu_only(data, mode="RGB", device="cpu"):
        probes.append(str(device))
        if torch.device(device).type == "cuda":
            raise RuntimeError("this build of TorchCodec has no CUDA support")
        return real(data, mode=mode, device=device)

    monkeypatch.setattr(codecs, "decode_jpeg", cpu_only)
    monkeypatch.setattr(extract, "_CODEC_DECODES_ON", {})
    cuda = torch.device("cuda")
    assert extract.jpeg_decoder(cuda)[0] == "torchvision"
    assert extract.jpeg_decoder(cuda)[0] == "torchvision" and probes == ["cuda"]  # probed once
    name, decode = extract.jpeg_decoder(torch.device("cpu"))
    assert name == "torchcodec" and decode(extract._tiny_jpeg(), torch.device("cpu")).shape == (3, 8, 8)
    assert probes == ["cuda", "cpu"]  # the CPU is never probed: that was the decode above


def _keys(cache):
    return [p.stem for p in (cache.root / "embeddings").glob("*.safetensors")]


def test_gpu_decode_required_names_the_reason(tmp_path, tiny_backbone):
    ds = ShapesWorldDataset(ShapesWorld(seed=0, image_size=32), "test", 4)
    with pytest.raises(ValueError, match="not on a CUDA device"):
        extract_embeddings(tiny_backbone, ds, tiny_backbone.transform, tmp_path / "g.safetensors",
                           gpu_decode=True, progress=False)


def test_split_transform_and_assemble(tmp_path):
    from safetensors.torch import load_file, save_file
    from torchvision.transforms import v2

    assert split_transform(v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)])) is None
    shards = []
    for k in range(3):
        p = tmp_path / f"s{k}.safetensors"
        save_file({"features": torch.randn(k + 1, 7), "index": torch.arange(k + 1)}, str(p))
        shards.append(p)
    out = assemble(shards, tmp_path / "all.safetensors", {"note": "x"})
    got = load_file(str(out))
    parts = [load_file(str(p)) for p in shards]
    assert torch.equal(got["features"], torch.cat([p["features"] for p in parts]))
    assert torch.equal(got["index"], torch.cat([p["index"] for p in parts]))


def _jpegs(root, sizes):
    """Shapes-world scenes resized to each ``(width, height)`` and saved as JPEG files."""
    from PIL import Image
    from torchvision.transforms.v2.functional import to_pil_image

    world = ShapesWorld(seed=0, image_size=96)
    ds = ShapesWorldDataset(world, "test", len(sizes))
    paths = []
    for k, (w, h) in enumerate(sizes):
        p = root / f"{k}.jpg"
        image = ds[k]["image"]
        image = image if isinstance(image, Image.Image) else to_pil_image(image)
        image.resize((w, h), Image.BICUBIC).save(p, quality=95)
        paths.append(str(p))
    return paths


def test_the_gpu_decoder_path_reproduces_the_standard_preprocessing(tmp_path, tiny_backbone):
    """The decoder used on CUDA (batched decode, one resize per group of equal-sized images, centre
    crop) run on the CPU device: the same pixels, within JPEG and resampling rounding, as the
    backbones' transform on PIL images, for landscape, portrait, square and smaller-than-crop
    images in one batch."""
    from vlweak.data.datasets import load_image
    from vlweak.data.extract import _gpu_decode, gpu_geometry, read_bytes

    sizes = [(120, 80), (80, 120), (96, 96), (120, 80), (20, 14), (301, 47)]
    paths = _jpegs(tmp_path, sizes)
    prefix, _ = split_transform(tiny_backbone.transform)
    size, crop = gpu_geometry(prefix)
    ours, kept = _gpu_decode([read_bytes(p) for p in paths], paths, size, crop, torch.device("cpu"))
    assert kept == list(range(len(paths)))
    assert ours.shape == (len(paths), 3, crop, crop) and ours.dtype == torch.uint8
    for k, p in enumerate(paths):
        ref = prefix(load_image(p))
        diff = (ours[k].float() - ref.float()).abs()
        assert diff.max() <= 2 and diff.mean() < 0.5, (sizes[k], diff.max().item(), diff.mean().item())
        # a crop one pixel off differs far more on these scenes' sharp edges (measured 3 to 13)
        shifted = (ours[k, :, 1:, :].float() - ref[:, :-1, :].float()).abs().mean()
        assert shifted > 2.0, sizes[k]


def test_torchcodec_and_torchvision_decode_the_same_pixels(tmp_path, monkeypatch):
    """The GPU path decodes with TorchCodec when it imports and falls back to torchvision's
    deprecated decoder otherwise; on the CPU both give the same pixels, batch or single image, and
    the fallback's deprecation warning is not passed on to the user."""
    import sys
    import warnings

    from vlweak.data.extract import jpeg_decoder, read_bytes

    importlib.import_module("torchcodec.decoders")  # a dev dependency: its absence fails, never skips

    data = [read_bytes(p) for p in _jpegs(tmp_path, [(120, 80), (80, 120), (33, 17)])]
    name, codec = jpeg_decoder()
    assert name == "torchcodec"
    monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)  # as if not installed
    name, vision = jpeg_decoder()
    assert name == "torchvision"
    cpu = torch.device("cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        ours = vision(data, cpu)
    for a, b in zip(codec(data, cpu), ours):
        assert a.shape[0] == 3 and torch.equal(a, b)
    assert torch.equal(codec(data[2], cpu), vision(data[2], cpu))


@pytest.mark.parametrize("decoder", ["torchcodec", "torchvision"])
def test_exif_rotated_jpegs_keep_their_stored_pixels_on_the_gpu_path(tmp_path, tiny_backbone, monkeypatch, decoder):
    """A photo with an EXIF orientation tag (a phone's portrait shot) reaches the model as the PIL
    path gives it, pixels as stored (as the reference CLIP pipelines do), whichever JPEG decoder
    the GPU path uses, though TorchCodec by itself would turn it upright."""
    import sys

    import numpy as np
    from PIL import Image

    from vlweak.data.datasets import load_image
    from vlweak.data.extract import _FileBytes, _collate_bytes, _gpu_decode, exif_orientation, gpu_geometry, jpeg_decoder

    if decoder == "torchcodec":
        importlib.import_module("torchcodec.decoders")  # a dev dependency
    else:
        monkeypatch.setitem(sys.modules, "torchcodec.decoders", None)
    assert jpeg_decoder()[0] == decoder
    rng = np.random.default_rng(0)
    paths = []
    for k, orientation in enumerate([6, 1, 3]):
        image = Image.fromarray(np.kron(rng.integers(0, 256, (10, 15, 3)), np.ones((8, 8, 1))).astype(np.uint8))
        exif = image.getexif()
        exif[0x0112] = orientation
        paths.append(str(tmp_path / f"{k}.jpg"))
        image.save(paths[-1], exif=exif, quality=95)
    source = _FileBytes(paths)
    assert [exif_orientation(source[k]["data"]) for k in range(3)] == [6, 1, 3]
    batch = _collate_bytes([source[k] for k in range(3)])
    assert batch["oriented"] == [True, False, True]
    prefix, _ = split_transform(tiny_backbone.transform)
    size, crop = gpu_geometry(prefix)
    for oriented in (batch["oriented"], None):  # told by the loader, or read from the bytes
        ours, _ = _gpu_decode(batch["data"], paths, size, crop, torch.device("cpu"), oriented)
        for k, p in enumerate(paths):
            ref = prefix(load_image(p))
            assert (ours[k].float() - ref.float()).abs().mean() < 0.5, (p, oriented)


def test_on_a_cpu_smaller_sets_stream_in_smaller_shards(tmp_path, tiny_backbone, monkeypatch):
    # an image tower on a CPU encodes tens of images a second: an interrupt must not lose minutes of work
    from vlweak.data import extract

    ds = ShapesWorldDataset(ShapesWorld(seed=3, image_size=32), "test", 12)
    whole = image_embeddings(tiny_backbone, ds, tiny_backbone.transform, EmbeddingCache(tmp_path / "a"), stream=False)
    monkeypatch.setattr(extract, "CPU_STREAM_THRESHOLD", 10)
    monkeypatch.setattr(extract, "CPU_SHARD_SIZE", 4)
    seen = {}
    real = extract.extract_embeddings
    monkeypatch.setattr(extract, "extract_embeddings", lambda *a, **k: seen.update(k) or real(*a, **k))
    calls = _counting(monkeypatch, tiny_backbone, fail_at=2)  # stopped in the second shard
    with pytest.raises(Interrupt):
        image_embeddings(tiny_backbone, ds, tiny_backbone.transform, EmbeddingCache(tmp_path / "b"), batch_size=4)
    assert seen["shard_size"] == 4 and calls == [4, 4]
    monkeypatch.setattr(tiny_backbone, "encode_image", type(tiny_backbone).encode_image.__get__(tiny_backbone))
    calls = _counting(monkeypatch, tiny_backbone)
    streamed = image_embeddings(tiny_backbone, ds, tiny_backbone.transform, EmbeddingCache(tmp_path / "b"), batch_size=4)
    assert calls == [4]  # the two finished shards kept, the last one encoded
    torch.testing.assert_close(streamed["features"], whole["features"])
    assert torch.equal(streamed["index"], whole["index"])
