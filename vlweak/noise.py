"""Warnings and log lines that vlweak provokes on purpose, or that nobody running it can act on,
kept out of a run's output (in the CLI and in Python alike). Each filter matches one message."""

from __future__ import annotations

import logging
import warnings

_MESSAGES = (
    # frozen encoders stay in eval mode on purpose (no dropout / batch-norm updates in what is not trained)
    r"Found \d+ module\(s\) in eval mode at the start of training",
    # predict_step returns nothing on purpose: methods write the pseudolabel artifact at the epoch's end
    r"predict returned None if it was on purpose",
    # Lightning (2.6) with torch >= 2.10: a deprecation inside Lightning itself
    r"`isinstance\(treespec, LeafSpec\)` is deprecated",
    # Lightning (2.6) gathering through torch.distributed.nn with torch >= 2.10: inside Lightning
    r"torch\.distributed\.nn\.functional\.all_gather is deprecated",
    # a data module without a val split hands a fit no validation loaders, and says so itself
    r"Total length of `list` across ranks is zero",
)


def _drop_product_tips(record: logging.LogRecord) -> bool:
    """Lightning prints "💡 Tip: ... try installing <a Lightning cloud product>" on every run."""
    return not str(record.msg).startswith("💡 Tip:")


def quiet_known_noise() -> None:
    """Install the filters (idempotent: a filter given again replaces itself)."""
    for message in _MESSAGES:
        warnings.filterwarnings("ignore", message=message)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if _drop_product_tips not in logger.filters:
            logger.addFilter(_drop_product_tips)
