"""The training order: drawn from a seed and an epoch alone, and resumable in the middle of an epoch.

A run stopped at any step and continued with ``--ckpt_path`` must train on the batches an
uninterrupted run trains on, in the same order. Two things stand in the way with a plain
``DataLoader``: a shuffle drawn from the global random state (a restart does not restore it), and
Lightning restarting an interrupted epoch from its first batch (it counts the batches already done,
so the epoch ends early, with some batches trained twice and others never). :class:`EpochShuffle`
fixes the first; :class:`ResumableLoader` the second, with the data module, which writes the run's
position (:func:`trained_position`) into every checkpoint and has each epoch's iterator made for
the epoch and from the batch that position names.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset, RandomSampler


class EpochShuffle(RandomSampler):
    """The training order of an epoch, drawn from the run's seed and the epoch number alone.

    Lightning calls :meth:`set_epoch` before every epoch, so a run resumed from a checkpoint sees the
    same order as one never stopped (a plain shuffle draws from the global random state, which a
    restart does not restore). Under DDP Lightning puts its seeded ``DistributedSampler`` in place,
    as for any ``RandomSampler``.
    """

    def __init__(self, data_source: Dataset, seed: int | None = None) -> None:
        super().__init__(data_source, generator=torch.Generator())
        self.seed = int(os.environ.get("PL_GLOBAL_SEED", 0)) if seed is None else seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        self.generator.manual_seed(self.seed + self.epoch)
        return super().__iter__()


def trained_position(trainer: Any) -> tuple[int, int]:
    """``(epoch, batches of it trained)`` of a fit: where a run continued from a checkpoint written
    now starts again, and, as an epoch's iterator is made, the epoch it is for. A finished epoch is
    ``(next epoch, 0)``, however the checkpoint was triggered (after its last batch, at the epoch's
    end, or between epochs)."""
    fit = trainer.fit_loop
    epoch, done = fit.epoch_progress.current, fit.epoch_loop.batch_progress.current.processed
    if epoch.processed == epoch.started:  # between epochs: the next one has not started
        return epoch.processed, 0
    if done >= trainer.num_training_batches:  # the last batch is trained: the epoch is over
        return epoch.processed + 1, 0
    return epoch.processed, done


def check_resumable(skip: int, batches: int) -> None:
    """A checkpoint that stopped after ``skip`` batches of an epoch fits a loader of ``batches``."""
    if not 0 <= skip < batches:
        raise ValueError(
            f"the checkpoint stopped after batch {skip} of an epoch, but this run has {batches} training "
            "batches per epoch: resume with the data, batch size and devices it was trained with"
        )


class _SkipFirst:
    """A loader's batch sampler that draws the order its loader planned when the iterator was made,
    and leaves out the plan's first batches (their indices are drawn, nothing is loaded).

    The samplers are set to the plan's seed and epoch again as the first batch is drawn: the
    drawing starts only then, and Lightning sets the sampler's epoch (its own count, which a method
    ordering by round and epoch in round does not follow) in between. A worker-keeping iterator asks
    for a new pass at each epoch, so the skip applies only to the epoch it resumes."""

    def __init__(self, batches: Any, loader: ResumableLoader) -> None:
        self.batches, self.loader = batches, loader

    def __iter__(self) -> Iterator[Any]:
        return self._draw(self.loader._order, self.loader._skip)

    def _draw(self, order: tuple[int | None, int] | None, skip: int) -> Iterator[Any]:
        if order is not None:
            self.loader.set_order(*order)
        yield from islice(iter(self.batches), skip, None)

    def __len__(self) -> int:
        return len(self.batches)


class ResumableLoader(DataLoader):
    """A training ``DataLoader`` whose every pass draws its order from a plan, and which can start
    a pass part-way through.

    Args (besides ``DataLoader``'s):
        plan: ``() -> (seed, epoch, skip)``, asked whenever an epoch's iterator is made: the seed
            (``None``: keep the sampler's), the epoch whose order to draw and how many of its first
            batches to leave out (a resumed epoch's batches already trained; their indices are drawn,
            nothing is loaded). The data module's plan follows the run's progress
            (:meth:`~vlweak.data.datamodule.VLDataModule.next_pass`).

    The plan decides when the iterator is made, not when Lightning later sets the sampler's epoch:
    Lightning makes a resumed fit's first iterator, and with worker processes draws its first
    batches, before it sets the epoch; and when a method sizes its schedule from the loader
    (``estimated_stepping_batches``) the iterator exists before the checkpoint's progress is
    restored. Under DDP each rank skips its own share: the distributed sampler splits the same
    order on every rank.
    """

    def __init__(self, *args: Any, plan: Callable[[], tuple[int | None, int, int]] | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.plan = plan
        self._order: tuple[int | None, int] | None = None
        self._skip = 0

    def samplers(self) -> list[Any]:
        """The sampler(s) that draw the order (the plain one and the batch sampler's, once each)."""
        found = (getattr(self, "sampler", None), getattr(getattr(self, "batch_sampler", None), "sampler", None))
        return list({id(s): s for s in found if s is not None}.values())

    @property
    def _index_sampler(self) -> Any:  # what the iterator draws indices from
        return _SkipFirst(super()._index_sampler, self)

    def set_order(self, seed: int | None, epoch: int) -> None:
        """Draw the next pass from ``seed`` (``None``: the sampler's) and ``epoch``."""
        for s in self.samplers():
            if seed is not None and hasattr(s, "seed"):
                s.seed = seed
            if hasattr(s, "set_epoch"):
                s.set_epoch(epoch)

    def __iter__(self) -> Any:
        order, skip = None, 0
        if self.plan is not None:
            seed, epoch, skip = self.plan()
            check_resumable(skip, len(self))
            order = (seed, epoch)  # applied as the pass's first batch is drawn (_SkipFirst)
        self._order, self._skip = order, skip
        try:
            return super().__iter__()
        finally:
            self._order, self._skip = None, 0

    # Lightning's protocol for resumable loaders (without it Lightning warns that a mid-epoch resume
    # is unreliable). The position is not kept here: it travels in the data module's own entry of
    # the checkpoint, which Lightning restores before anything can iterate (it hands a loader its
    # state only after the first iterator may exist, and not at all after a finished epoch).
    def state_dict(self) -> dict[str, int]:
        return {}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Nothing to restore here (see above)."""
