"""Time CHiLS inference against plain zero-shot on the same images (target: at most 1.2x).

Two measurements:

* **end to end** — a batch of preprocessed shapes-world images through the backbone's image tower
  and then either zero-shot's head (``softmax(τ f Wᵀ)`` over the C classes) or CHiLS's head (one
  matmul against the ``[C + S, D]`` class + sub-class classifier, two softmaxes, reweighting, the
  per-class max and every variant's predictions). Text embeddings are built once before timing (as
  both methods do once per run) and their one-time cost is reported separately.
* **head only** — precomputed unit-norm image features (what a data module with
  ``embeddings: true`` serves) with synthetic class/sub-class embeddings at a larger scale
  (``--head-classes``, ``--head-subclasses-per-class``), where the head is all there is.

Examples::

    python benchmarks/chils.py --quick
    python benchmarks/chils.py --model vlweak-shapes --pretrained vlweak-shapes --n 2048 --batch-size 256
    python benchmarks/chils.py --device cuda --model ViT-B-32 --pretrained /models/vit-b-32.bin
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import torch
from torch import Tensor
from torch.nn.functional import normalize

from vlweak.backbones import SHIPPED_WEIGHTS, OpenCLIPBackbone
from vlweak.data.world import COARSE, ShapesWorld
from vlweak.labels import LabelHierarchy
from vlweak.methods.chils import CHiLS, all_predictions, reweight, variant_scores
from vlweak.methods.zeroshot import ZeroShot


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timeit(fn: Callable[[], object], device: str, repeats: int, warmup: int = 1) -> float:
    """Median seconds of ``repeats`` calls after ``warmup`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def chils_head(model: CHiLS, feats: Tensor, all_variants: bool = False) -> Tensor:
    """What CHiLS does per batch: class and sub-class probabilities, reweighting, class scores (and,
    on labelled data, every variant's prediction for the side-by-side accuracies)."""
    p_sub, p_sup = model.probabilities(feats)
    rw = reweight(p_sub, p_sup, model.parent)
    scores, _ = variant_scores(p_sub, p_sup, model.parent, model.variant, rw)
    if all_variants:
        all_predictions(p_sub, p_sup, model.parent, rw)
    return scores


def end_to_end(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    pretrained = args.pretrained
    if pretrained == "vlweak-shapes" and not SHIPPED_WEIGHTS["vlweak-shapes"].is_file():
        print("(shipped vlweak-shapes weights not built; using random init — timings are unaffected)")
        pretrained = None
    backbone = OpenCLIPBackbone(args.model, pretrained=pretrained or None, precision=args.precision).to(args.device)
    world = ShapesWorld(seed=0, image_size=64)
    tf = backbone.transform
    images = torch.stack([tf(torch.from_numpy(world.scene("test", i).image).permute(2, 0, 1)) for i in range(args.batch_size)])
    images = images.to(args.device)

    zs = ZeroShot(backbone=backbone, classnames=COARSE, templates=args.templates).to(args.device)
    ch = CHiLS(backbone=backbone, classnames=COARSE, hierarchy="shapes", templates=args.templates, cache_text=False).to(args.device)
    t_text_zs = timeit(zs.build_classifier, args.device, 1, warmup=0)
    t_text_ch = timeit(ch.build_classifier, args.device, 1, warmup=0)

    with torch.no_grad():
        t_zs = timeit(lambda: zs.scores(zs.logits(backbone.encode_image(images))), args.device, args.repeats)
        t_ch = timeit(lambda: chils_head(ch, backbone.encode_image(images)), args.device, args.repeats)
        t_ch_all = timeit(lambda: chils_head(ch, backbone.encode_image(images), True), args.device, args.repeats)
        feats = backbone.encode_image(images)
        h_zs = timeit(lambda: zs.scores(zs.logits(feats)), args.device, args.repeats * 10)
        h_ch = timeit(lambda: chils_head(ch, feats), args.device, args.repeats * 10)
    s = len(ch.subclassnames)
    return [
        (f"text embeddings, once ({len(COARSE)} vs {len(COARSE)}+{s} names)", t_text_zs, t_text_ch),
        (f"end to end, batch {args.batch_size} ({args.model})", t_zs, t_ch),
        ("  ... + all variants' predictions (test)", t_zs, t_ch_all),
        (f"head only, batch {args.batch_size}, C={len(COARSE)}, S={s}", h_zs, h_ch),
    ]


def head_at_scale(args: argparse.Namespace) -> list[tuple[str, float, float]]:
    c, k, d, n = args.head_classes, args.head_subclasses_per_class, args.head_dim, args.head_batch
    g = torch.Generator().manual_seed(0)
    tree = {f"class {i}": [f"sub {i}.{j}" for j in range(k)] for i in range(c)}
    names = list(tree)
    ch = CHiLS(backbone=OpenCLIPBackbone("vlweak-tiny", pretrained=None), classnames=names, hierarchy=tree, cache_text=False)
    ch.classifier = normalize(torch.randn(c + c * k, d, generator=g), dim=1).to(args.device)
    ch.parent = LabelHierarchy(tree).subclass_to_parent(names).to(args.device)
    ch.temperature = 0.01
    ch._built_for = ch._classifier_inputs()  # the classifier set above is the one to use, not rebuilt from the text
    zs_w = ch.classifier[:c]
    feats = normalize(torch.randn(n, d, generator=g), dim=1).to(args.device)
    with torch.no_grad():
        t_zs = timeit(lambda: (100.0 * feats @ zs_w.T).softmax(-1), args.device, args.repeats * 10)
        t_ch = timeit(lambda: chils_head(ch, feats), args.device, args.repeats * 10)
    return [(f"head only, batch {n}, C={c}, S={c * k}, D={d}", t_zs, t_ch)]  # matmul alone: (C+S)/C


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="vlweak-shapes")
    p.add_argument("--pretrained", default="vlweak-shapes", help="tag or file; empty for random init")
    p.add_argument("--precision", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--templates", default="simple")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--head-classes", type=int, default=1000)
    p.add_argument("--head-subclasses-per-class", type=int, default=10)
    p.add_argument("--head-dim", type=int, default=512)
    p.add_argument("--head-batch", type=int, default=256)
    p.add_argument("--quick", action="store_true", help="small sizes for a smoke run")
    args = p.parse_args()
    if args.quick:
        args.batch_size, args.repeats, args.head_classes, args.head_batch = 64, 3, 100, 64
    if args.threads:
        torch.set_num_threads(args.threads)

    rows = end_to_end(args) + head_at_scale(args)
    print(f"\nCHiLS vs zero-shot inference on {args.device} ({torch.get_num_threads()} CPU threads)")
    print(f"{'measurement':<58} {'zero-shot ms':>13} {'CHiLS ms':>10} {'ratio':>7}")
    for name, a, b in rows:
        print(f"{name:<58} {a * 1e3:>13.2f} {b * 1e3:>10.2f} {b / a:>6.2f}x")
    e2e = rows[1]
    verdict = "meets" if e2e[2] / e2e[1] <= 1.2 else "MISSES"
    print(f"\nend-to-end ratio {e2e[2] / e2e[1]:.2f}x {verdict} the 1.2x target")


if __name__ == "__main__":
    main()
