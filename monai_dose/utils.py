"""Small helpers shared by the writers of monai_dose."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)


def as_device(device: str | torch.device) -> torch.device:
    """``device`` as a ``torch.device``, checked; a ``ValueError`` naming it otherwise.

    Configs get devices (and every other user value) as values, never as text inside a ``$`` expression, which
    MONAI would evaluate as Python.
    """
    try:
        return torch.device(device)
    except (RuntimeError, TypeError) as err:
        raise ValueError(f"device {device!r} is not a torch device such as 'cpu', 'cuda' or 'cuda:1' ({err})") from err


def patient_path(root: str | os.PathLike, patient_id: object, *parts: str) -> Path:
    """``root/<patient_id>/<parts...>``, refusing a ``patient_id`` that is not a single path component (empty,
    ``.``, ``..``, holding a path separator, or absolute), so that no writer can be led outside ``root``."""
    text = str(patient_id)
    if text in ("", ".", "..") or "/" in text or "\\" in text:
        raise ValueError(f"patient id {text!r} is not a single folder name (no path separators, '.' or '..')")
    return Path(root, text, *parts)


def new_run_dir(root: str | os.PathLike) -> str:
    """``root/<YYYYmmdd-HHMMSS>`` (the local time now), or with ``-2``, ``-3``, ... appended where that folder exists:
    the folder of a new training run. Not created here: the run's checkpoint and log writers create it."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, count = Path(root, stamp), 1
    while path.exists():
        count += 1
        path = Path(root, f"{stamp}-{count}")
    return str(path)


def check_writable(directory: str | os.PathLike) -> Path:
    """Create ``directory`` if needed and check that a file can be written in it, before any long work; raises
    ``PermissionError`` naming it otherwise."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = directory / f".tmp{os.getpid()}.write-check"
        probe.touch()
        probe.unlink()
    except OSError as err:
        raise PermissionError(f"{directory}: cannot write there ({err.strerror or err})") from err
    return directory


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
