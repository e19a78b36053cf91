"""The ``vlweak`` command: Lightning's CLI over every vlweak method and data module.

``vlweak fit|validate|test|predict --config recipes/<recipe>.yaml``; ``--print_config`` shows the
complete, documented configuration; ``--model.help CLASS`` / ``--data.help CLASS`` list a class's
arguments.
"""

from __future__ import annotations

import json
import os
import sys

from lightning.pytorch.cli import LightningCLI

import vlweak.data  # noqa: F401  (registers the data modules for class-path resolution)
import vlweak.methods  # noqa: F401
from vlweak.data.datamodule import VLDataModule


class VLWeakCLI(LightningCLI):
    """Links the data module's class vocabulary into the model."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.classnames", "model.init_args.classnames", apply_on="instantiate")
        parser.link_arguments("data.multilabel", "model.init_args.multilabel", apply_on="instantiate")


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
    if args is None:  # the command line itself (Lightning reads sys.argv when given no args)
        sys.argv[1:] = _deep_nulls_as_configs(sys.argv[1:])
    else:
        args = _deep_nulls_as_configs(list(args))
    return VLWeakCLI(
        model_class=None,
        datamodule_class=VLDataModule,
        subclass_mode_model=True,
        subclass_mode_data=True,
        args=args,
        run=run,
        save_config_kwargs={"overwrite": True},
        trainer_defaults={
            "logger": {"class_path": "lightning.pytorch.loggers.CSVLogger", "init_args": {"save_dir": "runs"}},
        },
    )


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``vlweak`` console script."""
    build_cli(args)


if __name__ == "__main__":
    main()
