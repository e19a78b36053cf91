"""Errors raised while building or loading a backbone."""


class BackboneError(Exception):
    """Base class of backbone errors."""


class UnknownArchitectureError(BackboneError, ValueError):
    """The architecture name is not known to the library (the message lists close names)."""


class WeightsUnavailableError(BackboneError, RuntimeError):
    """Weights need a download that failed (offline) or do not exist; the message says how to pass a
    local file instead."""


class CheckpointMismatchError(BackboneError, ValueError):
    """A checkpoint's keys or shapes do not fit the architecture (the message names the first ones), or
    the checkpoint cannot be read at all: a directory, an empty, truncated or corrupt file, or a file
    that holds no ``name -> tensor`` state dict (the message names the path and the reason)."""


class VisualPromptError(BackboneError, ValueError):
    """Visual prompt tokens asked of an image tower without a token sequence (a ResNet)."""
