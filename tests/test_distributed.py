"""rank_zero_first in two real gloo processes: rank 0's answer and rank 0's error reach every rank."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch.distributed as dist
import torch.multiprocessing as mp

from vlweak.distributed import rank_zero_first


class _Strategy:
    """What rank_zero_first uses of a Lightning strategy: the ranks and an object broadcast."""

    def __init__(self, rank: int, world: int) -> None:
        self.global_rank, self.world_size = rank, world

    def broadcast(self, obj, src: int = 0):
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]


class _Unpicklable(Exception):
    def __init__(self, path: Path, detail: str) -> None:  # two arguments: pickling it back would fail
        super().__init__(f"{path}: {detail}")


def _fail(kind: str):
    if kind == "missing":
        raise FileNotFoundError("no such split: /data/train")
    raise _Unpicklable(Path("/data/round-000.safetensors"), "not a round checkpoint")


def _rank(rank: int, world: int, init: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    s = _Strategy(rank, world)
    lines = []
    calls = []
    lines.append(f"shared {rank_zero_first(s, lambda: calls.append(1) or {'n': 7}, share=True)}")
    lines.append(f"unshared {rank_zero_first(s, lambda: 'filled')}")
    for kind in ("missing", "other"):
        start = time.monotonic()
        try:
            rank_zero_first(s, lambda: _fail(kind))
        except Exception as err:
            lines.append(f"{kind} {type(err).__name__}: {err} | {time.monotonic() - start < 30}")
    lines.append(f"calls {len(calls)}")
    Path(out, f"rank{rank}.txt").write_text("\n".join(lines))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def outcome(tmp_path_factory) -> dict[int, list[str]]:
    out = tmp_path_factory.mktemp("ranks")
    mp.spawn(_rank, args=(2, f"file://{out / 'store'}", str(out)), nprocs=2, join=True)
    return {r: (out / f"rank{r}.txt").read_text().splitlines() for r in range(2)}


def test_every_rank_gets_rank_zeros_answer_and_only_rank_zero_works(outcome):
    assert outcome[0][:2] == ["shared {'n': 7}", "unshared filled"]
    assert outcome[1][:2] == ["shared {'n': 7}", "unshared None"]
    assert outcome[0][-1] == "calls 1" and outcome[1][-1] == "calls 0"


def test_rank_zeros_error_stops_every_rank_with_its_message(outcome):
    for r in (0, 1):
        assert outcome[r][2] == "missing FileNotFoundError: no such split: /data/train | True"
    assert outcome[0][3] == "other _Unpicklable: /data/round-000.safetensors: not a round checkpoint | True"
    # an error that cannot travel as itself arrives as a RuntimeError naming its type and message
    assert outcome[1][3] == "other RuntimeError: _Unpicklable: /data/round-000.safetensors: not a round checkpoint | True"


def test_one_process_just_runs_the_work():
    assert rank_zero_first(None, lambda: 3) == 3
    assert rank_zero_first(_Strategy(0, 1), lambda: 4) == 4
    with pytest.raises(FileNotFoundError, match="/data/train"):
        rank_zero_first(None, lambda: _fail("missing"))
