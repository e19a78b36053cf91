"""vlweak.distributed in two real gloo processes: rank 0's answer and rank 0's error reach every rank
(rank_zero_first); a cache on each node's disk filled once per node (fill_once_per_node); ranks
holding different numbers of rows, none included, gather them all, with
the gradient of each rank's rows coming back to it (gather_rows, gather_ragged)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
import torch.multiprocessing as mp

from vlweak.distributed import fill_once_per_node, gather_ragged, gather_rows, rank_zero_first


class _Strategy:
    """What rank_zero_first uses of a Lightning strategy: the ranks and an object broadcast."""

    def __init__(self, rank: int, world: int, per_node: int | None = None) -> None:
        self.global_rank, self.world_size = rank, world
        self.local_rank = rank % (per_node or world)

    def broadcast(self, obj, src: int = 0):
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]

    def all_gather(self, tensor, sync_grads: bool = False):  # as Lightning's: stacked, [world, ...]
        if sync_grads:
            return torch.stack(dist_fn.all_gather(tensor))
        out = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(out, tensor)
        return torch.stack(out)


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
    # ranks of 3 and 0 rows (every image of rank 1 unreadable), then of 2 and 1
    for sizes in ((3, 0), (2, 1)):
        n, first = sizes[rank], sum(sizes[:rank])
        local = {"index": torch.arange(first, first + n), "scores": torch.arange(first, first + n).double()[:, None].expand(n, 2) / 10}
        got = gather_ragged(s, local if n else {}, "cpu")
        lines.append(f"ragged {sorted(got)} {got['index'].tolist()} {got['scores'].dtype} {got['scores'][:, 1].tolist()}")
    # a contrastive batch of 2 + 1 rows: each rank's gradient reaches only its own rows
    n, first = (2, 1)[rank], (0, 2)[rank]
    x = torch.arange(first, first + n).float()[:, None].repeat(1, 3).requires_grad_()
    y = gather_rows(s, x, sync_grads=True)
    weight = torch.arange(9.0).reshape(3, 3)
    (y * weight).sum().backward()
    lines.append(f"rows {y[:, 0].tolist()} {torch.equal(x.grad, 2 * weight[first:first + n])}")
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
    assert outcome[0][4] == "calls 1" and outcome[1][4] == "calls 0"


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


def test_ranks_with_different_numbers_of_rows_none_included_gather_them_all(outcome):
    for r in (0, 1):
        # the rank with no rows took the tensors' dtype and shape from the other
        assert outcome[r][5] == "ragged ['index', 'scores'] [0, 1, 2] torch.float64 [0.0, 0.1, 0.2]"
        assert outcome[r][6] == "ragged ['index', 'scores'] [0, 1, 2] torch.float64 [0.0, 0.1, 0.2]"
        # the loss summed over the global batch on each rank: DDP then averages the ranks' gradients
        assert outcome[r][7] == "rows [0.0, 1.0, 2.0] True"


def _node_rank(rank: int, world: int, init: str, out: str) -> None:
    """Two nodes of two ranks; each node's "disk" is a folder, or one folder every node sees."""
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world)
    s = _Strategy(rank, world, per_node=2)
    lines = []
    for layout in ("local", "shared"):
        disk = Path(out, layout, f"node{rank // 2}" if layout == "local" else "all")
        disk.mkdir(parents=True, exist_ok=True)
        entry = disk / "entry.txt"

        def fill() -> str:
            if not entry.is_file():  # the cache's miss: encode and store
                entry.write_text(f"filled by rank {rank}")
                lines.append(f"{layout} filled")
            return entry.read_text()

        lines.append(f"{layout} {fill_once_per_node(s, fill)}")
    try:
        fill_once_per_node(s, lambda: _fail("missing") if rank == 2 else "ok")
    except Exception as err:
        lines.append(f"error {type(err).__name__}: {err}")
    Path(out, f"rank{rank}.txt").write_text("\n".join(lines))
    dist.destroy_process_group()


def test_a_cache_on_each_nodes_disk_is_filled_once_per_node():
    import tempfile

    with tempfile.TemporaryDirectory() as d:
        mp.spawn(_node_rank, args=(4, f"file://{d}/store", d), nprocs=4, join=True)
        got = {r: Path(d, f"rank{r}.txt").read_text().splitlines() for r in range(4)}
    # node-local disks: the first rank of each node fills its node's entry, the others read it
    assert got[0][:2] == ["local filled", "local filled by rank 0"] and got[1][0] == "local filled by rank 0"
    assert got[2][:2] == ["local filled", "local filled by rank 2"] and got[3][0] == "local filled by rank 2"
    # one shared disk: rank 0 alone fills it, every rank reads rank 0's entry
    assert [line for r in range(4) for line in got[r] if line == "shared filled"] == ["shared filled"]
    assert all("shared filled by rank 0" in got[r] for r in range(4))
    # a failure on another node's first rank stops every rank with its message
    assert all(got[r][-1] == "error FileNotFoundError: no such split: /data/train" for r in range(4))


def test_loader_workers_of_a_gloo_rank_start_from_a_fork_server(tmp_path, tiny_backbone):
    """In a gloo rank, loader workers come from a fork server (a fork can catch a gloo thread
    holding the interpreter's lock); they serve the same batches as the main process, and the
    kept-image flags DualCoOp sets in shared memory reach a persistent worker started before."""
    from vlweak.data import ShapesWorldDataModule
    from vlweak.data.datasets import LabelsOfKept, data_loader
    from vlweak.distributed import worker_start_method

    def module(workers: int) -> ShapesWorldDataModule:
        dm = ShapesWorldDataModule(multilabel=True, image_size=32, n_train=8, n_val=0, n_test=0, batch_size=4,
                                   num_workers=workers, transform=tiny_backbone.transform)
        dm.setup("fit")
        return dm

    assert worker_start_method(2) is None  # no process group: the platform's default
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        assert worker_start_method(0) is None and worker_start_method(2) == "forkserver"
        loader = module(1).train_dataloader()
        assert loader.multiprocessing_context.get_start_method() == "forkserver"
        in_workers = list(loader)
        in_main = list(module(0).train_dataloader())
        assert len(in_workers) == len(in_main) == 2
        for a, b in zip(in_workers, in_main):
            assert a.keys() == b.keys()
            assert all(torch.equal(a[k], b[k]) if torch.is_tensor(a[k]) else a[k] == b[k] for k in a)
        served = LabelsOfKept(module(0).datasets["train"])
        loader = data_loader(served, 1, batch_size=8, persistent_workers=True)
        assert loader.multiprocessing_context.get_start_method() == "forkserver"
        assert "image_rows" not in next(iter(loader))
        served.kept[[1, 4]] = True  # after the worker started
        assert next(iter(loader))["image_rows"].tolist() == [0, 2, 3, 5, 6, 7]
    finally:
        dist.destroy_process_group()
