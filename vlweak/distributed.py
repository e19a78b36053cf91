"""Work that one rank does for all of them, with its answer and its failure shared.

A transductive method encodes a split once into the embedding cache, or solves one graph, on rank 0
while the other ranks wait. If they waited at a plain barrier and rank 0 failed (a missing split, an
unreadable folder, out of memory), they would wait there until the process group times out (half an
hour by default). :func:`rank_zero_first` waits in a broadcast instead, which carries rank 0's error
as well as its answer, so every rank stops with rank 0's message at once.
"""

from __future__ import annotations

import builtins
from typing import Any, Callable, TypeVar

T = TypeVar("T")


def _portable(err: Exception) -> Exception:
    """An exception that survives pickling and reads as ``err`` does: a built-in error of the same
    type and message, else a ``RuntimeError`` naming the type."""
    kind = type(err)
    if getattr(builtins, kind.__name__, None) is kind:
        try:
            return kind(str(err))
        except Exception:  # a built-in whose constructor wants other arguments
            pass
    return RuntimeError(f"{kind.__name__}: {err}")


def rank_zero_first(strategy: Any, work: Callable[[], T], *, share: bool = False) -> T | None:
    """Run ``work`` on rank 0 while the other ranks wait; then every rank raises rank 0's error, if
    it had one. A collective: call it on every rank.

    Args:
        strategy: the trainer's strategy (``None`` or a single process: ``work`` just runs).
        work: what rank 0 does.
        share: broadcast rank 0's answer to the other ranks (a picklable value); otherwise they
            get ``None`` (rank 0 filled a cache they read next).

    Returns:
        ``work()`` on rank 0; rank 0's answer (``share``) or ``None`` on the others.
    """
    if strategy is None or getattr(strategy, "world_size", 1) == 1:
        return work()
    result: Any = None
    error: Exception | None = None
    if strategy.global_rank == 0:
        try:
            result = work()
        except Exception as err:
            error = err
    answer, failure = strategy.broadcast(
        (result if share and error is None else None, None if error is None else _portable(error)), src=0
    )
    if error is not None:
        raise error
    if failure is not None:
        raise failure
    return result if strategy.global_rank == 0 else answer
