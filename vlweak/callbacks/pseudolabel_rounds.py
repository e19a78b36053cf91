"""Pseudolabeling rounds of iterative prompt tuning (FPL, IFPL, GRIP) as a Lightning callback.

One ``trainer.fit`` runs every round: round ``r`` trains the prompt from scratch for
``epochs_per_round`` epochs on the labeled samples plus the round's pseudolabels; when it ends, the
trained prompt scores the unlabeled pool and :func:`~vlweak.labels.selection.top_k_per_class`
picks the next round's pseudolabels (``K`` from :func:`~vlweak.labels.selection.k_schedule`).

Every round is checkpointed when its pseudolabels are ready: ``<dirpath>/round-<r>.safetensors``
holds the round index, the prompt that produced the pseudolabels and the training set (sample
indices, labels, which are pseudolabels), written atomically; ``pseudolabels-round-<r>.safetensors``
holds the scores as a :class:`~vlweak.labels.artifact.PseudoLabels` artifact. A run started with the
same ``dirpath`` resumes at the round it was in: finished rounds are not redone and the round's
pseudolabels are read back, not recomputed (the interrupted round's training restarts; it starts
from scratch anyway). The trained prompt is also written as soon as a round's training ends, before
the pool is scored, so a crash while scoring resumes by scoring again, not by training again.
``round-final.safetensors`` marks a finished run (a rerun only restores its prompt).

A Lightning checkpoint of the fit (``--ckpt_path``) continues exactly where it was written: every
checkpoint records the round, the epoch in it and whether that epoch's end (the pseudolabels, at a
round's end) is still to do; the data module records the batches of the epoch already trained. The
round's training set is read back from the rounds folder, the prompt, the optimizer and the round's
best held-out prompt from the checkpoint, so a run resumed from any step ends with the prompt an
uninterrupted run ends with.

Under DDP every rank scans and scores the pool itself (which builds the same module state on each),
but every rank trains on rank 0's choice of pseudolabels; the distributed sampler splits the round's
training set. Rank 0 alone reads the rounds folder at a fit's start and writes the round files; a fit
resumed from a Lightning checkpoint reads its round's file on every rank, so ``dirpath`` must be on a
shared file system.

The module drives the work; it provides (see :class:`vlweak.methods.PromptTuning`): ``strategy``,
``k``, ``rounds``, ``epochs_per_round``, ``pseudolabel_classes``, ``setup_pool(trainer)``,
``pool_index`` / ``pool_label`` (``-1`` = unlabeled), ``score_unlabeled(source)``,
``unlabeled_sample_ids()``, ``use_training_set(index, label, r)``, ``release_pool()``,
``seed`` (round ``r``'s data order is drawn from ``seed + r`` and the epoch in the round), ``start_round(r)``,
``set_round_epoch(e)``, ``prompt_state()`` / ``load_prompt_state(state)``, and optionally
``track_best_prompt()`` (after each epoch) / ``restore_best_prompt()`` (at a round's end), which
choose a round's prompt on held-out labels.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from safetensors import safe_open
from torch import Tensor

from vlweak.data.cache import atomic_save_tensors, cache_key
from vlweak.data.order import trained_position
from vlweak.distributed import rank_zero_first
from vlweak.labels.artifact import PseudoLabels
from vlweak.labels.selection import k_schedule, top_k_per_class

STATE_FORMAT = "vlweak-pseudolabel-round/1"


def _content_digest(dm: Any) -> str:
    """A digest of what the train split's images are, as the embedding cache keys them (for files:
    their sizes, times and inodes): images rewritten under the same names make another run."""
    from vlweak.data.budget import Budgeted

    raw = dm.raw("train") if dm is not None and hasattr(dm, "raw") else None
    raw = raw.dataset if isinstance(raw, Budgeted) else raw  # a label budget's view of the images
    return cache_key(data=raw.fingerprint_parts())[:16] if hasattr(raw, "fingerprint_parts") else ""


def _source_identity(source: Any) -> str:
    """The pseudolabel source as part of a run's identity: its name, or a file's path, size and mtime."""
    text = str(source)
    path = Path(text)
    if text != "zeroshot" and path.is_file():
        stat = path.stat()
        return f"{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
    return text


@dataclass
class RoundState:
    """What a round checkpoint holds.

    Attributes:
        round: the round these pseudolabels train (``== len(schedule)`` once the run is done).
        train_index: dataset indices of the round's training set.
        train_label: their labels (true labels and pseudolabels).
        pseudo: which of them are pseudolabels.
        prompt: the prompt that produced the pseudolabels (empty for the source pseudolabels).
        meta: run identity (strategy, schedule, class vocabulary, pool size) and round details.
    """

    round: int
    train_index: Tensor
    train_label: Tensor
    pseudo: Tensor
    prompt: dict[str, Tensor] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def save(self, path: Path) -> Path:
        tensors = {
            "train_index": self.train_index.long(),
            "train_label": self.train_label.long(),
            "pseudo": self.pseudo.to(torch.uint8),
        }
        tensors.update({f"prompt.{k}": v.detach().float() for k, v in self.prompt.items()})
        meta = {"format": STATE_FORMAT, "round": str(self.round), "meta": json.dumps(self.meta, default=str)}
        atomic_save_tensors(tensors, path, meta)
        return path

    @classmethod
    def load(cls, path: Path) -> "RoundState":
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if meta.get("format") != STATE_FORMAT:
            raise ValueError(f"{path} is not a pseudolabel round checkpoint (format {meta.get('format')!r})")
        return cls(
            round=int(meta["round"]),
            train_index=tensors["train_index"],
            train_label=tensors["train_label"],
            pseudo=tensors["pseudo"].bool(),
            prompt={k[len("prompt.") :]: v for k, v in tensors.items() if k.startswith("prompt.")},
            meta=json.loads(meta["meta"]),
        )


class PseudolabelRounds(L.Callback):
    """Runs the pseudolabeling rounds of :class:`~vlweak.methods.PromptTuning` inside one fit.

    Sets the trainer's ``max_epochs`` to the epochs the remaining rounds need and reloads the
    train loader at each round (the training set changes).

    Args:
        dirpath: folder of the round checkpoints (default: a folder per run identity under
            ``<logger save_dir>/<logger name>/rounds/``, see :meth:`folder`).
        resume: resume from the latest round checkpoint in ``dirpath`` when there is one.
    """

    def __init__(self, dirpath: str | os.PathLike | None = None, resume: bool = True) -> None:
        self.dirpath = Path(dirpath) if dirpath else None
        self.resume = resume
        self.round = 0
        self.epoch_in_round = 0
        self.pool_digest = ""  # of the pool's sample ids, set when the pool is (each fit)
        self.schedule: list[int] = []
        self.rounds_trained: list[int] = []
        self.history: list[dict[str, float]] = []
        self.pseudolabeling = False  # an epoch's end is choosing the next round's pseudolabels
        self._started: tuple[int, int] | None = None  # (round, epoch in it) whose start has been done
        self._open = False  # a batch of the current epoch is trained and the epoch's end not done
        self._settled: tuple[int, int] | None = None  # (round, epoch in it) whose prompt is settled
        self._folder: Path | None = None  # this fit's rounds folder
        self._restored: dict[str, Any] | None = None  # the state a Lightning checkpoint gave back
        self._trainer: L.Trainer | None = None
        self._ended_restored_epoch = False
        self._log_step: int | None = None  # the step to log at instead of Lightning's (see _log)

    # ---------------------------------------------------------------- files
    def folder(self, trainer: L.Trainer, identity: dict[str, Any] | None = None) -> Path:
        """``dirpath``, or by default ``<logger save_dir>/<logger name>/rounds/<run identity hash>``:
        a stable folder (not the per-version log folder), so rerunning the same configuration resumes
        it and any other configuration starts in a folder of its own."""
        if self.dirpath is None:
            logger = trainer.logger
            if logger is not None and getattr(logger, "save_dir", None):
                base = Path(logger.save_dir) / str(getattr(logger, "name", "") or "")
            else:
                base = Path(trainer.default_root_dir)
            key = hashlib.sha1(json.dumps(identity or {}, sort_keys=True, default=str).encode()).hexdigest()[:12]
            self.dirpath = base / "rounds" / key
        return self.dirpath

    @staticmethod
    def clear(folder: Path) -> None:
        """Remove the round files of an earlier run from ``folder`` (a fresh start)."""
        for path in list(folder.glob("round-*.safetensors")) + list(folder.glob("pseudolabels-round-*.safetensors")):
            path.unlink()

    @staticmethod
    def round_path(folder: Path, r: int | str) -> Path:
        return folder / (f"round-{r:03d}.safetensors" if isinstance(r, int) else f"round-{r}.safetensors")

    def latest(self, folder: Path) -> RoundState | None:
        final = self.round_path(folder, "final")
        if final.is_file():
            return RoundState.load(final)
        found = sorted(folder.glob("round-[0-9][0-9][0-9].safetensors"))
        return RoundState.load(found[-1]) if found else None

    # ---------------------------------------------------------------- identity of a run
    def identity(self, m: Any) -> dict[str, Any]:
        """What makes two runs the same run: resuming is allowed only when all of it matches."""
        labeled = m.pool_label >= 0
        digest = hashlib.sha1()
        digest.update(m.pool_index[labeled].long().numpy().tobytes())
        digest.update(m.pool_label[labeled].long().numpy().tobytes())
        return {
            "strategy": m.strategy,
            "schedule": self.schedule,
            "classnames": list(m.classnames),
            "pseudolabel_classes": list(m.pseudolabel_classes),
            "n_pool": int(len(m.pool_index)),
            "pool_samples": self.pool_digest,  # the data itself: another folder is another run
            "pool_content": getattr(self, "pool_content", ""),  # ... and so are its images rewritten in place
            "n_labeled": int(labeled.sum()),
            "labeled_set": digest.hexdigest()[:16],
            "prompt": m.prompt_type,
            "source": _source_identity(getattr(m, "pseudolabels", "zeroshot")),
            "training": getattr(m, "round_hyperparameters", dict)(),
            "batches": self._batches(m),
        }

    @staticmethod
    def _batches(m: Any) -> dict[str, Any]:
        """How the rounds' steps are cut: the global batch (the per-process batch size times the
        processes: 2 x 32 steps as 1 x 64 does), precision and gradient accumulation (another global
        batch trains other prompts from the same pseudolabels)."""
        trainer = m._trainer
        if trainer is None:
            return {}
        per_process = getattr(getattr(m, "datamodule", None), "batch_size", None)
        return {
            "global_batch_size": None if per_process is None else int(per_process) * int(trainer.world_size),
            "precision": str(trainer.precision),
            "accumulate_grad_batches": int(trainer.accumulate_grad_batches),
        }

    def check_identity(self, state: RoundState, m: Any, folder: Path) -> None:
        want = json.loads(json.dumps(self.identity(m), default=str))  # as stored
        got = {k: state.meta.get(k) for k in want}
        diff = [k for k in want if got[k] != want[k]]
        if diff:
            detail = ", ".join(f"{k}: {got[k]!r} != {want[k]!r}" for k in diff[:3])
            raise ValueError(
                f"round checkpoints in {folder} were written by a different run ({detail}); "
                "give another rounds_dir or set resume: false"
            )

    # ---------------------------------------------------------------- selection
    def select(self, m: Any, scores: Tensor, r: int) -> RoundState:
        """The training set of round ``r``: the labeled samples plus the top-K pseudolabels."""
        unl = (m.pool_label < 0).nonzero().flatten()
        pos, lab = top_k_per_class(scores, self.schedule[r], m.pseudolabel_classes)
        labeled = (m.pool_label >= 0).nonzero().flatten()
        index = torch.cat([m.pool_index[labeled], m.pool_index[unl[pos]]])
        label = torch.cat([m.pool_label[labeled], lab])
        pseudo = torch.cat([torch.zeros(len(labeled), dtype=torch.bool), torch.ones(len(pos), dtype=torch.bool)])
        if len(index) == 0:
            raise ValueError(
                f"round {r + 1}'s training set is empty: no labeled image and k={self.schedule[r]} pseudolabels per "
                "class; give k >= 1 (model.init_args.k) or labels (data.init_args.shots)"
            )
        order = torch.argsort(index)
        meta = dict(self.identity(m), k=self.schedule[r], n_pseudo=int(len(pos)))
        truth = m.pool_truth
        if truth is not None and len(pos):
            meta["pseudolabel_acc"] = float((truth[unl[pos]] == lab).float().mean())
        return RoundState(r, index[order], label[order], pseudo[order], m.prompt_state() if r else {}, meta)

    def _save(self, trainer: L.Trainer, m: Any, state: RoundState, scores: Tensor | None, name: int | str) -> None:
        if trainer.global_rank != 0:
            return
        folder = self.folder(trainer)
        if scores is not None and len(scores):  # no unlabeled pool (labels only): no pseudolabels to keep
            PseudoLabels.from_scores(
                scores,
                list(m.classnames),
                m.unlabeled_sample_ids(),
                m.pool_index[m.pool_label < 0],
                provenance=dict(m.provenance(), stage=f"round-{state.round}", k=state.meta.get("k")),
            ).save(folder / f"pseudolabels-round-{state.round:03d}.safetensors")
        state.save(self.round_path(folder, name))

    def _record(self, trainer: L.Trainer, state: RoundState) -> None:
        info = {"round": float(state.round), "n_pseudo": float(state.meta.get("n_pseudo", 0))}
        if "pseudolabel_acc" in state.meta:
            info["pseudolabel_acc"] = state.meta["pseudolabel_acc"]
        self.history.append(info)
        self._log(trainer, {f"rounds/{k}": v for k, v in info.items()})

    def _log(self, trainer: L.Trainer, metrics: dict[str, float]) -> None:
        """Log at the trained step: Lightning's, or while a resumed fit does the epoch end its checkpoint
        left pending (before Lightning restores its step), the checkpoint's."""
        if trainer.logger is not None and trainer.global_rank == 0:
            step = trainer.global_step if self._log_step is None else self._log_step
            trainer.logger.log_metrics(metrics, step=step)

    # ---------------------------------------------------------------- hooks
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._trainer = trainer

    def state_dict(self) -> dict[str, Any]:
        """Where the rounds stand, written into every Lightning checkpoint of the fit."""
        trainer = self._trainer
        if trainer is None or trainer.state.fn != "fit" or not self.schedule:
            return {}
        done = trained_position(trainer)[1]
        return {
            "round": self.round,
            "epoch_in_round": self.epoch_in_round,
            "started": list(self._started) if self._started is not None else None,
            # the last batch of an epoch is trained and the epoch's end not done yet (a checkpoint
            # written after that batch): the resumed fit does it, Lightning will not
            "end_pending": done == 0 and self._open,
            "pseudolabeling": self.pseudolabeling,
            "history": list(self.history),
            "step": trainer.global_step,
            "folder": str(self._folder) if self._folder is not None else None,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self._restored = dict(state)

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        m = pl_module
        m.setup_pool(trainer)
        self.pool_digest = hashlib.sha1("\n".join(m.sample_ids("train", m.pool_index)).encode()).hexdigest()[:16]
        self.pool_content = _content_digest(getattr(trainer, "datamodule", None))
        n_unlabeled = int((m.pool_label < 0).sum())
        self.schedule = k_schedule(m.strategy, n_unlabeled, len(m.pseudolabel_classes), m.k, m.rounds)
        folder = self._folder = self.folder(trainer, self.identity(m))
        restored, self._restored = self._restored, None
        self._started, self._open, self.pseudolabeling, self._ended_restored_epoch = None, False, False, False
        self._settled = None
        resuming_ckpt = getattr(trainer, "ckpt_path", None) is not None
        if resuming_ckpt and restored:
            state = self._from_checkpoint(trainer, m, folder, restored)
        else:
            if resuming_ckpt:
                rank_zero_warn(
                    "the checkpoint holds no pseudolabel round position (written by an older vlweak, or restored "
                    "after this callback starts under this strategy): the round it was in restarts from its first epoch"
                )
            state = self._from_folder(trainer, m, folder)
            self.round, self.epoch_in_round = state.round, 0
        asked = trainer.fit_loop.max_epochs
        if asked not in (None, -1, 1000):  # 1000: Lightning's value when unset
            trains, option = m.epochs_hint() if hasattr(m, "epochs_hint") else (
                f"{len(self.schedule)} round(s) of epochs_per_round={m.epochs_per_round} epochs",
                "model.init_args.rounds / epochs_per_round",
            )
            rank_zero_warn(f"trainer.max_epochs={asked} is not used: {type(m).__name__} trains {trains}; set {option} instead")
        # The epochs the remaining rounds need. A Lightning checkpoint given as ``ckpt_path`` restores
        # ``current_epoch`` only after this hook, so the budget is set again in ``on_train_start``;
        # until then it must not look spent (the fit loop would skip training altogether).
        trainer.fit_loop.max_epochs = -1 if resuming_ckpt else trainer.current_epoch + self._epochs_left(m)
        trainer.reload_dataloaders_every_n_epochs = m.epochs_per_round
        # the data order follows (seed, round, epoch in round), not Lightning's epoch count, which a
        # resumed run restarts; the loader draws it whenever an epoch's iterator is made (Lightning
        # makes the first one before any epoch hook runs)
        m.datamodule.train_order = self.order(m)
        if self.round < len(self.schedule):
            m.use_training_set(state.train_index, state.train_label, state.round)
            if restored and restored.get("end_pending"):
                self._log_step = restored.get("step")
                try:
                    self._end_epoch(trainer, m)
                finally:
                    self._log_step = None
                self._ended_restored_epoch = True

    def _from_folder(self, trainer: L.Trainer, m: Any, folder: Path) -> RoundState:
        """The round to train next: the rounds folder's latest (with ``resume``), else round 0.

        Rank 0 reads the folder and every rank takes its answer (a collective under DDP): a rank that
        looked later would find the round 0 that rank 0 has just written and skip choosing it, and the
        ranks' modules would differ (the zero-shot classifier is built while choosing it)."""
        def look() -> RoundState | None:
            found = self.latest(folder) if self.resume and folder.is_dir() else None
            if found is None and folder.is_dir():
                self.clear(folder)  # resume: false, or nothing to resume: no stale round may be read later
            return found

        state = rank_zero_first(trainer.strategy, look, share=True)
        if state is None:
            return self._pseudolabel(trainer, m, 0)
        self.check_identity(state, m, folder)
        total = len(self.schedule)
        rank_zero_info(
            f"{f'all {total} rounds of this run are' if total > 1 else 'this run is'} done in {folder}: nothing to "
            "train (resume: false starts over)"
            if state.round >= total else
            f"resuming round {state.round + 1} of {total} from {folder} (rounds done: {state.round})"
        )
        if state.prompt:
            m.load_prompt_state(state.prompt)
        if state.meta.get("scored") is False:  # trained, interrupted while scoring: score again
            state = self._pseudolabel(trainer, m, state.round)
        return state

    def _from_checkpoint(self, trainer: L.Trainer, m: Any, folder: Path, restored: dict[str, Any]) -> RoundState:
        """The round a Lightning checkpoint stopped in, continued where it stopped: its training set
        from the rounds folder; the prompt, optimizer and data position are the checkpoint's."""
        if restored.get("pseudolabeling"):
            raise ValueError(
                "this checkpoint was written while a round's pseudolabels were being chosen; run the same "
                f"`vlweak fit` without --ckpt_path: it resumes at that round from {folder}"
            )
        r, total = int(restored["round"]), len(self.schedule)
        self.round, self.epoch_in_round = r, int(restored["epoch_in_round"])
        self._started = tuple(restored["started"]) if restored.get("started") is not None else None
        self._open = bool(restored.get("end_pending"))
        self.history = list(restored.get("history", []))
        empty = torch.empty(0, dtype=torch.long)
        if r >= total:
            trained = f"all {total} of its rounds are trained" if total > 1 else "its epochs are trained"
            rank_zero_warn(f"the checkpoint is of a finished fit: {trained}, so this fit trains nothing; to train "
                           "longer (more epochs or rounds), run `vlweak fit` without --ckpt_path")
            dm = getattr(trainer, "datamodule", None)
            if hasattr(dm, "no_epochs_follow"):
                dm.no_epochs_follow()  # the last round's set is not the pool, and no epoch follows
            return RoundState(r, empty, empty, empty.bool())
        path = self.round_path(folder, r)
        state = RoundState.load(path) if path.is_file() else None
        written = restored.get("folder")
        if state is None and written and getattr(m, "rounds_dir", None) is None and Path(written) != folder and Path(written).is_dir():
            raise ValueError(
                f"the checkpoint's rounds are in {written}, and this run's settings key another folder ({folder}): "
                "a setting the rounds depend on differs from the checkpoint's fit (the global batch, precision, "
                "pseudolabel source, data, ...); `--model.init_args.rounds_dir` "
                f"{written} names the differences"
            )
        if state is None or state.meta.get("scored") is False:
            raise ValueError(
                f"the checkpoint stopped in round {r + 1} of {total}, whose training set {path} is "
                f"{'missing' if state is None else 'not chosen yet'}: give the rounds_dir the fit used, or run "
                "`vlweak fit` without --ckpt_path to resume from the rounds folder"
            )
        self.check_identity(state, m, folder)
        rank_zero_info(f"continuing round {r + 1} of {total} at its epoch {self.epoch_in_round + 1} from the checkpoint")
        return state

    def _epochs_left(self, m: Any) -> int:
        """Epochs still to train, counting the current one when it has started."""
        return max(0, (len(self.schedule) - self.round) * m.epochs_per_round - self.epoch_in_round)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        m = pl_module
        trainer.fit_loop.max_epochs = trainer.current_epoch + self._epochs_left(m)
        # the train set changes at each round's end: Lightning reloads the loader every
        # epochs_per_round epochs counted from its first load, which a fit resumed in the middle of
        # a round made at another epoch than the round's first
        fit_loop = trainer.fit_loop
        if hasattr(fit_loop, "_last_train_dl_reload_epoch"):
            fit_loop._last_train_dl_reload_epoch = trainer.current_epoch - self.epoch_in_round
        elif self.epoch_in_round:
            trainer.reload_dataloaders_every_n_epochs = 1
        if self._ended_restored_epoch:
            self._ended_restored_epoch = False
            _lightning_epoch_over(trainer)
        # Lightning does not start an epoch it resumes (nor the one after an epoch whose last batch
        # a checkpoint followed): start it here when it is not started yet
        self._start_epoch(m)

    def _start_epoch(self, m: Any) -> None:
        key = (self.round, self.epoch_in_round)
        if self._started == key or self.round >= len(self.schedule):
            return
        if self.epoch_in_round == 0:
            m.start_round(self.round)
            self.rounds_trained.append(self.round)
        m.set_round_epoch(self.epoch_in_round)
        self._started = key

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._start_epoch(pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._open = True

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # the validation after an epoch's last batch scores the prompt the epoch leaves: at a round's
        # end that is the round's best held-out prompt, which the fit keeps (not the last epoch's)
        if trainer.state.fn == "fit" and not trainer.sanity_checking and trainer.is_last_batch:
            self._settle_epoch(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end_epoch(trainer, pl_module)

    def _settle_epoch(self, trainer: L.Trainer, m: Any) -> None:
        """An epoch is trained: keep the round's best prompt so far; at the round's end go back to it
        (once an epoch, before its validation when it has one)."""
        key = (self.round, self.epoch_in_round)
        if self._settled == key:
            return
        self._settled = key
        held = m.track_best_prompt() if hasattr(m, "track_best_prompt") else None
        if held is not None:
            self._log(trainer, {"rounds/held_out_acc": held})
        if self.epoch_in_round + 1 >= m.epochs_per_round and hasattr(m, "restore_best_prompt"):
            m.restore_best_prompt()  # the round's prompt: its best epoch on the held-out labels

    def _end_epoch(self, trainer: L.Trainer, m: Any) -> None:
        """An epoch is trained: settle its prompt; at the round's end choose the next round's
        pseudolabels (or finish)."""
        self.pseudolabeling = True
        self._settle_epoch(trainer, m)
        self.epoch_in_round += 1
        if self.epoch_in_round >= m.epochs_per_round:
            self.round, self.epoch_in_round = self.round + 1, 0
            if self.round < len(self.schedule):
                # the trained prompt is kept before the (long) scoring of the pool, so a crash there
                # resumes by scoring again rather than by training the round again
                self._save(trainer, m, self._prompt_only(m, self.round, scored=False), None, self.round)
                state = self._pseudolabel(trainer, m, self.round)
                m.use_training_set(state.train_index, state.train_label, state.round)
            else:
                self._save(trainer, m, self._prompt_only(m, self.round, done=True), None, "final")
        self._open = self.pseudolabeling = False

    def _pseudolabel(self, trainer: L.Trainer, m: Any, r: int) -> RoundState:
        """Score the pool (round 0: with the pseudolabel source, later: with the current prompt),
        select round ``r``'s training set, checkpoint and record it."""
        scores = m.score_unlabeled(source=r == 0)  # on every rank: it builds what the scoring needs
        state = self.select(m, scores, r)
        if trainer.world_size > 1:  # every rank trains on rank 0's choice, even where scores differ in the last bit
            index, label, pseudo = trainer.strategy.broadcast((state.train_index, state.train_label, state.pseudo), src=0)
            state = replace(state, train_index=index, train_label=label, pseudo=pseudo)
        self._save(trainer, m, state, scores, r)
        self._record(trainer, state)
        return state

    def order(self, m: Any) -> Callable[[], tuple[int, int]]:
        """``() -> (seed, epoch)`` of the next pass: the method's seed plus the round, and the epoch
        within the round."""
        return lambda: (m.seed + self.round, self.epoch_in_round)

    def _prompt_only(self, m: Any, r: int, **meta: Any) -> RoundState:
        """A round checkpoint holding the trained prompt and no training set."""
        empty = torch.empty(0, dtype=torch.long)
        return RoundState(r, empty, empty, empty.bool(), m.prompt_state(), dict(self.identity(m), **meta))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        pl_module.release_pool()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if hasattr(pl_module, "release_pool"):
            pl_module.release_pool()


def _lightning_epoch_over(trainer: L.Trainer) -> None:
    """A checkpoint written after an epoch's last batch: Lightning counts that epoch as over only
    when the batches it trained reach the train loader's length, and the resumed loader serves the
    next round's training set, which may be longer. Give Lightning the count it looks for."""
    loop = trainer.fit_loop.epoch_loop
    try:
        current, batches = loop.batch_progress.current, trainer.num_training_batches
        if loop.restarted_on_train_batch_end and current.completed + 1 < batches:
            current.completed = int(batches) - 1  # Lightning adds the batch it restarts after
    except AttributeError as err:  # another Lightning: refuse rather than train a wrong epoch
        raise RuntimeError(
            "this Lightning version cannot resume pseudolabel rounds from a checkpoint written after an "
            "epoch's last batch; resume from an epoch-end checkpoint, or without --ckpt_path"
        ) from err
