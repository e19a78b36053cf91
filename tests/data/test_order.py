"""The training order: a fit stopped at any step and continued from its checkpoint trains on the
batches an uninterrupted fit trains on, in the same order (mid-epoch, at an epoch's end, with worker
processes, twice in one epoch, and when the schedule is sized from the loader before the restore)."""

from __future__ import annotations

import warnings

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import Dataset

from vlweak.data import VLDataModule
from vlweak.data.order import ResumableLoader

N, BATCH, EPOCHS = 12, 3, 3  # four batches an epoch


class _Numbers(Dataset):
    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        return {"x": i}


class _Data(VLDataModule):
    def __init__(self, workers: int = 0, batch_size: int = BATCH) -> None:
        super().__init__(batch_size=batch_size, num_workers=workers)

    def setup(self, stage: str | None = None) -> None:
        self.datasets["train"] = _Numbers()


class _Recorder(L.LightningModule):
    """Records the samples of every batch it trains on."""

    def __init__(self, sized_schedule: bool = False) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[int]] = []
        self.sized_schedule = sized_schedule

    def training_step(self, batch, batch_idx):
        self.seen.append(batch["x"].tolist())
        return self.w * batch["x"].float().sum()

    def configure_optimizers(self):
        if self.sized_schedule:  # as DualCoOp's cosine schedule: makes the loader before the restore
            assert self.trainer.estimated_stepping_batches == N // BATCH * EPOCHS
        return torch.optim.SGD(self.parameters(), lr=0.0)


class _Cut(L.Callback):
    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("power cut")


def _fit(folder, every: int | None, workers: int, cut: int | None = None, ckpt=None, sized: bool = False, **data):
    model = _Recorder(sized)
    checkpoint = (ModelCheckpoint(dirpath=folder, every_n_train_steps=every, save_last=True, save_top_k=0) if every
                  else ModelCheckpoint(dirpath=folder, save_last=True, save_top_k=-1))  # at each epoch's end
    trainer = L.Trainer(max_epochs=EPOCHS, logger=False, enable_progress_bar=False, enable_model_summary=False,
                        accelerator="cpu", callbacks=[checkpoint] + ([_Cut(cut)] if cut is not None else []))
    try:
        trainer.fit(model, _Data(workers, **data), ckpt_path=ckpt)
    except RuntimeError as err:
        if "power cut" not in str(err):
            raise
    return model.seen


@pytest.mark.parametrize(
    ("every", "workers", "cuts", "sized"),
    [
        (2, 0, [3], False),      # mid-epoch: batch 2 of epoch 0
        (1, 1, [5, 7], False),   # cut twice in epoch 1, with a worker process
        (None, 1, [6], False),   # an epoch-end checkpoint, a worker drawing batches before the epoch is set
        (1, 0, [5], True),       # the loader made (for the schedule) before the checkpoint's progress is restored
    ],
)
def test_a_resumed_fit_trains_the_batches_of_an_uninterrupted_one(tmp_path, every, workers, cuts, sized):
    whole = _fit(tmp_path / "whole", every, workers, sized=sized)
    assert len(whole) == EPOCHS * N // BATCH
    trained, ckpt = [], None
    for cut in cuts:
        seen = _fit(tmp_path / "cut", every, workers, cut=cut, ckpt=ckpt, sized=sized)
        saved = cut // (every or N // BATCH) * (every or N // BATCH)  # the step of the last checkpoint
        trained += seen[: saved - len(trained)]
        ckpt = tmp_path / "cut" / "last.ckpt"
        position = torch.load(ckpt, weights_only=False)["_Data"]["train_position"]
        assert position == [saved // (N // BATCH), saved % (N // BATCH)]
    trained += _fit(tmp_path / "rest", every, workers, ckpt=ckpt, sized=sized)
    assert trained == whole


def test_a_checkpoint_of_another_epoch_length_is_refused_naming_both(tmp_path):
    _fit(tmp_path / "cut", 2, 0, cut=3)
    with pytest.raises(ValueError, match=r"stopped after batch 2 of an epoch, but this run has 2 training batches"):
        _fit(tmp_path / "rest", 2, 0, ckpt=tmp_path / "cut" / "last.ckpt", batch_size=6)
    # a smaller batch has room for the skip, but the batches skipped would not be the ones trained
    with pytest.raises(ValueError, match=r"stopped after batch 2 of an epoch made of other batches \(global batch size 3 there, 2 here\)"):
        _fit(tmp_path / "rest", 2, 0, ckpt=tmp_path / "cut" / "last.ckpt", batch_size=2)


def test_an_epoch_end_checkpoint_continued_with_other_batches_is_named(tmp_path):
    _fit(tmp_path / "cut", None, 0, cut=4)  # the checkpoint at the end of epoch 0
    assert torch.load(tmp_path / "cut" / "last.ckpt", weights_only=False)["_Data"]["train_epochs"] == {
        "images": N, "batch_size": BATCH, "processes": 1}
    with pytest.warns(UserWarning, match=r"epochs made of other batches than the checkpoint's: global batch size 3 there, 2 here"):
        seen = _fit(tmp_path / "rest", None, 0, ckpt=tmp_path / "cut" / "last.ckpt", batch_size=2)
    assert len(seen) == (EPOCHS - 1) * N // 2


def test_a_method_drawing_its_own_order_sets_seed_and_epoch_of_every_pass():
    data = _Data()
    data.setup()
    passes = iter([(7, 0), (7, 1), (8, 0)])
    data.train_order = lambda: next(passes)
    loader = data.train_dataloader()
    assert isinstance(loader, ResumableLoader)
    orders = [[int(i) for b in loader for i in b["x"]] for _ in range(3)]
    sampler = loader.sampler

    def drawn(seed: int, epoch: int) -> list[int]:
        return torch.randperm(N, generator=torch.Generator().manual_seed(seed + epoch)).tolist()

    assert orders == [drawn(7, 0), drawn(7, 1), drawn(8, 0)]
    assert (sampler.seed, sampler.epoch) == (8, 0)
    # Lightning sets the sampler's epoch (its own count) after the iterator is made and before the
    # first batch is drawn: the pass still follows the plan
    passes = iter([(9, 1)])
    it = iter(loader)
    sampler.set_epoch(5)
    assert [int(i) for b in it for i in b["x"]] == drawn(9, 1)
    # a checkpoint mid-pass leaves out the batches trained, in the method's order too
    data.load_state_dict({"train_position": [5, 1]})
    passes = iter([(9, 1)])
    assert [int(i) for b in loader for i in b["x"]] == drawn(9, 1)[loader.batch_size:]


def test_a_resumed_ddp_fit_trains_each_rank_on_its_uninterrupted_batches(tmp_path):
    # two processes, each with a worker; the distributed sampler splits the epoch (two batches a
    # rank); the whole run keeps a checkpoint of every step, and the one after step 3, in the middle
    # of epoch 1, is what a crash there would leave
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import REPO

    def fit(out, *args):  # both ranks started by torchrun
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
        proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                               "-m", "tests.data.ddp_order", str(out), *map(str, args)],
                              capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
        assert proc.returncode == 0, proc.stderr[-3000:]
        return [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]

    whole = fit(tmp_path / "whole")
    rest = fit(tmp_path / "rest", tmp_path / "whole" / "step=3.ckpt")
    assert [len(w) for w in whole] == [EPOCHS * N // BATCH // 2] * 2
    assert sorted(i for w in whole for b in w[:2] for i in b) == list(range(N))  # the ranks split epoch 0
    for r in (0, 1):
        assert rest[r] == whole[r][3:], r


def test_a_training_set_that_does_not_divide_among_the_processes_is_warned_of(tiny_backbone):
    from types import SimpleNamespace

    from vlweak.data import ShapesWorldDataModule

    dm = ShapesWorldDataModule(n_train=13, n_val=0, n_test=0, image_size=32, transform=tiny_backbone.transform)
    dm.setup("fit")
    dm.trainer = SimpleNamespace(world_size=2)
    with pytest.warns(UserWarning, match=r"the training set's 13 samples do not divide among 2 processes: the distributed "
                                         r"sampler repeats 1 of them in every epoch"):
        dm.train_dataloader()
    dm.trainer = SimpleNamespace(world_size=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dm.train_dataloader()


def test_the_same_global_batch_on_other_processes_continues_without_a_word():
    # 2 processes of 4 step through the batches of 1 process of 8 (the ranks' shards interleave)
    from types import SimpleNamespace

    data = _Data()
    data.setup()
    data.trainer = SimpleNamespace(world_size=2)
    data._resume_epochs = {"images": N, "batch_size": data.batch_size * 2, "processes": 1}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        data._check_epochs_as_checkpointed(2)
    # a shard the sampler pads (an odd number of images) steps through other batches: refused mid-epoch
    data._resume_epochs = {"images": N - 1, "batch_size": data.batch_size * 2, "processes": 1}
    data.datasets["train"] = torch.utils.data.Subset(data.datasets["train"], range(N - 1))
    with pytest.raises(ValueError, match=r"other batches \(processes 1 there, 2 here\)"):
        data._check_epochs_as_checkpointed(2)
