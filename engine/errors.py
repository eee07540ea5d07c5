"""Errors that mean "bad input": the CLI prints them as one line and exits 2."""
from pathlib import Path
from typing import Optional

from hcd.engine.config_tree import ConfigError


class DataError(ValueError):
    """A dataset problem: missing folder, corrupt or non-image file (the message names it)."""


class ModelError(ValueError):
    """An unsupported model family, a bad checkpoint path or a checkpoint that does not fit."""


USER_ERRORS = (ConfigError, DataError, ModelError)

# Exit codes of every command: 0 success, 1 failure, 2 bad input (one line naming it), and for `hcd train`
# 3 = stopped cleanly by Ctrl-C / SIGTERM with a checkpoint (a job script requeues it with --resume).
EXIT_STOPPED = 3


def output_path_problem(path, directory: bool) -> Optional[str]:
    """Why `path` cannot become the output folder (directory=True) or file, or None: checked before any
    work, so a long run never fails at its end on a path it could have refused at its start."""
    path = Path(path).expanduser()
    if path.exists() and path.is_dir() != directory:
        return f"{path} exists and is {'not ' if directory else ''}a directory"
    parent = next((q for q in path.parents if q.exists()), None)
    if parent is not None and not parent.is_dir():
        return f"{parent} is not a directory, so {path} cannot be created"
    return None
