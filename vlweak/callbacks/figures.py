"""Evaluation figures: per-class accuracy, confusion matrix, reliability diagram, sample images.

:class:`EvaluationFigures` draws them after ``vlweak test`` / ``vlweak predict`` of a single-label
method from the outputs the method keeps (:attr:`vlweak.methods.base.VLMethod.last_outputs`) and
the data module's raw images. They are always saved as PNG files under ``<run dir>/figures/``; when
the trainer has a :class:`~lightning.pytorch.loggers.WandbLogger` they are also logged as
``wandb.Image``, together with the pseudolabel artifact file (a W&B artifact of type
``pseudolabels``) and the resolved configuration of the run. Offline W&B (``WANDB_MODE=offline``)
works the same: everything lands in the offline run folder.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from vlweak.runs import run_folder


# ---------------------------------------------------------------- the numbers behind the pictures
def calibration_bins(scores: Tensor, targets: Tensor, n_bins: int = 15) -> dict[str, Tensor]:
    """Equal-width confidence bins over ``(0, 1]`` of the top-1 predictions.

    Returns per bin: ``count``, ``confidence`` (mean top-1 probability) and ``accuracy`` (NaN for an
    empty bin), plus the bin ``edges``. A confidence ``p`` falls in bin ``b`` when
    ``edges[b] < p <= edges[b + 1]`` (confidence 0 goes to the first bin)."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be positive, got {n_bins}")
    conf, pred = scores.float().max(1)
    correct = (pred == targets).float()
    edges = torch.linspace(0, 1, n_bins + 1)
    b = (torch.bucketize(conf, edges, right=False) - 1).clamp(0, n_bins - 1)
    count = torch.bincount(b, minlength=n_bins).float()
    conf_sum = torch.zeros(n_bins).index_add_(0, b, conf)
    acc_sum = torch.zeros(n_bins).index_add_(0, b, correct)
    safe = count.clamp(min=1)
    empty = count == 0
    return {
        "edges": edges,
        "count": count,
        "confidence": torch.where(empty, torch.nan, conf_sum / safe),
        "accuracy": torch.where(empty, torch.nan, acc_sum / safe),
    }


def expected_calibration_error(scores: Tensor, targets: Tensor, n_bins: int = 15) -> float:
    """ECE (Guo et al. 2017): ``Σ_b (n_b / N) · |acc_b − conf_b|`` over equal-width confidence bins."""
    bins = calibration_bins(scores, targets, n_bins)
    keep = bins["count"] > 0
    gap = (bins["accuracy"][keep] - bins["confidence"][keep]).abs()
    return float((bins["count"][keep] / bins["count"].sum() * gap).sum())


def per_class_accuracy(pred: Tensor, targets: Tensor, n_classes: int) -> Tensor:
    """Accuracy of each class's images (NaN for a class without images)."""
    count = torch.bincount(targets, minlength=n_classes).float()
    hits = torch.bincount(targets[pred == targets], minlength=n_classes).float()
    return torch.where(count > 0, hits / count.clamp(min=1), torch.nan)


def confusion_matrix(pred: Tensor, targets: Tensor, n_classes: int) -> Tensor:
    """``[C, C]`` counts, rows = true class, columns = predicted class."""
    flat = targets * n_classes + pred
    return torch.bincount(flat, minlength=n_classes * n_classes).reshape(n_classes, n_classes)


# ---------------------------------------------------------------- drawing
def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def _short(name: str, n: int = 18) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def draw_per_class_accuracy(acc: Tensor, names: list[str], stage: str, max_classes: int = 50):
    order = list(range(len(names)))
    title = f"{stage}: per-class accuracy (mean {float(acc.nanmean()):.3f})"
    if len(names) > max_classes:  # the hardest and the easiest classes
        ranked = torch.argsort(torch.nan_to_num(acc, nan=-1.0)).tolist()
        half = max_classes // 2
        order = ranked[:half] + ranked[-half:]
        title += f" — {half} lowest and {half} highest of {len(names)}"
    fig = _figure(max(6.0, 0.28 * len(order) + 2), 4.0)
    ax = fig.add_subplot()
    values = torch.nan_to_num(acc[order], nan=0.0).tolist()
    ax.bar(range(len(order)), values, color="tab:blue")
    ax.set_xticks(range(len(order)), [_short(names[i]) for i in order], rotation=90, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(title, fontsize=9)
    return fig


def draw_confusion(cm: Tensor, names: list[str], stage: str):
    c = len(names)
    rows = cm.float() / cm.sum(1, keepdim=True).clamp(min=1)
    side = min(12.0, max(4.5, 0.3 * c + 2))
    fig = _figure(side + 1, side)
    ax = fig.add_subplot()
    im = ax.imshow(rows.numpy(), cmap="Blues", vmin=0, vmax=1, interpolation="nearest")
    if c <= 40:
        ax.set_xticks(range(c), [_short(n, 14) for n in names], rotation=90, fontsize=7)
        ax.set_yticks(range(c), [_short(n, 14) for n in names], fontsize=7)
    if c <= 15:
        for i in range(c):
            for j in range(c):
                if cm[i, j]:
                    ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=6,
                            color="white" if rows[i, j] > 0.5 else "black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{stage}: confusion matrix (rows normalized)", fontsize=9)
    fig.colorbar(im, ax=ax, shrink=0.8)
    return fig


def draw_reliability(bins: dict[str, Tensor], ece: float, stage: str):
    fig = _figure(5.0, 5.0)
    ax = fig.add_subplot()
    edges = bins["edges"]
    width = float(edges[1] - edges[0])
    centers = (edges[:-1] + width / 2).tolist()
    acc = torch.nan_to_num(bins["accuracy"], nan=0.0).tolist()
    conf = torch.nan_to_num(bins["confidence"], nan=0.0).tolist()
    ax.bar(centers, acc, width=width, edgecolor="black", color="tab:blue", label="accuracy")
    ax.bar(centers, [c - a for a, c in zip(acc, conf)], bottom=acc, width=width, color="tab:red", alpha=0.3,
           edgecolor="tab:red", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("confidence (top-1 probability)")
    ax.set_ylabel("accuracy")
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"{stage}: reliability diagram, ECE = {ece:.4f}", fontsize=9)
    return fig


def _as_hwc(image: Any):
    import numpy as np

    if isinstance(image, Tensor):
        x = image.detach().cpu()
        if x.dtype != torch.uint8:
            x = (x.float().clamp(0, 1) * 255).to(torch.uint8)
        return x.permute(1, 2, 0).numpy() if x.ndim == 3 else x.numpy()
    return np.asarray(image.convert("RGB"))


def draw_samples(images: list[Any], pred: list[str], true: list[str | None], stage: str, columns: int = 4):
    n = len(images)
    rows = max(1, math.ceil(n / columns))
    fig = _figure(2.2 * columns, 2.5 * rows)
    for k, (img, p, t) in enumerate(zip(images, pred, true)):
        ax = fig.add_subplot(rows, columns, k + 1)
        ax.imshow(_as_hwc(img))
        ax.set_axis_off()
        if t is None:
            ax.set_title(f"pred: {_short(p)}", fontsize=8)
        else:
            ax.set_title(f"pred: {_short(p)}\ntrue: {_short(t)}", fontsize=8, color="tab:green" if p == t else "tab:red")
    fig.suptitle(f"{stage}: sample predictions", fontsize=9)
    return fig


# ---------------------------------------------------------------- the callback
class EvaluationFigures(L.Callback):
    """Figures of a single-label method's test / predict outputs, as PNG files and in W&B.

    Args:
        stages: the stages to draw after (``test``, ``predict``).
        n_bins: confidence bins of the reliability diagram and its ECE.
        n_samples: images in the sample grid (half mistakes, half correct predictions when there
            are labels).
        max_classes: classes in the per-class bar chart before it shows only the lowest and highest.
        folder: sub-folder of the run directory for the PNG files.
        log_artifact: with a W&B logger, log the pseudolabel artifact file as a W&B artifact.
        log_config: with a W&B logger, add the resolved configuration of the run to its config.
    """

    def __init__(
        self,
        stages: list[str] | None = None,
        n_bins: int = 15,
        n_samples: int = 16,
        max_classes: int = 50,
        folder: str = "figures",
        log_artifact: bool = True,
        log_config: bool = True,
    ) -> None:
        super().__init__()
        self.stages = list(stages) if stages is not None else ["test", "predict"]
        unknown = set(self.stages) - {"test", "predict"}
        if unknown:
            raise ValueError(f"EvaluationFigures stages must be test and/or predict, got {sorted(unknown)}")
        self.n_bins, self.n_samples, self.max_classes = n_bins, n_samples, max_classes
        self.folder = folder
        self.log_artifact, self.log_config = log_artifact, log_config
        #: the PNG files written by the last stage, by figure name
        self.saved: dict[str, Path] = {}
        self.ece: float | None = None

    def on_test_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run(trainer, pl_module, "test")

    def on_predict_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._run(trainer, pl_module, "predict")

    # ------------------------------------------------------------------
    def _run(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage not in self.stages:
            return
        run_dir = run_folder(trainer)  # a collective under DDP: every rank
        if trainer.global_rank != 0:
            return
        out = getattr(pl_module, "last_outputs", None) or {}
        if out.get("stage") != stage or "scores" not in out:
            rank_zero_warn(f"EvaluationFigures: {type(pl_module).__name__} kept no {stage} outputs; no figures")
            return
        if getattr(pl_module, "multilabel", False):
            rank_zero_warn("EvaluationFigures draws single-label figures; skipped for a multi-label method")
            return
        self.saved = self.draw(out, list(pl_module.classnames), stage, run_dir / self.folder, trainer.datamodule)
        wandb_loggers = [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]
        for logger in wandb_loggers:
            self._to_wandb(logger, trainer, pl_module, stage, out)

    def draw(self, out: dict[str, Any], names: list[str], stage: str, folder: Path, datamodule: Any = None) -> dict[str, Path]:
        """Draw and save every figure the outputs allow; returns ``{name: png path}``."""
        folder.mkdir(parents=True, exist_ok=True)
        scores = out["scores"].detach().float().cpu()
        pred = scores.argmax(1)
        target = out.get("target")
        labelled = None
        figs = {}
        if target is not None:
            target = target.detach().cpu().long()
            labelled = target >= 0
        if labelled is not None and labelled.any():
            s, p, t = scores[labelled], pred[labelled], target[labelled]
            c = len(names)
            figs["per_class_accuracy"] = draw_per_class_accuracy(per_class_accuracy(p, t, c), names, stage, self.max_classes)
            figs["confusion_matrix"] = draw_confusion(confusion_matrix(p, t, c), names, stage)
            bins = calibration_bins(s, t, self.n_bins)
            self.ece = expected_calibration_error(s, t, self.n_bins)
            figs["reliability"] = draw_reliability(bins, self.ece, stage)
        samples = self._samples(out, pred, target, names, stage, datamodule)
        if samples is not None:
            figs["samples"] = samples
        saved = {}
        for name, fig in figs.items():
            path = folder / f"{stage}_{name}.png"
            fig.savefig(path)
            saved[name] = path
        return saved

    def _samples(self, out, pred, target, names, stage, datamodule):
        index = out.get("index")
        raw = datamodule.raw(stage) if datamodule is not None and hasattr(datamodule, "raw") else None
        if index is None or raw is None or self.n_samples <= 0:
            return None
        index = index.detach().cpu()
        rows = list(range(len(index)))
        if target is not None:  # half mistakes, half correct predictions, in index order
            wrong = [r for r in rows if target[r] >= 0 and pred[r] != target[r]]
            right = [r for r in rows if target[r] >= 0 and pred[r] == target[r]]
            half = self.n_samples // 2
            pick = wrong[:half] + right[: self.n_samples - min(half, len(wrong))]
            rows = sorted(pick[: self.n_samples]) or rows[: self.n_samples]
        else:
            rows = rows[: self.n_samples]
        images, p_names, t_names = [], [], []
        for r in rows:
            item = raw[int(index[r])]
            if item is None or "image" not in item:
                continue
            images.append(item["image"])
            p_names.append(names[int(pred[r])])
            t = int(target[r]) if target is not None else -1
            t_names.append(names[t] if t >= 0 else None)
        return draw_samples(images, p_names, t_names, stage) if images else None

    # ------------------------------------------------------------------ Weights & Biases
    def _to_wandb(self, logger: Any, trainer: L.Trainer, pl_module: L.LightningModule, stage: str, out: dict) -> None:
        import wandb

        run = logger.experiment
        if self.log_config:
            config = self.resolved_config(trainer)
            if config:
                run.config.update({"resolved_config": config}, allow_val_change=True)
        images = {f"{stage}/figures/{name}": wandb.Image(str(path), caption=name) for name, path in self.saved.items()}
        if self.ece is not None and "target" in out:
            images[f"{stage}/ece"] = self.ece
        if images:
            run.log(images)
        artifact = out.get("artifact")
        if self.log_artifact and artifact is not None and Path(artifact).is_file():
            meta = {"stage": stage, "method": type(pl_module).__name__, "classes": len(pl_module.classnames)}
            meta.update({k: v for k, v in getattr(pl_module, "last_metrics", {}).items()})
            art = wandb.Artifact(f"pseudolabels-{stage}-{run.id}", type="pseudolabels", metadata=meta)
            art.add_file(str(artifact))
            run.log_artifact(art)

    @staticmethod
    def resolved_config(trainer: L.Trainer) -> dict[str, Any] | None:
        """The run's complete configuration as the CLI resolved it (``None`` outside the CLI)."""
        import yaml
        from lightning.pytorch.cli import SaveConfigCallback

        for cb in trainer.callbacks:
            if isinstance(cb, SaveConfigCallback):
                text = cb.parser.dump(cb.config, skip_none=False, skip_check=True)
                return yaml.safe_load(text)
        return None
