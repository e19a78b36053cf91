"""Evaluation figures: per-class accuracy, confusion matrix, reliability diagram, sample images.

:class:`EvaluationFigures` draws them after ``vlweak test`` / ``vlweak predict`` from the outputs the
method keeps (:attr:`vlweak.methods.base.VLMethod.last_outputs`) and the data module's raw images.
For a multi-label method: per-class AP, a reliability diagram over every known (image, class) entry
(is a class present as often as its score says?) and sample images with their predicted and true
label sets. The ``vlweak`` CLI adds the callback to every ``test`` / ``predict`` run (``--figures
false`` leaves it out). They are always saved as PNG files under ``<run dir>/figures/``; when
the trainer has a :class:`~lightning.pytorch.loggers.WandbLogger` they are also logged as
``wandb.Image`` (the method itself logs its pseudolabel artifact as a W&B artifact of type
``pseudolabels``, figures or not), and the resolved configuration of the run. Offline W&B (``WANDB_MODE=offline``)
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

from vlweak.runs import run_folder, wandb_loggers


# ---------------------------------------------------------------- the numbers behind the pictures
def _bins(conf: Tensor, hit: Tensor, n_bins: int) -> dict[str, Tensor]:
    """Equal-width bins over ``(0, 1]`` of confidences ``conf`` with outcomes ``hit`` (0/1): per bin
    the ``count``, mean ``confidence`` and ``accuracy`` (mean outcome; NaN for an empty bin), and
    the bin ``edges``. A confidence ``p`` falls in bin ``b`` when ``edges[b] < p <= edges[b + 1]``
    (confidence 0 goes to the first bin)."""
    if n_bins < 1:
        raise ValueError(f"n_bins must be positive, got {n_bins}")
    edges = torch.linspace(0, 1, n_bins + 1)
    b = (torch.bucketize(conf, edges, right=False) - 1).clamp(0, n_bins - 1)
    count = torch.bincount(b, minlength=n_bins).float()
    conf_sum = torch.zeros(n_bins).index_add_(0, b, conf)
    hit_sum = torch.zeros(n_bins).index_add_(0, b, hit)
    safe, empty = count.clamp(min=1), count == 0
    return {
        "edges": edges,
        "count": count,
        "confidence": torch.where(empty, torch.nan, conf_sum / safe),
        "accuracy": torch.where(empty, torch.nan, hit_sum / safe),
    }


def calibration_bins(scores: Tensor, targets: Tensor, n_bins: int = 15) -> dict[str, Tensor]:
    """Equal-width confidence bins over ``(0, 1]`` of the top-1 predictions.

    Returns per bin: ``count``, ``confidence`` (mean top-1 probability) and ``accuracy`` (NaN for an
    empty bin), plus the bin ``edges``. A confidence ``p`` falls in bin ``b`` when
    ``edges[b] < p <= edges[b + 1]`` (confidence 0 goes to the first bin)."""
    conf, pred = scores.float().max(1)
    return _bins(conf, (pred == targets).float(), n_bins)


def expected_calibration_error(scores: Tensor, targets: Tensor, n_bins: int = 15) -> float:
    """ECE (Guo et al. 2017): ``Σ_b (n_b / N) · |acc_b − conf_b|`` over equal-width confidence bins."""
    return binned_calibration_error(calibration_bins(scores, targets, n_bins))


def label_calibration_bins(scores: Tensor, targets: Tensor, mask: Tensor | None = None, n_bins: int = 15) -> dict[str, Tensor]:
    """Multi-label reliability: equal-width bins over ``(0, 1]`` of every known entry's score
    ``[N, C]`` (entries where ``mask`` is False or the target is negative are unknown), with per
    bin the ``count``, the mean ``confidence`` and the ``accuracy``: the fraction of entries whose
    class is present (NaN for an empty bin), as :func:`calibration_bins` returns them."""
    t = targets.long()
    known = _known(t, mask)
    return _bins(scores.float()[known].clamp(0, 1), (t[known] == 1).float(), n_bins)


def _known(targets: Tensor, mask: Tensor | None) -> Tensor:
    """Known multi-label entries: a non-negative target, inside ``mask`` when there is one."""
    return targets >= 0 if mask is None else mask.bool() & (targets >= 0)


def binned_calibration_error(bins: dict[str, Tensor]) -> float:
    """``Σ_b (n_b / N) · |acc_b − conf_b|`` of a binning (ECE for :func:`calibration_bins`)."""
    keep = bins["count"] > 0
    gap = (bins["accuracy"][keep] - bins["confidence"][keep]).abs()
    return float((bins["count"][keep] / bins["count"].sum().clamp(min=1) * gap).sum())


def label_sets_agree(predicted: Tensor, targets: Tensor, mask: Tensor | None = None) -> Tensor:
    """``[N]``: whether each predicted label set ``[N, C]`` (bool) agrees with the targets on every
    known entry; unknown entries (``mask`` False, or a negative target: unobserved labels, VOC's
    difficult objects) count neither way."""
    t = targets.long()
    return ((predicted.bool() == (t == 1)) | ~_known(t, mask)).all(1)


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
def _figure(width: float, height: float, layout: str | None = "constrained"):
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout=layout)


def _short(name: str, n: int = 18) -> str:
    return name if len(name) <= n else name[: n - 1] + "…"


def draw_per_class_accuracy(acc: Tensor, names: list[str], stage: str, max_classes: int = 50, metric: str = "accuracy"):
    order = list(range(len(names)))
    title = f"{stage}: per-class {metric} (mean {float(acc.nanmean()):.3f})"
    valued = (~torch.isnan(acc)).nonzero().flatten()
    if len(valued) > max_classes:  # the hardest and the easiest of the classes with a value
        ranked = valued[torch.argsort(acc[valued], stable=True)].tolist()
        half = max_classes // 2
        order = ranked[:half] + ranked[-half:]
        title += f" — {half} lowest and {half} highest of {len(valued)}"
        if len(valued) < len(names):
            title += f" ({len(names) - len(valued)} without a value not shown)"
    elif len(names) > max_classes:  # every class with a value, then as many without one as fit
        order = valued.tolist() + (torch.isnan(acc)).nonzero().flatten().tolist()[: max_classes - len(valued)]
        title += f" — {len(order)} of {len(names)}"
    fig = _figure(max(6.0, 0.28 * len(order) + 2), 4.0)
    ax = fig.add_subplot()
    values = torch.nan_to_num(acc[order], nan=0.0).tolist()
    ax.bar(range(len(order)), values, color="tab:blue")
    for x, i in enumerate(order):  # a class without a known positive has no value: said, not drawn as 0
        if torch.isnan(acc[i]):
            ax.text(x, 0.02, "n/a", rotation=90, ha="center", va="bottom", fontsize=6, color="gray")
    ax.set_xticks(range(len(order)), [_short(names[i]) for i in order], rotation=90, fontsize=7)
    ax.set_ylim(0, 1)
    ax.set_ylabel(metric)
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


def draw_reliability(bins: dict[str, Tensor], ece: float, stage: str, multilabel: bool = False):
    fig = _figure(5.0, 5.0)
    ax = fig.add_subplot()
    edges = bins["edges"]
    width = float(edges[1] - edges[0])
    centers = (edges[:-1] + width / 2).tolist()
    acc = torch.nan_to_num(bins["accuracy"], nan=0.0).tolist()
    conf = torch.nan_to_num(bins["confidence"], nan=0.0).tolist()
    measured = "fraction present" if multilabel else "accuracy"
    ax.bar(centers, acc, width=width, edgecolor="black", color="tab:blue", label=measured)
    ax.bar(centers, [c - a for a, c in zip(acc, conf)], bottom=acc, width=width, color="tab:red", alpha=0.3,
           edgecolor="tab:red", label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", lw=1)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_xlabel("score of each known (image, class) entry" if multilabel else "confidence (top-1 score)")
    ax.set_ylabel(measured)
    ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"{stage}: reliability diagram, {'calibration error' if multilabel else 'ECE'} = {ece:.4f}", fontsize=9)
    return fig


def _as_hwc(image: Any):
    import numpy as np

    if isinstance(image, Tensor):
        x = image.detach().cpu()
        if x.dtype != torch.uint8:
            x = (x.float().clamp(0, 1) * 255).to(torch.uint8)
        return x.permute(1, 2, 0).numpy() if x.ndim == 3 else x.numpy()
    return np.asarray(image.convert("RGB"))


def draw_samples(images: list[Any], pred: list[str], true: list[str | None], stage: str, columns: int = 4,
                 right: list[bool] | None = None):
    """A grid of images titled with their predicted (and true) label; ``right`` colours a title
    green or red (default: the two names equal)."""
    n = len(images)
    rows = max(1, math.ceil(n / columns))
    fig = _figure(2.2 * columns, 2.5 * rows, layout=None)  # a fixed grid: constrained layout took 2x the time
    for k, (img, p, t) in enumerate(zip(images, pred, true)):
        ax = fig.add_subplot(rows, columns, k + 1)
        ax.imshow(_as_hwc(img))
        ax.set_axis_off()
        ok = p == t if right is None else right[k]
        if t is None:
            ax.set_title(f"pred: {_short(p, 36)}", fontsize=7)
        else:
            ax.set_title(f"pred: {_short(p, 36)}\ntrue: {_short(t, 36)}", fontsize=7, color="tab:green" if ok else "tab:red")
    height = 2.5 * rows
    fig.suptitle(f"{stage}: sample predictions", fontsize=9, y=1 - 0.12 / height)
    # room (in inches) for the title and the first row's two-line titles; between rows for theirs
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=1 - 0.72 / height, wspace=0.08, hspace=0.3)
    return fig


# ---------------------------------------------------------------- the callback
class EvaluationFigures(L.Callback):
    """Figures of a method's test / predict outputs, as PNG files and in W&B: per-class accuracy,
    confusion matrix, reliability diagram and samples (single-label); per-class AP, reliability and
    samples with label sets (multi-label).

    Args:
        stages: the stages to draw after (``test``, ``predict``).
        n_bins: confidence bins of the reliability diagram and its ECE.
        n_samples: images in the sample grid (half mistakes, half correct predictions when there
            are labels).
        max_classes: classes in the per-class bar chart before it shows only the lowest and highest.
        folder: sub-folder of the run directory for the PNG files.
        log_config: with a W&B logger, add the resolved configuration of the run to its config.
    """

    def __init__(
        self,
        stages: list[str] | None = None,
        n_bins: int = 15,
        n_samples: int = 16,
        max_classes: int = 50,
        folder: str = "figures",
        log_config: bool = True,
    ) -> None:
        super().__init__()
        self.stages = list(stages) if stages is not None else ["test", "predict"]
        unknown = set(self.stages) - {"test", "predict"}
        if unknown:
            raise ValueError(f"EvaluationFigures stages must be test and/or predict, got {sorted(unknown)}")
        self.n_bins, self.n_samples, self.max_classes = n_bins, n_samples, max_classes
        self.folder = folder
        self.log_config = log_config
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
        names, folder = list(pl_module.classnames), run_dir / self.folder
        self.ece = None  # this evaluation's, or none when its split has no labels
        if getattr(pl_module, "multilabel", False):
            threshold = float(getattr(pl_module, "threshold", 0.5))
            self.saved = self.draw_multilabel(out, names, stage, folder, trainer.datamodule, threshold)
        else:
            self.saved = self.draw(out, names, stage, folder, trainer.datamodule)
        for logger in wandb_loggers(trainer):
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
        return self._save(figs, folder, stage)

    def draw_multilabel(
        self, out: dict[str, Any], names: list[str], stage: str, folder: Path, datamodule: Any = None, threshold: float = 0.5
    ) -> dict[str, Path]:
        """Multi-label figures: per-class AP (the method's own evaluation, ``out["per_class"]``), the
        reliability of the scores over every known entry, and sample images with their predicted
        label sets (score >= ``threshold``; the best class when none reaches it) and true sets."""
        folder.mkdir(parents=True, exist_ok=True)
        scores = out["scores"].detach().float().cpu()
        target = out.get("target")
        mask = out.get("mask")
        figs = {}
        if target is not None:
            target = target.detach().cpu().long()
            mask = None if mask is None else mask.detach().cpu().bool()
            per_class = out.get("per_class")
            if per_class is not None:
                figs["per_class_ap"] = draw_per_class_accuracy(
                    per_class.detach().float().cpu(), names, stage, self.max_classes, metric="AP"
                )
            bins = label_calibration_bins(scores, target, mask, self.n_bins)
            self.ece = binned_calibration_error(bins)
            figs["reliability"] = draw_reliability(bins, self.ece, stage, multilabel=True)
        predicted = scores >= threshold
        predicted[torch.arange(len(scores)), scores.argmax(1)] = True  # at least the best class
        samples = self._multilabel_samples(out, predicted, scores, target, mask, names, stage, datamodule)
        if samples is not None:
            figs["samples"] = samples
        return self._save(figs, folder, stage)

    def _multilabel_samples(self, out, predicted, scores, target, mask, names, stage, datamodule):
        exact = None if target is None else label_sets_agree(predicted, target, mask).tolist()

        def label_set(row: Tensor, order: Tensor, most: int = 3) -> str:
            """The classes of a row's set, highest score first: three names, then how many more."""
            members = [int(c) for c in order if row[c]]
            text = ", ".join(names[c] for c in members[:most]) or "—"
            return text + (f" +{len(members) - most}" if len(members) > most else "")

        picked = self._pick(out, stage, datamodule, exact)
        if not picked:
            return None
        rows = [r for r, _ in picked]
        order = {r: scores[r].argsort(descending=True) for r in rows}  # the shown rows' classes, best first
        p_sets = [label_set(predicted[r], order[r]) for r in rows]
        t_sets = [None if target is None else label_set(target[r] == 1, order[r]) for r in rows]
        ok = [True if exact is None else exact[r] for r in rows]
        return draw_samples([image for _, image in picked], p_sets, t_sets, stage, right=ok)

    def _pick(self, out: dict[str, Any], stage: str, datamodule: Any, correct: list[bool | None] | None):
        """``[(row, image)]`` of up to ``n_samples`` outputs, in index order: half of them wrong and
        half right where ``correct`` says which are (``None`` for a row without a label)."""
        index = out.get("index")
        raw = datamodule.raw(stage) if datamodule is not None and hasattr(datamodule, "raw") else None
        if index is None or raw is None or self.n_samples <= 0:
            return None
        index = index.detach().cpu()
        rows = list(range(len(index)))
        if correct is not None:
            wrong = [r for r in rows if correct[r] is False]
            right = [r for r in rows if correct[r] is True]
            # half and half, the other kind topping up where one is short
            n_right = min(len(right), max(self.n_samples // 2, self.n_samples - len(wrong)))
            pick = wrong[: self.n_samples - n_right] + right[:n_right]
            rows = sorted(pick[: self.n_samples]) or rows[: self.n_samples]
        else:
            rows = rows[: self.n_samples]
        picked = []
        for r in rows:
            item = raw[int(index[r])]
            if item is not None and "image" in item:
                picked.append((r, item["image"]))
        return picked

    @staticmethod
    def _save(figs: dict[str, Any], folder: Path, stage: str) -> dict[str, Path]:
        saved = {}
        for name, fig in figs.items():
            path = folder / f"{stage}_{name}.png"
            fig.savefig(path)
            saved[name] = path
        return saved

    def _samples(self, out, pred, target, names, stage, datamodule):
        correct = None if target is None else [None if t < 0 else bool(p == t) for p, t in zip(pred.tolist(), target.tolist())]
        picked = self._pick(out, stage, datamodule, correct)
        if not picked:
            return None
        rows = [r for r, _ in picked]
        p_names = [names[int(pred[r])] for r in rows]
        t_names = [names[int(target[r])] if target is not None and target[r] >= 0 else None for r in rows]
        return draw_samples([image for _, image in picked], p_names, t_names, stage)

    # ------------------------------------------------------------------ Weights & Biases
    def _to_wandb(self, logger: Any, trainer: L.Trainer, pl_module: L.LightningModule, stage: str, out: dict) -> None:
        import wandb

        run = logger.experiment
        from vlweak.cli import SaveRunConfig

        # the vlweak CLI's SaveRunConfig has logged it already, in every subcommand
        if self.log_config and not any(isinstance(cb, SaveRunConfig) for cb in trainer.callbacks):
            config = self.resolved_config(trainer)
            if config:
                run.config.update({"resolved_config": config}, allow_val_change=True)
        images = {f"{stage}/figures/{name}": wandb.Image(str(path), caption=name) for name, path in self.saved.items()}
        if self.ece is not None and "target" in out:
            images[f"{stage}/ece"] = self.ece
        if images:
            run.log(images)

    @staticmethod
    def resolved_config(trainer: L.Trainer) -> dict[str, Any] | None:
        """The run's complete configuration as the CLI resolved it (``None`` outside the CLI)."""
        import yaml
        from lightning.pytorch.cli import SaveConfigCallback

        for cb in trainer.callbacks:
            if isinstance(cb, SaveConfigCallback):
                from vlweak.cli import dump_everything

                return yaml.safe_load(dump_everything(cb.parser, cb.config))
        return None
