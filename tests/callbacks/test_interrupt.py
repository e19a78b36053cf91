"""A fit stopped by Ctrl-C or an error leaves a checkpoint at the step it stopped, and
``--ckpt_path last`` continues from it to what an uninterrupted fit gives."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from tests.conftest import PowerCut
from tests.methods.test_dualcoop import _cli
from vlweak.callbacks import CheckpointOnInterrupt


def _fit(tmp_path, weights, *extra):
    # DualCoOp's recipe, tiny: 48 scenes in batches of 16, 3 steps an epoch, 2 epochs, the recipe's
    # checkpoint at each epoch's end only
    return _cli("fit", "shapes_partial.yaml", tmp_path, weights, "--trainer.max_epochs=2", "--trainer.limit_train_batches=1.0",
                "--trainer.limit_val_batches=0", "--data.init_args.n_train=48", "--trainer.log_every_n_steps=1", *extra)


@pytest.mark.parametrize("error", [False, True], ids=["ctrl-c", "error"])
def test_a_fit_stopped_mid_epoch_continues_from_the_step_it_stopped_at(tmp_path, tiny_ckpt, error):
    whole = _fit(tmp_path / "whole", tiny_ckpt)
    cut = f"--trainer.callbacks+={{'class_path': 'tests.conftest.PowerCut', 'init_args': {{'error': {error}}}}}"
    with pytest.raises(SystemExit if not error else RuntimeError, match=None if not error else "disk full"):
        _fit(tmp_path / "cut", tiny_ckpt, cut)
    saved = list((tmp_path / "cut").rglob("last-interrupted.ckpt"))
    assert len(saved) == 1
    ckpt = torch.load(saved[0], weights_only=False)
    # four steps trained: all of epoch 0 and the first batch of epoch 1
    assert ckpt["global_step"] == 4 and ckpt["ShapesWorldDataModule"]["train_position"] == [1, 1]
    if error:  # an evaluation of the newest checkpoint says it is of an unfinished fit
        with pytest.warns(UserWarning, match=r"last-interrupted.ckpt, written when a fit stopped: its training is not finished"):
            _cli("test", "shapes_partial.yaml", tmp_path / "cut", tiny_ckpt, "--ckpt_path=last")
    resumed = _fit(tmp_path / "cut", tiny_ckpt, "--ckpt_path=last")
    assert resumed.trainer.global_step == whole.trainer.global_step == 6
    for (name, a), (_, b) in zip(whole.model.prompts.named_parameters(), resumed.model.prompts.named_parameters()):
        torch.testing.assert_close(b, a, msg=name)
    # the resumed run logs its steps under the uninterrupted run's numbers
    assert _logged_losses(resumed) == {k: v for k, v in _logged_losses(whole).items() if k >= 4}
    # and so does one continued from an epoch's end (last.ckpt of epoch 0)
    (tmp_path / "cut" / "epoch-end").mkdir()
    epoch_end = saved[0].parent / "last.ckpt"
    assert torch.load(epoch_end, weights_only=False)["global_step"] == 3
    from_epoch_end = _fit(tmp_path / "cut" / "epoch-end", tiny_ckpt, f"--ckpt_path={epoch_end}")
    assert _logged_losses(from_epoch_end) == {k: v for k, v in _logged_losses(whole).items() if k >= 3}


def _logged_losses(cli) -> dict[int, float]:
    rows = csv.DictReader(open(Path(cli.trainer.log_dir) / "metrics.csv"))
    return {int(r["step"]): round(float(r["train/loss"]), 5) for r in rows if r.get("train/loss")}


def test_nothing_is_written_before_the_first_step_or_for_a_bad_name(tmp_path, tiny_ckpt):
    cut = "--trainer.callbacks+={'class_path': 'tests.conftest.PowerCut', 'init_args': {'at_step': 0, 'error': true}}"
    with pytest.raises(RuntimeError, match="disk full"):
        _fit(tmp_path, tiny_ckpt, cut)
    assert not list(tmp_path.rglob("last-interrupted.ckpt"))
    with pytest.raises(ValueError, match="must start with 'last'"):
        CheckpointOnInterrupt("interrupted")


def test_a_fit_in_pseudolabel_rounds_continues_from_the_step_it_stopped_at(tmp_path, monkeypatch):
    """Prompt tuning stopped in the middle of a round continues from that step to the uninterrupted
    prompt; stopped while choosing a round's pseudolabels, it writes nothing (its rounds folder
    resumes that round)."""
    from tests.methods.test_prompt_tuning import TINY_DATA, TINY_MODEL, _fit as fit_rounds, _recipe
    from vlweak.methods.prompt_tuning import PromptTuning

    # 2 epochs a round, 3 batches an epoch in round 0: step 4 is the second batch of its second epoch
    recipe = _recipe(tmp_path, dict(TINY_MODEL, epochs_per_round=2), dict(TINY_DATA, batch_size=16))
    whole = fit_rounds(recipe, f"--model.init_args.rounds_dir={tmp_path / 'whole'}")
    with pytest.raises(SystemExit):  # Lightning's answer to Ctrl-C
        fit_rounds(recipe, f"--model.init_args.rounds_dir={tmp_path / 'cut'}", "--trainer.enable_checkpointing=true",
                   callbacks=[CheckpointOnInterrupt(), PowerCut(at_step=4)])
    saved = list(tmp_path.rglob("last-interrupted.ckpt"))
    assert len(saved) == 1
    rounds = torch.load(saved[0], weights_only=False)["callbacks"]["PseudolabelRounds"]
    assert (rounds["round"], rounds["epoch_in_round"]) == (0, 1)
    resumed = fit_rounds(recipe, f"--model.init_args.rounds_dir={tmp_path / 'cut'}", ckpt_path=str(saved[0]))
    assert resumed.trainer.global_step == whole.trainer.global_step
    for (n, a), (_, b) in zip(whole.model.prompt_parameters(), resumed.model.prompt_parameters()):
        torch.testing.assert_close(b, a, msg=n)

    saved[0].unlink()
    original = PromptTuning.score_unlabeled
    monkeypatch.setattr(PromptTuning, "score_unlabeled",
                        lambda self, source: original(self, source) if source else (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(RuntimeError, match="disk full"):
        fit_rounds(recipe, f"--model.init_args.rounds_dir={tmp_path / 'scoring'}", "--trainer.enable_checkpointing=true",
                   callbacks=[CheckpointOnInterrupt()])
    assert not list(tmp_path.rglob("last-interrupted.ckpt"))
    assert (tmp_path / "scoring" / "round-001.safetensors").is_file()  # round 0's prompt, kept before scoring
