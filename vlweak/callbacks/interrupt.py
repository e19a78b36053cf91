"""A checkpoint of the fit where it stopped: Ctrl-C, a crash, a corrupt file met mid-epoch."""

from __future__ import annotations

import logging
from pathlib import Path

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint

from vlweak.callbacks.pseudolabel_rounds import PseudolabelRounds

log = logging.getLogger(__name__)


class CheckpointOnInterrupt(L.Callback):
    """When a one-process fit stops on an exception or Ctrl-C after it has trained at least one
    step, write ``<filename>.ckpt`` beside the run's ``ModelCheckpoint`` files. Every checkpoint
    records where the fit stood in its epoch, so ``vlweak fit ... --ckpt_path last`` (which takes
    the newest ``last*.ckpt``) continues from the step it stopped at, on the batches an
    uninterrupted run would train next: nothing trained is lost.

    The vlweak CLI adds it to every ``fit`` whose trainer has a ``ModelCheckpoint``. Under several
    processes it writes nothing: saving is a collective, and a rank stopped on its own error cannot
    join it (the periodic checkpoints are what such a run continues from). Nor does it while a fit in
    pseudolabel rounds (:class:`~vlweak.callbacks.PseudolabelRounds`) is choosing a round's
    pseudolabels: the rounds folder resumes that (run the same fit again without ``--ckpt_path``).

    Args:
        filename: file name without ``.ckpt``; keep the ``last`` prefix for ``--ckpt_path last``.
    """

    def __init__(self, filename: str = "last-interrupted") -> None:
        if not filename.startswith("last"):
            raise ValueError(f"filename must start with 'last' (what --ckpt_path last looks for), got {filename!r}")
        self.filename = filename

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if trainer.state.fn != "fit" or trainer.world_size > 1 or trainer.global_step == 0 or trainer.sanity_checking:
            return
        if any(isinstance(cb, PseudolabelRounds) and cb.pseudolabeling for cb in trainer.callbacks):
            log.warning("the fit stopped (%s) while choosing a round's pseudolabels: run the same `vlweak fit` again, "
                        "without --ckpt_path, to resume at that round", type(exception).__name__)
            return
        folder = next((cb.dirpath for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath), None)
        if folder is None:
            return
        path = Path(folder) / f"{self.filename}.ckpt"
        try:
            trainer.save_checkpoint(path, weights_only=False)  # the whole fit: optimizer, loops, callbacks
        except Exception as err:  # noqa: BLE001 - the exception that stopped the fit is the one to raise
            log.warning("the fit stopped (%s) and its checkpoint could not be written to %s: %s", type(exception).__name__, path, err)
            return
        log.warning(
            "the fit stopped at step %d (%s); saved %s: `vlweak fit` with the same recipe and --ckpt_path last continues from it",
            trainer.global_step, type(exception).__name__, path,
        )
