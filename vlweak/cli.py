"""The ``vlweak`` command: Lightning's CLI over every vlweak method and data module.

``vlweak fit|validate|test|predict --config recipes/<recipe>.yaml``; ``--print_config`` shows the
complete configuration; ``--ckpt_path last`` picks the newest ``last.ckpt`` of the recipe's runs;
``--model.help CLASS`` / ``--data.help CLASS`` list a class's arguments.
"""

from __future__ import annotations

import json
import os
import re
import sys
import traceback
import zipfile
from importlib.metadata import version
from pathlib import Path
from typing import Any

import lightning as L
import yaml
from jsonargparse import DefaultHelpFormatter
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI, SaveConfigCallback
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from packaging.version import Version

import vlweak.data  # noqa: F401  (registers the data modules for class-path resolution)
import vlweak.methods  # noqa: F401
import vlweak.methods.cdul_targets  # noqa: F401  (PseudoLabeledDataModule, by its short name too)
from vlweak.data.datamodule import VLDataModule
from vlweak.methods.base import has_training_step
from vlweak.noise import quiet_known_noise
from vlweak.progress import show_progress
from vlweak.runs import run_folder, runs_root, wandb_loggers


class HelpFormatter(DefaultHelpFormatter):
    """jsonargparse's help with long "known subclasses" lists cut short: an ``nn.Module`` option would
    otherwise list every module class imported (over a thousand lines under ``--model.help CDUL``)."""

    max_subclasses = 24  # longer lists show their first half of this

    def _get_help_string(self, action) -> str:
        text = super()._get_help_string(action)
        head, sep, tail = text.rpartition(", known subclasses: ")
        if not sep or not tail.endswith(")"):
            return text
        names = tail[:-1].split(", ")
        if len(names) <= self.max_subclasses:
            return text
        keep = self.max_subclasses // 2
        return f"{head}{sep}{', '.join(names[:keep])} and {len(names) - keep} more; any importable class path)"


_GIVEN_ARGS: list[str] = []  # the command line of the latest build_cli (for help texts)


_SHORT_USAGE = False


def plain_parse_error(message: str) -> str:
    """jsonargparse's error for a ``class_path`` key (``model``, ``data``, a backbone) lists every
    type the key accepts and why each refused the value; the class the recipe named is the one the
    user meant: its refusal alone, on one line (``Parser key "model" (vlweak.methods.ZLaP): Parser key
    "mode": Expected a typing.Literal[...]. Got value: foo``)."""
    lines = message.splitlines()
    for i, line in enumerate(lines):
        found = re.match(r"(\s*)- Problem with given class_path '([\w.]+)':\s*$", line)
        if not found:
            continue
        depth, block = len(found.group(1)), []
        for inner in lines[i + 1 :]:
            if inner.strip() and len(inner) - len(inner.lstrip()) <= depth:
                break
            block.append(inner.strip())
        if block:
            key = re.match(r'Parser key "([\w.]+)"', lines[0])
            where = f" (--{key.group(1)}.help {found.group(2)} lists its options)" if key else ""
            return f"{lines[0].rstrip().rstrip(':')} ({found.group(2)}): {' '.join(b for b in block if b)}{where}"
    return message


class ArgumentParser(LightningArgumentParser):
    """Lightning's parser with :class:`HelpFormatter`; jsonargparse builds the parsers of
    ``--model.help CLASS`` as ``type(parser)()``, so they get it too."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs) -> None:
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def format_help(self) -> str:
        return self._as_typed(super().format_help())

    def format_usage(self) -> str:
        usage = self._as_typed(super().format_usage())
        if _SHORT_USAGE and usage.count("\n") > 3:  # a refused argument: one line, not every option
            return f"usage: {self.prog.replace(' [options]', '')} [-h] [-c CONFIG] [--print_config] [--KEY=VALUE ...]\n"
        return usage

    def error(self, message: str, ex: Exception | None = None):
        """A refused argument: the usage line, where the full help is and the error itself, without
        jsonargparse's usage listing of every option above it, and for a method's or data module's
        option the refusal of that class alone (not of every type the key could hold)."""
        global _SHORT_USAGE
        _SHORT_USAGE = True
        try:
            super().error(plain_parse_error(message), ex)
        finally:
            _SHORT_USAGE = False

    def _as_typed(self, text: str) -> str:
        """Options of a nested class's help (``--model.init_args.backbone.help CLASS``) under the
        name the user gave, not relative to the inner parser (``--backbone.model_name``, which the
        command line does not accept)."""
        found = re.match(r"Help for --([\w.]+)\.help=", self.description or "")
        if not found:
            return text
        relative = found.group(1)
        typed = [a.split("=", 1)[0][2 : -len(".help")] for a in _GIVEN_ARGS if a.startswith("--") and a.split("=", 1)[0].endswith(".help")]
        typed = [t for t in typed if t == relative or t.endswith("." + relative)]
        if len(typed) != 1 or typed[0] == relative:
            return text
        return re.sub(rf"(?<![\w.-])--{re.escape(relative)}\.", f"--{typed[0]}.", text)


#: keep unset (None) entries in a saved config: ``skip_unset`` since jsonargparse 4.49, ``skip_none`` before
_KEEP_UNSET = {"skip_unset" if Version(version("jsonargparse")) >= Version("4.49") else "skip_none": False}


def dump_everything(parser: Any, config: Any) -> str:
    """The resolved configuration as YAML text, unset entries included and not validated again
    (``skip_validation``, or ``skip_check`` in the jsonargparse versions that named it so)."""
    import inspect

    from jsonargparse import ArgumentParser as _Parser

    params = inspect.signature(getattr(_Parser, "_unpatched_dump", _Parser.dump)).parameters
    skip = "skip_validation" if "skip_validation" in params else "skip_check"
    return parser.dump(config, **_KEEP_UNSET, **{skip: True})


class SaveRunConfig(SaveConfigCallback):
    """Lightning's ``config.yaml`` of the run, written into the run's own folder
    (:func:`vlweak.runs.run_folder`) instead of ``trainer.log_dir``, which for a W&B logger is the
    ``save_dir`` every run shares."""

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if not self.already_saved and self.save_to_log_dir:
            folder = run_folder(trainer)  # a collective under DDP
            if trainer.is_global_zero:
                folder.mkdir(parents=True, exist_ok=True)
                self.parser.save(self.config, str(folder / self.config_filename), overwrite=self.overwrite,
                                 multifile=self.multifile, **_KEEP_UNSET)
        to_log_dir, self.save_to_log_dir = self.save_to_log_dir, False
        try:
            super().setup(trainer, pl_module, stage)  # the save_config hook, and already_saved in sync
        finally:
            self.save_to_log_dir = to_log_dir

    def save_config(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        """The resolved configuration into every W&B logger's run config (``resolved_config``), for
        every subcommand: a sweep's runs can be filtered by any setting, not only the swept ones."""
        import yaml

        for logger in wandb_loggers(trainer):
            config = yaml.safe_load(dump_everything(self.parser, self.config))
            logger.experiment.config.update({"resolved_config": config}, allow_val_change=True)


def _is_lightning_checkpoint(path: Path) -> bool:
    """Whether ``path`` (a torch zip file) holds a Lightning checkpoint rather than, e.g., a model's
    plain ``state_dict`` saved with ``torch.save`` (read memory-mapped: the tensors stay on disk)."""
    import torch

    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=True)
    except Exception:  # noqa: BLE001 - unreadable here: Lightning's own load names the problem
        return True
    return isinstance(ckpt, dict) and "state_dict" in ckpt and "pytorch-lightning_version" in ckpt


def _check_launched_world(trainer: dict) -> None:
    """A command launched as several processes (torchrun) whose trainer asks for another number
    would run each process as a job of its own, every one scoring and writing everything: refused."""
    launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if launched <= 1 or "LOCAL_WORLD_SIZE" not in os.environ:  # not started by torchrun / torchelastic
        return
    devices, nodes = trainer.get("devices"), int(trainer.get("num_nodes") or 1)
    if isinstance(devices, (list, tuple)):
        count = len(devices)
    elif isinstance(devices, int) or (isinstance(devices, str) and devices.strip().isdigit()):
        count = int(devices)
    else:  # "auto" / -1: Lightning takes the launcher's
        return
    if count * nodes != launched:
        local = os.environ["LOCAL_WORLD_SIZE"]
        raise ValueError(
            f"this command was launched as {launched} processes ({local} on this node) but trainer.devices "
            f"{devices} x num_nodes {nodes} = {count * nodes}: every process would run the whole job on its own; "
            f"pass --trainer.devices={local} --trainer.num_nodes={launched // max(1, int(local))}"
        )


SUBCOMMAND_HELP = {
    "fit": "Train a method on the data module's train split (prompt tuning, CoOp, DualCoOp, CDUL, pretraining); "
           "training-free methods have nothing to fit: use test or predict.",
    "validate": "Score the val split: metrics, per-class values and figures.",
    "test": "Score the test split: metrics, per-class values, figures and the pseudolabel artifact.",
    "predict": "Pseudolabel the data module's predict_split: the pseudolabel artifact, and metrics where the split "
               "has labels.",
}

CKPT_PATH_HELP = {
    False: "the fit's checkpoint to evaluate: a .ckpt file written by `vlweak fit` (the model is built with its "
           "settings), or `last`: the newest last*.ckpt among this recipe's runs. Without it, a method that trains "
           "runs untrained (a warning says so)",
    True: "continue a stopped fit: a .ckpt file, or `last`: the newer of last.ckpt and last-interrupted.ckpt "
          "among this recipe's runs (pseudolabel rounds also resume without it, from their rounds folder)",
}


class VLWeakCLI(LightningCLI):
    """Links the data module's class vocabulary into the model; ``--ckpt_path last`` means the newest
    ``last.ckpt`` among the recipe's runs (see :func:`newest_last_checkpoint`)."""

    def _add_subcommands(self, parser, **kwargs: Any) -> None:
        super()._add_subcommands(parser, **kwargs)
        import argparse

        for action in parser._actions:  # the listing's one-line help: vlweak's words, not the Trainer's
            if isinstance(action, argparse._SubParsersAction):
                for choice in action._choices_actions:
                    choice.help = SUBCOMMAND_HELP.get(choice.dest, choice.help).split(":")[0].split(";")[0]

    def _prepare_subcommand_parser(self, klass: type, subcommand: str, **kwargs: Any):
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        parser.description = SUBCOMMAND_HELP.get(subcommand, parser.description)
        for action in parser._actions:  # Lightning's text describes its own "last" and "best", not vlweak's
            if action.dest == "ckpt_path":
                action.help = CKPT_PATH_HELP[subcommand == "fit"]
        return parser

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.classnames", "model.init_args.classnames", apply_on="instantiate")
        parser.link_arguments("data.multilabel", "model.init_args.multilabel", apply_on="instantiate")
        parser.add_argument(
            "--figures", type=bool, default=True,
            help="test / predict: draw the evaluation figures (per-class accuracy or AP, confusion matrix, "
            "reliability diagram, sample images) into <run dir>/figures and, with a W&B logger, into the run "
            "(vlweak.callbacks.EvaluationFigures with its defaults, unless trainer.callbacks has one); false: "
            "no figures, a configured EvaluationFigures removed too",
        )

    def parse_arguments(self, parser, args) -> None:
        """The class vocabulary is the data module's, linked into the model: a ``model.init_args.classnames``
        given in a recipe or on the command line would be replaced without a word, so it is refused."""
        super().parse_arguments(parser, args)
        config = self.config.get(self.config.get("subcommand")) or self.config
        model = config.get("model")
        given = getattr(model, "init_args", None)
        given = given.get("classnames") if given is not None and hasattr(given, "get") else None
        if given is not None:
            raise ValueError(
                f"model.init_args.classnames {given!r}: the class vocabulary is the data module's (its classnames "
                "are linked into the model), so this value would be replaced; give the names to the data module "
                "(--data.init_args.classnames of ImageFolderDataModule / ManifestDataModule, a {folder: name} map "
                "for image folders) and leave the model's unset"
            )

    def _add_figures(self) -> None:
        from vlweak.callbacks import EvaluationFigures

        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        callbacks = self.trainer.callbacks
        if not config.get("figures", True):
            callbacks[:] = [cb for cb in callbacks if not isinstance(cb, EvaluationFigures)]
        elif not any(isinstance(cb, EvaluationFigures) for cb in callbacks):
            callbacks.append(EvaluationFigures())

    def before_test(self) -> None:
        self._add_figures()

    def before_predict(self) -> None:
        self._add_figures()

    def before_instantiate_classes(self) -> None:
        """A run asking for GPUs on a machine without one is named before Lightning refuses it."""
        import torch

        config = self.config.get(self.subcommand, self.config) if self.subcommand else self.config
        trainer = config.get("trainer") or {}
        # the models are built before the trainer: their loading bars already follow its setting
        show_progress(trainer.get("enable_progress_bar") is not False)
        accelerator = str(trainer.get("accelerator") or "auto")
        strategy = trainer.get("strategy")
        name = str(getattr(strategy, "class_path", strategy))
        fsdp = name.startswith("fsdp") or name.split(".")[-1] == "FSDPStrategy"  # Lightning's own (CUDA only)
        gpus = torch.cuda.is_available()
        if fsdp and (accelerator == "cpu" or not gpus):
            raise ValueError(
                "FSDP (e.g. recipes/pretrain/fsdp.yaml) shards a model over GPUs and Lightning runs it on CUDA "
                f"only{'' if gpus else '; this machine has no GPU'}: on CPU processes use --trainer.strategy=ddp "
                "--trainer.accelerator=cpu"
            )
        if accelerator in ("gpu", "cuda") and not gpus:
            raise ValueError(f"this run asks for GPUs (trainer.accelerator: {accelerator}) and this machine has none: "
                             "pass --trainer.accelerator=cpu (or auto)")
        _check_launched_world(trainer)

    def instantiate_classes(self) -> None:
        try:
            super().instantiate_classes()
        except (ValueError, TypeError) as err:
            cause = constructor_error(err)
            if cause is None:
                raise
            raise cause from None  # its own traceback ends in the constructor that refused the value

    def _parse_ckpt_path(self) -> None:
        """A ``--ckpt_path`` file must be a Lightning checkpoint; Lightning then replaces the
        model's settings with the checkpoint's, and the ones that change are named."""
        sub = self.config.get("subcommand")
        ckpt = self.config[sub].get("ckpt_path") if sub else None
        if ckpt == "best" and sub in ("validate", "test", "predict"):
            raise ValueError("--ckpt_path best: a vlweak evaluation reads a fit's checkpoint file, and the recipes "
                             "keep the last one, not a best one: give `last` (the newest fit of this recipe) or the .ckpt file")
        # Lightning's own names, a remote URL (fsspec's) and a sharded (FSDP) checkpoint's folder: Lightning reads them
        if not ckpt or ckpt in ("last", "best", "hpc", "registry") or "://" in str(ckpt) or Path(ckpt).is_dir():
            return super()._parse_ckpt_path()
        path = Path(ckpt)
        if not path.is_file():
            raise FileNotFoundError(
                f"--ckpt_path {ckpt}: no such file; give a .ckpt file written by `vlweak fit`, or `last` for "
                "the newest fit of this recipe"
            )
        if not zipfile.is_zipfile(path) or not _is_lightning_checkpoint(path):
            raise ValueError(
                f"--ckpt_path {ckpt} is not a Lightning checkpoint (a .ckpt file written by `vlweak fit`); "
                "model weights go to --model.init_args.backbone.init_args.pretrained, a pseudolabel artifact "
                "to the method's artifact option"
            )
        before = self.config[sub].get("model")
        before = before.clone() if hasattr(before, "clone") else before
        super()._parse_ckpt_path()
        diff = _differences(_plain(before), _plain(self.config[sub].get("model")), "model")
        classes = [(a, b) for key, a, b in diff if key == "model.class_path"]
        if classes:
            (ours, theirs), = classes
            rank_zero_warn(f"--ckpt_path {ckpt} is a checkpoint of {theirs.rsplit('.', 1)[-1]}, not of this "
                           f"recipe's {ours.rsplit('.', 1)[-1]}: the run is {theirs.rsplit('.', 1)[-1]}'s, with its settings")
            return
        # where this run writes and reads its files is this run's, not the checkpoint's
        for name in RUN_LOCAL:
            key = f"model.init_args.{name}"
            if any(k == key for k, _, _ in diff):
                self.config[sub][key] = _plain(before)["init_args"].get(name)
        # settings this run gave (not left at a None default) that the checkpoint's replace; the class
        # vocabulary is linked from the data module after this
        changed = [f"{key.rsplit('.', 1)[-1]} {b!r} (here {a!r})" for key, a, b in diff
                   if a is not None and key.startswith("model.init_args.") and key != "model.init_args.classnames"
                   and key.rsplit(".", 1)[-1] not in RUN_LOCAL]
        if changed:
            more = f" (and {len(changed) - 6} more)" if len(changed) > 6 else ""
            rank_zero_warn(f"--ckpt_path {ckpt}: the model is built with the checkpoint's settings: "
                           f"{'; '.join(changed[:6])}{more}")

    def before_fit(self) -> None:
        """A fit that keeps checkpoints also gets one where it stops (:class:`CheckpointOnInterrupt`),
        first in line, before any callback's own clean-up on the exception."""
        if not has_training_step(self.model):
            name = type(self.model).__name__
            raise ValueError(f"{name} is training-free: `vlweak fit` has nothing to train; run `vlweak test` "
                             "or `vlweak predict` with this recipe")
        from vlweak.callbacks import CheckpointOnInterrupt

        callbacks = self.trainer.callbacks
        if self.trainer.checkpoint_callbacks and not any(isinstance(cb, CheckpointOnInterrupt) for cb in callbacks):
            callbacks.insert(0, CheckpointOnInterrupt())

    def _prepare_subcommand_kwargs(self, subcommand: str) -> dict[str, Any]:
        kwargs = super()._prepare_subcommand_kwargs(subcommand)
        needs_fit = getattr(self.model, "evaluates_what_a_fit_trains", has_training_step(self.model))
        if subcommand in ("validate", "test", "predict") and needs_fit and not kwargs.get("ckpt_path"):
            name = type(self.model).__name__
            rank_zero_warn(f"`vlweak {subcommand}` without --ckpt_path: {name} runs untrained, as its recipe "
                           "builds it; --ckpt_path last takes the newest fit of this recipe")
        if kwargs.get("ckpt_path") == "last":
            kwargs["ckpt_path"] = newest_last_checkpoint(self.trainer, required=subcommand != "fit")
            if kwargs["ckpt_path"]:
                self._warn_if_configured_otherwise(subcommand, Path(kwargs["ckpt_path"]))
        if subcommand in ("validate", "test", "predict"):
            # an evaluation writes no checkpoint: the recipe's ModelCheckpoint, restored from the fit's,
            # would only warn that its folder moved (it is this run's version folder, not the fit's)
            from lightning.pytorch.callbacks import ModelCheckpoint

            callbacks = self.trainer.callbacks
            callbacks[:] = [cb for cb in callbacks if not isinstance(cb, ModelCheckpoint)]
        if subcommand == "predict" and kwargs.get("return_predictions") is None:
            kwargs["return_predictions"] = False  # methods write artifacts; predict_step returns nothing to keep
        return kwargs

    def _warn_if_configured_otherwise(self, subcommand: str, ckpt: Path) -> None:
        """Name the model and data settings in which the checkpoint's run (its ``config.yaml``)
        differs from this one: ``--ckpt_path last`` takes the newest run, which may be another's."""
        saved = ckpt.parent.parent / "config.yaml"
        if not saved.is_file():
            return
        try:
            theirs = yaml.safe_load(saved.read_text()) or {}
            ours = yaml.safe_load(self._parser(subcommand).dump(self.config[subcommand], **_KEEP_UNSET)) or {}
        except Exception:  # a config that cannot be read or dumped is no reason to stop the run
            return
        diff = [
            f"{key}: {a!r} there, {b!r} here"
            for section in ("model", "data")
            for key, a, b in _differences(theirs.get(section), ours.get(section), section)
            if not (section == "model" and key.rsplit(".", 1)[-1] in RUN_LOCAL)
        ]
        if diff:
            more = f" (and {len(diff) - 5} more)" if len(diff) > 5 else ""
            rank_zero_warn(f"--ckpt_path last: {ckpt} comes from a run configured otherwise: {'; '.join(diff[:5])}{more}")


def constructor_error(err: BaseException) -> BaseException | None:
    """The exception a class's constructor raised under jsonargparse's instantiation, or ``None``.

    jsonargparse reports a constructor's error inside a union error ("Does not validate against any
    of the Union subtypes ... Given value: <the whole namespace>"), chained to the original. The
    first exception of the chain raised outside jsonargparse is the constructor's (which may itself
    be chained to a lower-level cause; its message is the one written for the user).
    """
    while _raised_by_jsonargparse(err):
        if err.__cause__ is None:
            return None
        err = err.__cause__
    return err


def _raised_by_jsonargparse(err: BaseException) -> bool:
    frames = traceback.extract_tb(err.__traceback__)
    return bool(frames) and f"{os.sep}jsonargparse{os.sep}" in frames[-1].filename


#: Method options that say where a run writes and reads its own files, not what the model is: a run
#: from a checkpoint keeps the command's (Lightning's ``--ckpt_path`` takes every other from it).
RUN_LOCAL = ("artifact_path", "cache_dir", "rounds_dir", "resume")


def _plain(config: Any) -> Any:
    """A jsonargparse namespace as nested dicts (other values as they are)."""
    return config.as_dict() if hasattr(config, "as_dict") else config


def _differences(a: Any, b: Any, key: str) -> list[tuple[str, Any, Any]]:
    """``(dotted key, a's value, b's value)`` wherever two nested configs differ; of two classes, the
    class alone (their options are not comparable)."""
    if isinstance(a, dict) and isinstance(b, dict):
        if "class_path" in a and "class_path" in b and a["class_path"] != b["class_path"]:
            return [(f"{key}.class_path", a["class_path"], b["class_path"])]
        return [d for k in sorted(set(a) | set(b), key=str) for d in _differences(a.get(k), b.get(k), f"{key}.{k}")]
    return [] if a == b else [(key, a, b)]


def newest_last_checkpoint(trainer: L.Trainer, required: bool = True) -> str | None:
    """The most recently written ``last*.ckpt`` among the runs of this recipe: in
    ``<runs_root>/<run>/checkpoints/`` and in any ``ModelCheckpoint`` folder the recipe fixes (runs
    of overlays that share the recipe's logger folder count too: the path used is printed).
    Lightning's own ``"last"`` looks only in the new run's folder, which a ``test`` or a resumed
    ``fit`` has just created empty. None found: an error naming the folder, or (``fit``,
    ``required=False``) ``None`` with a warning: the fit starts without a Lightning checkpoint."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    root = runs_root(trainer)
    fixed = [Path(cb.dirpath) for cb in trainer.checkpoint_callbacks if isinstance(cb, ModelCheckpoint) and cb.dirpath]
    if root is None and not fixed:
        raise ValueError(
            "--ckpt_path last needs a logger (its runs folder holds the runs) or a ModelCheckpoint dirpath; "
            "this run has neither: give the .ckpt file instead"
        )
    # one run level only: a recipe whose folder nests another recipe's runs must not pick those up
    found = set(root.glob("*/checkpoints/last*.ckpt")) if root is not None and root.is_dir() else set()
    for d in fixed:
        found |= set(d.glob("last*.ckpt")) if d.is_dir() else set()
    if found:
        # ties broken by name, so every rank of a multi-process run resolves the same file
        newest = max(found, key=lambda p: (p.stat().st_mtime, str(p)))
        rank_zero_info(f"--ckpt_path last: {newest}")
        if required and newest.name.startswith("last-interrupted"):  # an evaluation of a fit that stopped
            rank_zero_warn(f"--ckpt_path last is {newest}, written when a fit stopped: its training is not "
                           "finished (`vlweak fit` with the same recipe and --ckpt_path last finishes it)")
        return str(newest)
    where = f"no last checkpoint among the runs under {root} (looked for */checkpoints/last*.ckpt)"
    if required:
        raise FileNotFoundError(f"--ckpt_path last: {where}; run `vlweak fit` with this recipe first, or give a .ckpt file")
    rank_zero_warn(f"--ckpt_path last: {where}; the fit starts without a Lightning checkpoint "
                   "(pseudolabel rounds still resume from their own round files)")
    return None


DESCRIPTION = (
    "vlweak: vision-language weak supervision on Lightning. Run a recipe: "
    "`vlweak test --config recipes/quickstart.yaml` (zero-shot pseudolabels); every method "
    "(ZeroShot, CHiLS, ZLaP, CoOp, DualCoOp, PromptTuning, CDUL, CLIPPretrain) has recipes under recipes/. "
    "`vlweak fit --model.help PromptTuning` lists a method's arguments, `--data.help ImageFolderDataModule` "
    "a data module's; `--print_config` prints a run's complete configuration."
)

_NULLS = {"null", "Null", "NULL", "~"}


def _deep_nulls_as_configs(args: list[str]) -> list[str]:
    """Rewrite ``--model.init_args.backbone.init_args.cache_dir=null`` as the equivalent one-key ``--config``.

    jsonargparse hands a value given below a class argument to the inner parser as formatted text,
    so a ``null`` two class levels down (in any spelling: ``--model.backbone.cache_dir=null`` too)
    arrives as the string ``"None"`` (an ``int | None`` argument then fails to parse). A config string
    carries the null through; it sits where the option was, so the order of overrides is kept. Keys
    of three or more parts are rewritten; the config form means the same for the shallower ones.
    """
    out, i = [], 0
    while i < len(args):
        arg, key, width = args[i], None, 1
        if arg.startswith("--") and "=" in arg and arg.split("=", 1)[1] in _NULLS:
            key = arg[2:].split("=", 1)[0]
        elif arg.startswith("--") and "=" not in arg and i + 1 < len(args) and args[i + 1] in _NULLS:
            key, width = arg[2:], 2
        if key is not None and key.count(".") >= 2 and "+" not in key:
            tree: object = None
            for part in reversed(key.split(".")):
                tree = {part: tree}
            out += ["--config", json.dumps(tree)]
        else:
            out += args[i : i + width]
        i += width
    return out


def build_cli(args: list[str] | None = None, run: bool = True) -> VLWeakCLI:
    """Parse ``args`` (default: the command line), instantiate, and run the subcommand if ``run``;
    returns the CLI object (its ``model``, ``datamodule`` and ``trainer``) for in-process use."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    quiet_known_noise()  # pytest and notebooks may have reset the filters since vlweak was imported
    if args is None:  # the command line itself (Lightning reads sys.argv when given no args)
        sys.argv[1:] = _deep_nulls_as_configs(sys.argv[1:])
    else:
        args = _deep_nulls_as_configs(list(args))
    _GIVEN_ARGS[:] = sys.argv[1:] if args is None else args
    _note_overlay_order(_GIVEN_ARGS)
    return VLWeakCLI(
        model_class=None,
        datamodule_class=VLDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_callback=SaveRunConfig,
        save_config_kwargs={"overwrite": True},
        parser_kwargs={"description": DESCRIPTION},
        parser_class=ArgumentParser,
        # every training method sets its optimizer and schedule from its own options (the papers'):
        # Lightning's --optimizer / --lr_scheduler would be overridden or ignored, so they are not offered
        auto_configure_optimizers=False,
        trainer_defaults={
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
        },
    )


def _note_overlay_order(args: list[str]) -> None:
    """An overlay recipe (``model: init_args:`` without a ``class_path``) given before the recipe that
    names the method fails in jsonargparse with "Option ... is not accepted" for the base class:
    say on stderr, first, that the overlay goes after its recipe."""
    named = False
    for k, arg in enumerate(args):
        if arg.split("=", 1)[0] in ("--model", "--model.class_path"):  # the method named on the command line
            named = True
        path = arg.split("=", 1)[1] if arg.startswith("--config=") else args[k + 1] if arg == "--config" and k + 1 < len(args) else None
        if path is None:
            continue
        try:
            model = (yaml.safe_load(Path(path).read_text()) or {}).get("model")
        except Exception:  # not a readable YAML file: jsonargparse will say so
            return
        if not isinstance(model, dict):
            continue
        if "class_path" in model:
            named = True
        elif "init_args" in model and not named:
            print(f"vlweak: note: {path} sets model.init_args without naming the method (model.class_path): "
                  f"an overlay goes after the recipe it changes (--config <recipe> --config {path})", file=sys.stderr)
            return


def _user_errors() -> tuple[type[BaseException], ...]:
    from vlweak.backbones.errors import BackboneError
    from vlweak.data.datasets import ImageLoadError, VocabularyError
    from vlweak.data.multilabel import AnnotationError
    from vlweak.labels.artifact import ArtifactError
    from vlweak.labels.hierarchy_errors import HierarchyError
    from vlweak.labels.hierarchy_generate import GenerationError

    from lightning.fabric.utilities.exceptions import MisconfigurationException  # Lightning refusing a trainer setting

    return (BackboneError, ImageLoadError, VocabularyError, AnnotationError, ArtifactError, HierarchyError, GenerationError,
            MisconfigurationException)


def is_user_error(err: BaseException) -> bool:
    """Whether ``err`` is vlweak refusing an input (a bad option value, a missing image or weights
    file, a hierarchy naming unknown classes ...), whose message says all, rather than a failure
    whose traceback matters: one of vlweak's error classes, or an exception raised by a ``raise``
    statement of vlweak's own code (not one a library call or an operation in it raised)."""
    if isinstance(err, _user_errors()):
        return True
    if isinstance(err, (AssertionError, NotImplementedError)):
        return False
    frames = traceback.extract_tb(err.__traceback__)
    if not frames:
        return False
    package = str(Path(__file__).resolve().parent) + os.sep
    last = frames[-1]
    return str(Path(last.filename).resolve()).startswith(package) and (last.line or "").lstrip().startswith("raise ")


def _lost_a_peer(err: BaseException) -> bool:
    """Whether ``err`` is a collective failing because another process of a multi-process run
    ended (that process printed the cause). Read from the message alone: Lightning has taken the
    process group and its environment down by the time the error reaches here."""
    text = f"{type(err).__name__}: {err}"
    return any(s in text for s in ("Connection closed by peer", "Connection reset by peer", "NCCL communicator was aborted"))


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``vlweak`` console script. An input vlweak refuses ends the run with its
    message on one line and exit status 2 (``VLWEAK_TRACEBACK=1`` shows the traceback instead)."""
    try:
        build_cli(args)
    except Exception as err:
        if os.environ.get("VLWEAK_TRACEBACK", "") not in ("", "0"):
            raise
        if _lost_a_peer(err):
            print("vlweak: error: another process of this run stopped, and this one with it: the first error "
                  "above is the cause\n(VLWEAK_TRACEBACK=1 shows where)", file=sys.stderr)
            raise SystemExit(1) from None
        if not is_user_error(err):
            raise
        message = str(err)
        if "\nOriginal Traceback" in message:  # raised in a DataLoader worker: its last line is the error
            last = message.rstrip().splitlines()[-1]
            message = last.split(": ", 1)[-1]
        print(f"vlweak: error: {type(err).__name__}: {message}\n(VLWEAK_TRACEBACK=1 shows where)", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
