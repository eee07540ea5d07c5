"""Errors that mean "bad input": the CLI prints them as one line and exits 2."""
from engine.config import ConfigError


class DataError(ValueError):
    """A dataset problem: missing folder, corrupt or non-image file (the message names it)."""


class ModelError(ValueError):
    """An unsupported model family, a bad checkpoint path or a checkpoint that does not fit."""


USER_ERRORS = (ConfigError, DataError, ModelError)
