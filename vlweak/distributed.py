"""Collectives that tolerate what real runs bring: rank 0's failure, and ranks holding different amounts.

Work that one rank does for all of them, with its answer and its failure shared.

A transductive method encodes a split once into the embedding cache, or solves one graph, on rank 0
while the other ranks wait. If they waited at a plain barrier and rank 0 failed (a missing split, an
unreadable folder, out of memory), they would wait there until the process group times out (half an
hour by default). :func:`rank_zero_first` waits in a broadcast instead, which carries rank 0's error
as well as its answer, so every rank stops with rank 0's message at once. A cache on each node's own
disk is filled once per node (:func:`fill_once_per_node`): after rank 0, the first rank of every
other node, while the node's other ranks wait.

Ranks holding different numbers of rows. A rank that skipped unreadable images (``skip_bad: true``)
holds a shorter batch than the others, or none; a plain all-gather needs the same shape everywhere
and fails or hangs. :func:`gather_rows` (one tensor, gradients optional) and :func:`gather_ragged`
(a dict of per-sample tensors, e.g. an epoch's outputs) pad every rank to the longest and cut the
padding off again; a rank with nothing learns the tensors' dtypes and shapes from one that has some.

Loader workers of a gloo rank start from a fork server (:func:`worker_start_method`).
"""

from __future__ import annotations

import builtins
import multiprocessing
from typing import Any, Callable, TypeVar

import torch
from torch import Tensor

T = TypeVar("T")


def worker_start_method(num_workers: int) -> str | None:
    """How data-loader workers start: ``forkserver`` in a rank of a gloo process group (CPU
    distributed runs), else the platform's default (``None``; ``fork`` on Linux).

    Forking copies whatever locks other threads hold at that moment. gloo runs threads of its own,
    and a fork that lands while one of them holds the interpreter's thread-state lock leaves the
    worker stuck in CPython's after-fork clean-up: its rank waits for its batches and every other
    rank waits for that rank. A fork server is a fresh single-threaded process, so the workers it
    forks start clean. Like ``spawn``, it imports the main module in each worker: a script launched
    with ``torchrun`` needs the usual ``if __name__ == "__main__":`` guard (the ``vlweak`` command
    has it)."""
    dist = torch.distributed
    if num_workers <= 0 or not (dist.is_available() and dist.is_initialized()):
        return None
    if dist.get_backend() != "gloo" or "forkserver" not in multiprocessing.get_all_start_methods():
        return None
    from multiprocessing import forkserver  # POSIX only, past the check above

    # the server imports vlweak's data code (and so torch) once, so each worker it forks starts warm
    preload = getattr(forkserver._forkserver, "_preload_modules", ["__main__"])
    if "vlweak.data" not in preload:
        forkserver.set_forkserver_preload([*preload, "vlweak.data"])
    return "forkserver"


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


def _attempt(work: Callable[[], T]) -> tuple[T | None, Exception | None]:
    """``(work(), None)``, or ``(None, its error)``: a rank's failure is kept to share, not raised yet."""
    try:
        return work(), None
    except Exception as err:
        return None, err


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
    result, error = _attempt(work) if strategy.global_rank == 0 else (None, None)
    answer, failure = strategy.broadcast(
        (result if share and error is None else None, None if error is None else _portable(error)), src=0
    )
    if error is not None:
        raise error
    if failure is not None:
        raise failure
    return result if strategy.global_rank == 0 else answer


def node_first(strategy: Any, work: Callable[[], T]) -> T | None:
    """Run ``work`` on the first rank of every node (local rank 0) while the node's other ranks
    wait; then every rank raises the first failure of any node. A collective: call it on every rank.

    Returns:
        ``work()`` on a node's first rank, ``None`` on the others.
    """
    if strategy is None or getattr(strategy, "world_size", 1) == 1:
        return work()
    result, error = _attempt(work) if strategy.local_rank == 0 else (None, None)
    failures: list[Any] = [None] * strategy.world_size
    torch.distributed.all_gather_object(failures, None if error is None else _portable(error))
    if error is not None:
        raise error
    failure = next((f for f in failures if f is not None), None)
    if failure is not None:
        raise failure
    return result


def fill_once_per_node(strategy: Any, fill: Callable[[], T], read: Callable[[], T] | None = None) -> T:
    """A cache every rank reads, filled once: rank 0 runs ``fill`` while the others wait (and stop
    with its error); then the first rank of every other node runs ``fill`` too, which reads rank 0's
    entry where the cache is on a file system every node sees, or fills the node's own cache where
    it is on the node's disk, while that node's other ranks wait; then they ``read`` (default
    ``fill``) their node's entry. A collective: call it on every rank.

    Without the second step, every rank of a node without rank 0's entry would fill it itself."""
    out = rank_zero_first(strategy, fill)
    if strategy is None or getattr(strategy, "world_size", 1) == 1:
        return out
    done = out
    out = node_first(strategy, (lambda: done) if done is not None else fill)
    return out if out is not None else (read or fill)()


def _sizes(strategy: Any, n: int, device: Any) -> list[int]:
    return strategy.all_gather(torch.tensor([n], device=device)).flatten().tolist()


def _padded(x: Tensor, m: int) -> Tensor:
    return torch.cat([x, x.new_zeros((m - len(x), *x.shape[1:]))]) if m > len(x) else x


def _gather_sized(strategy: Any, x: Tensor, sizes: list[int], sync_grads: bool = False) -> Tensor:
    """The ranks' rows of ``x``, ``sizes[r]`` on rank ``r``: padded to the longest, gathered, cut."""
    g = strategy.all_gather(_padded(x, max(sizes)), sync_grads=sync_grads)
    return torch.cat([g[r, :n] for r, n in enumerate(sizes)])


def gather_rows(strategy: Any, x: Tensor, *, sync_grads: bool = False) -> Tensor:
    """Every rank's rows of ``x`` (``[n_rank, ...]``, ``n_rank`` may differ, zero included), in
    rank order: ``[sum of n_rank, ...]``. With ``sync_grads`` the gradient of each rank's own rows
    flows back to it (a contrastive loss over the global batch). A collective: call it on every
    rank, with the same trailing shape and dtype."""
    return _gather_sized(strategy, x, _sizes(strategy, len(x), x.device), sync_grads)


def gather_ragged(strategy: Any, local: dict[str, Tensor], device: Any) -> dict[str, Tensor]:
    """Every rank's per-sample tensors, concatenated in rank order (``{}`` when no rank has a row).

    ``local`` holds tensors with one row per sample and an ``index`` entry; ranks may hold
    different numbers of rows, and a rank with none may pass ``{}``. A collective: call it on every
    rank."""
    sizes = _sizes(strategy, len(local.get("index", ())), device)
    m = max(sizes)
    if m == 0:
        return {}
    if min(sizes) == 0:  # a rank with nothing cannot shape its padding: one that has rows tells it
        src = next(r for r, n in enumerate(sizes) if n)
        schema = {k: (v.dtype, tuple(v.shape[1:])) for k, v in local.items()} if strategy.global_rank == src else None
        schema = strategy.broadcast(schema, src=src)
        if not local:
            local = {k: torch.empty((0, *shape), dtype=dtype) for k, (dtype, shape) in schema.items()}
    return {k: _gather_sized(strategy, v.to(device), sizes) for k, v in sorted(local.items())}
