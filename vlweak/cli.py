"""The ``vlweak`` command: Lightning's CLI over every vlweak method and data module.

``vlweak fit|validate|test|predict --config recipes/<recipe>.yaml``; ``--print_config`` shows the
complete, documented configuration; ``--model.help CLASS`` / ``--data.help CLASS`` list a class's
arguments.
"""

from __future__ import annotations

import os

from lightning.pytorch.cli import LightningCLI

import vlweak.data  # noqa: F401  (registers the data modules for class-path resolution)
import vlweak.methods  # noqa: F401
from vlweak.data.datamodule import VLDataModule


class VLWeakCLI(LightningCLI):
    """Links the data module's class vocabulary into the model."""

    def add_arguments_to_parser(self, parser) -> None:
        parser.link_arguments("data.classnames", "model.init_args.classnames", apply_on="instantiate")
        parser.link_arguments("data.multilabel", "model.init_args.multilabel", apply_on="instantiate")


def build_cli(args: list[str] | None = None, run: bool = True) -> VLWeakCLI:
    """Parse ``args`` (default: the command line), instantiate, and run the subcommand if ``run``;
    returns the CLI object (its ``model``, ``datamodule`` and ``trainer``) for in-process use."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
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
