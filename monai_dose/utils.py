"""Small helpers shared by the writers of monai_dose."""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def write_atomic(path: str | os.PathLike, write: Callable[[Path], object]) -> Path:
    """Call ``write`` on a temporary file beside ``path`` (same suffixes), then move it to ``path``.

    Readers never see a half-written ``path``; on error the temporary file is removed and ``path`` is untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".tmp{os.getpid()}.{path.name}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def latest_checkpoint(directory: str | os.PathLike, pattern: str = "checkpoint_*.pt") -> str:
    """The newest checkpoint matching ``pattern`` in ``directory`` that loads completely, or ``""`` if none.

    MONAI's ``CheckpointSaver`` writes in place, so a run killed while saving leaves a truncated newest file: it
    is skipped with a warning, and training resumes from the one before.
    """
    for path in sorted(Path(directory).glob(pattern), key=os.path.getmtime, reverse=True):
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except (EOFError, OSError, RuntimeError, pickle.UnpicklingError) as error:
            logger.warning(f"{path}: incomplete or unreadable checkpoint, skipped ({error!r})")
            continue
        return str(path)
    return ""
