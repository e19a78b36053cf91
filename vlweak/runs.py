"""Where a run's files go: one folder per run, whatever the logger.

Lightning's ``trainer.log_dir`` is the per-version folder of a CSV or TensorBoard logger, but the
shared ``save_dir`` of every other logger (W&B, MLflow, ...): runs logged to W&B would write their
``config.yaml``, pseudolabel artifacts, per-class tables and figures over each other (every run of a
sweep into one folder). :func:`run_folder` is ``save_dir/<name>/<version>`` for every logger, the
folder whose ``checkpoints/`` Lightning's ``ModelCheckpoint`` already uses, so a run's files and its
checkpoints sit together and ``--ckpt_path last`` finds W&B runs like CSV ones.
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger


def run_folder(trainer: L.Trainer) -> Path:
    """The run's own folder. Under DDP a collective (rank 0's folder is broadcast): call it on every rank."""
    logger = trainer.logger
    if logger is None or isinstance(logger, (CSVLogger, TensorBoardLogger)):
        return Path(trainer.log_dir or trainer.default_root_dir)  # log_dir broadcasts
    version = logger.version  # the W&B run id (the sweep agent's, when a sweep launched the run)
    version = version if isinstance(version, str) else f"version_{version}"
    folder = Path(logger.save_dir or trainer.default_root_dir) / str(logger.name) / version
    return Path(trainer.strategy.broadcast(str(folder)))


def runs_root(trainer: L.Trainer) -> Path | None:
    """The folder holding every run of a recipe, one folder per run (see :func:`run_folder`):
    ``save_dir/<name>`` of the logger; ``None`` without a logger."""
    logger = trainer.logger
    if logger is None:
        return None
    root = getattr(logger, "root_dir", None)  # CSV / TensorBoard
    if root:
        return Path(root)
    return Path(logger.save_dir or trainer.default_root_dir) / str(logger.name)


def wandb_loggers(trainer: L.Trainer) -> list:
    """The trainer's W&B loggers (none when W&B is off)."""
    return [lg for lg in trainer.loggers if type(lg).__name__ == "WandbLogger"]


def log_wandb_artifact(trainer: L.Trainer, files: list, name: str, metadata: dict | None = None,
                       kind: str = "pseudolabels") -> None:
    """Log ``files`` as one W&B artifact (of type ``kind``, named ``<name>-<run id>``) to each W&B
    logger of ``trainer`` (none: nothing to do); call it on rank 0, where the files are."""
    loggers = wandb_loggers(trainer)
    files = [Path(f) for f in files if f is not None and Path(f).is_file()]
    if not loggers or not files:
        return
    import wandb

    for logger in loggers:
        run = logger.experiment
        art = wandb.Artifact(f"{name}-{run.id}", type=kind, metadata=metadata or {})
        for f in files:
            art.add_file(str(f))
        run.log_artifact(art)
