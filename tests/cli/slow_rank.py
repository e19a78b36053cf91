"""A callback for multi-process tests: the ranks other than 0 start their fit late."""

from __future__ import annotations

import time

import lightning as L


class SlowRank(L.Callback):
    """Hold back every rank but 0 for ``seconds`` at fit start, before the method's own callbacks run,
    so rank 0 has done its start (read and written the rounds folder) when the others begin theirs."""

    def __init__(self, seconds: float = 3.0) -> None:
        self.seconds = seconds

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.global_rank != 0:
            time.sleep(self.seconds)
