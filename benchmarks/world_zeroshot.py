"""Zero-shot quality of the shipped vlweak-shapes model on the built-in world's held-out test split.

    python benchmarks/world_zeroshot.py [--n 2000] [--weights vlweak-shapes]

Prints: fine (shape) top-1, coarse top-1 through the coarse names, coarse top-1 through the
sub-class names mapped back, the shifted domain's top-1, multi-label mAP against the
label-frequency baseline, and, per domain, how often an image's 10 nearest images share its shape
(label propagation such as ZLaP can only add to zero-shot where this rate is above zero-shot top-1).
"""

from __future__ import annotations

import argparse

import torch

from vlweak.backbones import OpenCLIPBackbone
from vlweak.data import ShapesWorld, ShapesWorldDataset
from vlweak.data.cache import encode_images
from vlweak.data.datasets import Transformed
from vlweak.data.world import COARSE, PARENT, SHAPES
from vlweak.graph import self_knn
from vlweak.metrics import multilabel_report
from vlweak.prompts import text_classifier


def neighbour_agreement(features: torch.Tensor, labels: torch.Tensor, k: int = 10) -> float:
    """Fraction of each image's ``k`` nearest images (inner product, self excluded) with its label."""
    _, idx = self_knn(features, k)
    return (labels[idx] == labels[:, None]).float().mean().item()


def world_numbers(backbone: OpenCLIPBackbone, n: int = 2000, seed: int = 0) -> dict[str, float]:
    tf = backbone.transform

    def feats(world: ShapesWorld, task: str = "shape"):
        ds = ShapesWorldDataset(world, "test", n, task=task)
        return encode_images(backbone, Transformed(ds, tf), batch_size=250, progress=False)["features"], ds.targets()

    out: dict[str, float] = {}
    f, y = feats(ShapesWorld(seed=seed))
    w_fine = text_classifier(backbone, SHAPES)
    pred_fine = (f @ w_fine.T).argmax(1)
    out["shape top-1"] = (pred_fine == y).float().mean().item()
    coarse_y = torch.tensor([COARSE.index(PARENT[SHAPES[i]]) for i in y])
    out["coarse top-1 (coarse names)"] = ((f @ text_classifier(backbone, COARSE).T).argmax(1) == coarse_y).float().mean().item()
    mapped = torch.tensor([COARSE.index(PARENT[SHAPES[i]]) for i in pred_fine])
    out["coarse top-1 (sub-class names -> parent)"] = (mapped == coarse_y).float().mean().item()
    fs, ys = feats(ShapesWorld(seed=seed, shift=1.0))
    out["shape top-1, shifted domain"] = ((fs @ w_fine.T).argmax(1) == ys).float().mean().item()
    out["10-NN same shape"] = neighbour_agreement(f, y)
    out["10-NN same shape, shifted domain"] = neighbour_agreement(fs, ys)
    fm, tm = feats(ShapesWorld(seed=seed, multilabel=True))
    out["multi-label mAP"] = multilabel_report(fm @ w_fine.T, tm)["mAP"].item()
    ties = torch.rand(tm.shape, generator=torch.Generator().manual_seed(seed))  # seeded: the same row every run
    freq = tm.mean(0, keepdim=True).expand_as(tm) + 1e-6 * ties
    out["multi-label mAP, label-frequency baseline"] = multilabel_report(freq, tm)["mAP"].item()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, default=2000, help="test images per setting")
    p.add_argument("--weights", default="vlweak-shapes", help="pretrained tag or checkpoint file")
    args = p.parse_args()
    numbers = world_numbers(OpenCLIPBackbone("vlweak-shapes", pretrained=args.weights), args.n)
    width = max(map(len, numbers))
    print(f"| {'measure':<{width}} | value |\n|{'-' * (width + 2)}|-------|")
    for k, v in numbers.items():
        print(f"| {k:<{width}} | {v:.3f} |")


if __name__ == "__main__":
    main()
