"""CUDA checks: skipped on a machine without a GPU (CI has none), run on one by
``python -m pytest -q tests/gpu`` or ``bash benchmarks/device_check.sh`` (these and the benchmark
table in one go).

They check what only a GPU exercises: the training-free recipes give the CPU's results on the GPU
(fp32 and bf16 autocast), ZLaP's GPU path (blockwise torch kNN, multi-right-hand-side CG on CUDA)
solves the CPU's (faiss) problem, the GPU JPEG decoder feeds the encoder what the PIL pipeline does,
and the training methods reach their CPU tests' targets under bf16 on the GPU.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, requires_shipped

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

SHIPPED = "--model.init_args.backbone.init_args"


def _test_run(recipe: str, out: Path, accelerator: str, *extra: str):
    from vlweak.cli import build_cli

    # a cache of its own: the GPU run encodes on the GPU instead of reading the CPU run's embeddings
    cli = build_cli(["test", "--config", str(REPO / "recipes" / recipe), f"--trainer.accelerator={accelerator}",
                     f"--trainer.logger.init_args.save_dir={out}", "--trainer.enable_progress_bar=false",
                     f"--data.init_args.cache_dir={out / 'cache'}", *extra])
    from vlweak.labels import PseudoLabels

    artifact = PseudoLabels.load(Path(cli.trainer.log_dir) / "pseudolabels-test.safetensors")
    metrics = {k: v for k, v in cli.model.last_metrics.items() if k.endswith(("acc", "top5", "mAP"))}
    return metrics, artifact


@pytest.mark.parametrize("self_search", [True, False])
def test_bf16_screened_knn_on_the_gpu_is_the_exact_search(self_search):
    """bfloat16 candidates on the GPU, re-ranked and verified in fp32: faiss's exact answer."""
    from torch.nn.functional import normalize

    from vlweak.graph import knn

    g = torch.Generator().manual_seed(0)
    centres = normalize(torch.randn(50, 256, generator=g), dim=1)
    x = normalize(centres[torch.randint(50, (20000,), generator=g)] + 0.05 * torch.randn(20000, 256, generator=g), dim=1)
    base = None if self_search else x[:5000]
    ref_s, ref_i = knn(x, base, 10, engine="faiss")
    s, i = knn(x.cuda(), None if base is None else base.cuda(), 10, engine="torch-bf16")
    torch.testing.assert_close(s.cpu(), ref_s, atol=1e-5, rtol=0)
    assert (i.cpu() == ref_i).all(dim=1).float().mean() >= 0.999


def test_faiss_engines_take_gpu_tensors_and_answer_on_the_gpu():
    """faiss-cpu searches a host copy of GPU features (a recipe's engine works on any machine)."""
    from torch.nn.functional import normalize

    from vlweak.graph import knn

    x = normalize(torch.randn(3000, 64, generator=torch.Generator().manual_seed(0)), dim=1)
    ref_s, ref_i = knn(x, None, 10, engine="faiss")
    for engine in ("faiss", "faiss-ivf"):
        s, i = knn(x.cuda(), None, 10, engine=engine)
        assert s.is_cuda and i.is_cuda
        if engine == "faiss":
            assert torch.equal(i.cpu(), ref_i)
            torch.testing.assert_close(s.cpu(), ref_s)


@pytest.mark.parametrize(
    "recipe, extra, agreement, tolerance",
    [
        ("quickstart.yaml", (), 0.995, 0.005),
        ("quickstart.yaml", (f"{SHIPPED}.precision=bf16",), 0.97, 0.02),
        ("chils/shapes_coarse.yaml", (), 0.995, 0.005),
        ("zlap/shapes_shift.yaml", ("--data.init_args.n_train=1000",), 0.99, 0.01),
        ("zlap/shapes_shift.yaml", ("--data.init_args.n_train=1000", "--model.init_args.mode=sparse-inductive"), 0.99, 0.01),
    ],
    ids=["zero-shot", "zero-shot-bf16", "chils", "zlap", "zlap-sparse-inductive"],
)
def test_training_free_recipes_on_the_gpu_give_the_cpu_results(tmp_path, recipe, extra, agreement, tolerance):
    args = ("--data.init_args.n_test=500", *extra)
    cpu_metrics, cpu = _test_run(recipe, tmp_path / "cpu", "cpu", *(a for a in args if "precision" not in a))
    gpu_metrics, gpu = _test_run(recipe, tmp_path / "gpu", "gpu", *args)
    assert cpu.sample_ids == gpu.sample_ids
    same = (cpu.labels == gpu.labels).float().mean().item()
    assert same >= agreement, f"{recipe}: {same:.4f} of the pseudolabels agree"
    assert cpu_metrics and cpu_metrics.keys() == gpu_metrics.keys()
    for k, v in cpu_metrics.items():
        assert abs(gpu_metrics[k] - v) <= tolerance, (k, v, gpu_metrics[k])


def test_cached_embeddings_are_encoded_on_the_gpu(tmp_path, monkeypatch):
    """``embeddings: true``: the data module encodes during setup, before Lightning moves the model,
    so it moves the backbone to the run's device itself."""
    from vlweak.data import cache

    devices = []
    real = cache.encode_images
    monkeypatch.setattr(cache, "encode_images", lambda backbone, *a, **kw: devices.append(backbone.device.type) or real(backbone, *a, **kw))
    args = ("--data.init_args.n_test=200", "--data.init_args.embeddings=true")
    cpu_metrics, cpu = _test_run("quickstart.yaml", tmp_path / "cpu", "cpu", *args)
    gpu_metrics, gpu = _test_run("quickstart.yaml", tmp_path / "gpu", "gpu", *args)
    assert devices == ["cpu", "cuda"]
    assert (cpu.labels == gpu.labels).float().mean() >= 0.995


@pytest.mark.parametrize("mode", ["transductive", "sparse-inductive"])
def test_zlap_solve_on_the_gpu_matches_the_cpu(mode):
    from tests.graph.conftest import clustered
    from vlweak.graph.propagation import ZLaPPropagator

    images, text, _ = clustered(n=6000, d=64, c=20, seed=0)
    queries, _, _ = clustered(n=500, d=64, c=20, seed=1)

    def run(device: str, engine: str) -> torch.Tensor:
        p = ZLaPPropagator(knn_engine=engine).fit(images.to(device), text.to(device))
        out = p.transductive() if mode == "transductive" else p.sparse_inductive(queries.to(device))
        return out.float().cpu()

    cpu, gpu = run("cpu", "faiss"), run("cuda", "auto")
    agree = (cpu.argmax(1) == gpu.argmax(1)).float().mean().item()
    assert agree >= 0.999, agree
    assert (cpu - gpu).abs().max() <= 1e-4 * cpu.abs().max(), (cpu - gpu).abs().max()


@requires_shipped
def test_gpu_jpeg_decoding_gives_the_embeddings_of_the_pil_pipeline(tmp_path, shapes_backbone):
    from tests.data.test_extract import _jpegs
    from vlweak.backbones import OpenCLIPBackbone
    from vlweak.data.datasets import ImageFolderReader
    from vlweak.data.extract import extract_embeddings, load_features

    root = tmp_path / "images" / "scene"
    root.mkdir(parents=True)
    _jpegs(root, [(96 + 8 * (k % 5), 64 + 16 * (k % 3)) for k in range(64)])
    ds = ImageFolderReader.read(tmp_path / "images")
    backbone = OpenCLIPBackbone("vlweak-shapes", pretrained="vlweak-shapes").cuda()

    def embed(gpu_decode: bool) -> torch.Tensor:
        out = tmp_path / f"{gpu_decode}.safetensors"
        extract_embeddings(backbone, ds, backbone.transform, out, batch_size=16, num_workers=2,
                           gpu_decode=gpu_decode, progress=False)
        f = load_features(out)
        return f["features"][f["index"].argsort()]

    cos = (embed(True) * embed(False)).sum(1)
    assert cos.min() >= 0.995, cos.min()


@requires_shipped
def test_dualcoop_trains_under_bf16_on_the_gpu_to_its_cpu_target(tmp_path):
    from tests.methods.test_dualcoop import MARGIN, partial_labels_against_zero_shot
    from vlweak.backbones import OpenCLIPBackbone

    backbone = OpenCLIPBackbone("vlweak-shapes", pretrained="vlweak-shapes", precision="bf16")
    ours, zs = partial_labels_against_zero_shot(backbone, tmp_path, accelerator="gpu")
    # bf16 on the GPU is another draw of the training order, whose spread on CPU reaches the CPU
    # test's margin (+0.005 to +0.074 over five orders): the GPU must still beat zero-shot
    assert ours > zs, f"DualCoOp mAP {ours:.3f} vs zero-shot {zs:.3f} (CPU test's margin {MARGIN})"


@requires_shipped
def test_grip_trains_under_bf16_on_the_gpu_to_its_cpu_target(tmp_path):
    from tests.methods.test_prompt_tuning import grip_against_zero_shot

    grip, zero_shot = grip_against_zero_shot(tmp_path, "vlweak-shapes-noisy", accelerator="gpu", precision="bf16")
    assert grip > zero_shot + 0.05, (grip, zero_shot)


def test_pretraining_in_bf16_mixed_on_the_gpu_lowers_the_loss_and_exports(tmp_path):
    from tests.methods.test_pretrain import short_pretraining

    before, after, export_diff = short_pretraining(tmp_path, accelerator="gpu", precision="bf16-mixed")
    assert after < before - 0.3, (before, after)
    assert export_diff <= 1e-5
