"""How much room a model's frozen features leave above zero-shot on the built-in world.

    python benchmarks/world_headroom.py [--shift 1.0] [--pool 2000 5000 20000] [--model vlweak-shapes] [--weights vlweak-shapes]
    python benchmarks/world_headroom.py --multilabel [--image-size 64 128]

Label propagation (ZLaP) and textual prompt tuning (CoOp, GRIP) both work on frozen image
features, so both are bounded by what those features carry:

* **linear-probe ceiling**: a linear classifier trained on *true* labels of the pool (n = 1,000 /
  5,000 / all), started from the zero-shot classifier, scored on held-out images. A textual prompt
  is a linear classifier on the same features, so no pseudolabel strategy can beat this row; if it
  sits at zero-shot, textual prompt tuning has nothing to gain.
* **what neighbours share**: how often an image's 10 nearest images (inner product) share its
  shape, colour, background and outline style. Propagation moves labels along these edges; it can
  only add to zero-shot where neighbours agree on the class more often than zero-shot is right.
* **ZLaP against the pool size**: transductive ZLaP (paper defaults) on pools of growing size.
* **where zero-shot errs**: top-1 on filled against outline-only drawings.

With ``--multilabel`` the same question for DualCoOp on the multi-object scenes: DualCoOp tunes
a positive and a negative text feature per class over frozen region features, so its ceiling is
the mAP of *free* positive and negative vectors, trained on every true label of the pool with
DualCoOp's region aggregation; beside it, zero-shot mAP (global feature, and region features
pooled as DualCoOp pools them) and a linear probe on the global feature, at each ``--image-size``
(the scenes upsampled, the positional embeddings resized).

The tables are measured for one domain of the world (``--shift``) with the shipped model or any
checkpoint (``--weights``), so a new world variant or model can be checked for headroom before
running the methods.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import Tensor
from torchmetrics.functional.classification import multilabel_average_precision

from vlweak.backbones import OpenCLIPBackbone
from vlweak.data import ShapesWorld, ShapesWorldDataset
from vlweak.data.cache import encode_images
from vlweak.data.datasets import Transformed
from vlweak.data.world import COLOUR_NAMES, SHAPES
from vlweak.graph import self_knn
from vlweak.graph.propagation import ZLaPPropagator
from vlweak.methods.dualcoop import region_aggregate
from vlweak.prompts import text_classifier


def linear_probe(
    train: Tensor, labels: Tensor, init: Tensor, steps: int = 1000, scale: float = 30.0, loss=F.cross_entropy
) -> Tensor:
    """Weights ``[C, D]`` and bias of a linear classifier fit by full-batch Adam from ``init``
    (``loss``: cross-entropy on class indices, or ``binary_cross_entropy_with_logits`` on multi-hot
    targets)."""
    weight = torch.nn.Parameter(init.clone())
    bias = torch.nn.Parameter(torch.zeros(len(init)))
    opt = torch.optim.Adam([weight, bias], lr=1e-2)
    for _ in range(steps):
        opt.zero_grad()
        loss(scale * train @ weight.T + bias, labels).backward()
        opt.step()
    return torch.cat([scale * weight.detach(), bias.detach()[:, None]], 1)


def headroom(backbone: OpenCLIPBackbone, shift: float, pools: list[int], n_test: int, seed: int = 0) -> dict:
    world = ShapesWorld(seed=seed, shift=shift)
    n_pool = max(pools)
    pool = ShapesWorldDataset(world, "train", n_pool)
    test = ShapesWorldDataset(world, "test", n_test)

    def encode(ds):
        return encode_images(backbone, Transformed(ds, backbone.transform), batch_size=500, progress=False)["features"]

    fp, yp = encode(pool), pool.targets()
    ft, yt = encode(test), test.targets()
    text = text_classifier(backbone, SHAPES)
    out: dict = {"zero-shot top-1 (test)": ((ft @ text.T).argmax(1) == yt).float().mean().item()}
    for n in sorted({min(1000, n_pool), min(5000, n_pool), n_pool}):
        w = linear_probe(fp[:n], yp[:n], text)
        out[f"linear probe on {n} true labels (test)"] = ((ft @ w[:, :-1].T + w[:, -1]).argmax(1) == yt).float().mean().item()

    scenes = [world.scene("test", i) for i in range(n_test)]
    backgrounds = sorted({s.background for s in scenes})
    factors = {
        "shape": yt,
        "colour": torch.tensor([COLOUR_NAMES.index(s.objects[0].colour) for s in scenes]),
        "background": torch.tensor([backgrounds.index(s.background) for s in scenes]),
        "outline": torch.tensor([int(s.objects[0].outline) for s in scenes]),
    }
    _, idx = self_knn(ft, 10)
    for name, v in factors.items():
        out[f"10 nearest test images share the {name}"] = (v[idx] == v[:, None]).float().mean().item()
    outline = factors["outline"].bool()
    correct = (ft @ text.T).argmax(1) == yt
    out["zero-shot top-1, filled shapes"] = correct[~outline].float().mean().item()
    if outline.any():
        out["zero-shot top-1, outline-only shapes"] = correct[outline].float().mean().item()

    for n in pools:
        feats, labels = torch.cat([fp[:n], ft]), torch.cat([yp[:n], yt])
        zs = ((feats @ text.T).argmax(1) == labels).float().mean().item()
        zl = (ZLaPPropagator().fit(feats, text).transductive().argmax(1) == labels).float().mean().item()
        out[f"ZLaP / zero-shot, graph of {n} pool + {n_test} test images"] = (zl, zs)
    return out


def free_region_classifier(dense: Tensor, targets: Tensor, init: Tensor, tau: float, scale: float, steps: int = 600) -> tuple[Tensor, Tensor]:
    """Unit-norm positive and negative vectors ``[C, D]`` fit by Adam (batches of 64) on every label
    of ``targets`` through DualCoOp's region aggregation."""
    pos = torch.nn.Parameter(init.clone())
    neg = torch.nn.Parameter(init.mean(0, keepdim=True).expand_as(init).clone())
    opt = torch.optim.Adam([pos, neg], lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(dense), (64,), generator=g)
        z = scale * region_aggregate(dense[idx], F.normalize(pos, dim=-1), F.normalize(neg, dim=-1), tau)
        opt.zero_grad()
        F.binary_cross_entropy_with_logits(z[..., 0] - z[..., 1], targets[idx]).backward()
        opt.step()
    return F.normalize(pos.detach(), dim=-1), F.normalize(neg.detach(), dim=-1)


def multilabel_headroom(backbone: OpenCLIPBackbone, shift: float, n_pool: int, n_test: int, seed: int = 0) -> dict:
    world = ShapesWorld(seed=seed, shift=shift, multilabel=True)
    pool = ShapesWorldDataset(world, "train", n_pool)
    test = ShapesWorldDataset(world, "test", n_test)

    def encode(ds) -> tuple[Tensor, Tensor]:
        loader = torch.utils.data.DataLoader(Transformed(ds, backbone.transform), batch_size=100)
        parts = [backbone.dense_features(b["image"]) for b in loader]
        return torch.cat([g for g, _ in parts]), torch.cat([d for _, d in parts])

    with torch.no_grad():
        (gp, dp), (gt, dt) = encode(pool), encode(test)
    yp, yt = pool.targets().float(), test.targets().long()
    text = text_classifier(backbone, SHAPES)
    tau, scale = 0.05, float(backbone.logit_scale)  # DualCoOp's defaults

    def ap(scores: Tensor) -> float:
        return multilabel_average_precision(scores, yt, num_labels=len(SHAPES)).item()

    sims = dt @ text.T
    out = {
        "zero-shot mAP, global feature": ap(gt @ text.T),
        "zero-shot mAP, region features (DualCoOp's pooling)": ap((torch.softmax(sims / tau, 1) * sims).sum(1)),
    }
    pos, neg = free_region_classifier(dp, yp, text, tau, scale)
    z = region_aggregate(dt, pos, neg, tau)
    out[f"free positive/negative vectors on all labels of {n_pool} scenes (DualCoOp's ceiling)"] = ap(z[..., 0] - z[..., 1])
    w = linear_probe(gp, yp, text, loss=F.binary_cross_entropy_with_logits)
    out[f"linear probe on the global feature, all labels of {n_pool} scenes"] = ap(gt @ w[:, :-1].T + w[:, -1])
    return out


def print_table(title: str, numbers: dict) -> None:
    width = max(map(len, numbers))
    print(f"{title}\n")
    print(f"| {'measure':<{width}} | value |\n|{'-' * (width + 2)}|-------|")
    for k, v in numbers.items():
        value = f"{v[0]:.3f} / {v[1]:.3f}" if isinstance(v, tuple) else f"{v:.3f}"
        print(f"| {k:<{width}} | {value} |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shift", type=float, default=1.0, help="domain of the world (0 source .. 1 shifted)")
    p.add_argument("--pool", type=int, nargs="+", default=[2000, 5000, 20000], help="pool sizes for ZLaP (--multilabel: the smallest is the training pool)")
    p.add_argument("--n-test", type=int, default=3000, help="held-out test images")
    p.add_argument("--model", default="vlweak-shapes", help="open_clip architecture of the weights")
    p.add_argument("--weights", default="vlweak-shapes", help="pretrained tag or checkpoint file")
    p.add_argument("--multilabel", action="store_true", help="DualCoOp's headroom on the multi-object scenes")
    p.add_argument("--image-size", type=int, nargs="+", default=[None], help="image tower resolutions (--multilabel)")
    args = p.parse_args()
    if not args.multilabel:
        backbone = OpenCLIPBackbone(args.model, pretrained=args.weights)
        numbers = headroom(backbone, args.shift, sorted(args.pool), args.n_test)
        print_table(f"shift {args.shift}, model {args.model}, weights {args.weights}", numbers)
        return
    for size in args.image_size:
        backbone = OpenCLIPBackbone(args.model, pretrained=args.weights, image_size=size)
        numbers = multilabel_headroom(backbone, args.shift, min(args.pool), args.n_test)
        print_table(f"multi-label scenes, shift {args.shift}, weights {args.weights}, image size {backbone.image_size}", numbers)
        print()


if __name__ == "__main__":
    main()
