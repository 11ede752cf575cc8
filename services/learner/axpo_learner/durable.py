"""fsync helpers for the learner's atomic writes (checkpoints, SFT states, exports): write into a
temporary directory, :func:`fsync_tree` it, rename it into place, :func:`fsync_dir` the parent."""

from __future__ import annotations

import os
from pathlib import Path


def _fsync(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under ``path`` (before renaming it into place)."""
    for folder, _, files in os.walk(path):
        for name in files:
            _fsync(os.path.join(folder, name))
        _fsync(folder)


def fsync_dir(path: Path) -> None:
    """fsync one directory (after renaming something into it)."""
    _fsync(path)
