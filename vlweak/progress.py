"""Progress bars of vlweak's own long passes (encoding images and prompts, kNN search, snippets),
shown when the trainer shows its own: a run with ``enable_progress_bar: false`` (a batch job's log)
gets none of them either."""

from __future__ import annotations

from typing import Any

_shown = True


def show_progress(shown: bool) -> None:
    """Show (or hide) every bar :func:`progress_bar` makes from now on."""
    global _shown
    _shown = bool(shown)


def bars_shown() -> bool:
    """Whether bars are shown now (libraries' own bars, e.g. transformers' weight loading, follow it)."""
    return _shown


def follow_trainer(trainer: Any) -> None:
    """Show bars exactly when ``trainer`` shows its progress bar (its ``enable_progress_bar``)."""
    if trainer is not None:
        show_progress(getattr(trainer, "progress_bar_callback", None) is not None)


def progress_bar(iterable: Any = None, **kwargs: Any) -> Any:
    """A tqdm bar (not kept on screen when done), or a silent pass-through when bars are hidden."""
    from tqdm.auto import tqdm

    hidden = kwargs.pop("disable", False) or not _shown
    kwargs.setdefault("leave", False)
    kwargs.setdefault("dynamic_ncols", True)
    return tqdm(iterable, disable=hidden, **kwargs)
