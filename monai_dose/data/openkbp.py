"""The OpenKBP dataset: names, file layout and datalists of its NIfTI form."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from monai.data import load_decathlon_datalist

OARS: tuple[str, ...] = (
    "Brainstem",
    "SpinalCord",
    "RightParotid",
    "LeftParotid",
    "Esophagus",
    "Larynx",
    "Mandible",
)
TARGETS: tuple[str, ...] = ("PTV56", "PTV63", "PTV70")
STRUCTURES: tuple[str, ...] = OARS + TARGETS
"""Channel order of ``structures.nii.gz`` (and of the DLMI ``structure_masks.npy``)."""
TARGET_DOSES_GY: dict[str, float] = {"PTV56": 56.0, "PTV63": 63.0, "PTV70": 70.0}
GRID_SHAPE: tuple[int, int, int] = (128, 128, 128)
AXES_RAS = np.array([[0.0, -1.0, 0.0], [-1.0, 0.0, 0.0], [0.0, 0.0, -1.0]])
"""World (RAS+) direction of each OpenKBP array axis, as columns: axis 0 runs anterior -> posterior, axis 1
patient right -> left, axis 2 superior -> inferior (axis codes P, L, I). Read from the anatomy of every complete
OpenKBP patient: Mandible before SpinalCord on axis 0, RightParotid before LeftParotid on axis 1, Brainstem
before Esophagus on axis 2."""

IMAGE_KEYS: tuple[str, ...] = ("ct", "structures", "possible_dose_mask")
"""Per-patient inputs, one NIfTI file each (``<key>.nii.gz``)."""
DOSE_KEY = "dose"
SPLITS: dict[str, str] = {"training": "train", "validation": "validation", "test": "test"}
"""Datalist section -> patient folder name."""


def openkbp_affine(voxel_dimensions: Sequence[float]) -> np.ndarray:
    """The voxel-to-world (RAS+, mm) affine of an OpenKBP volume with ``voxel_dimensions`` (mm, axes 0, 1, 2):
    ``[[0, -s1, 0, 0], [-s0, 0, 0, 0], [0, 0, -s2, 0], [0, 0, 0, 1]]`` (:data:`AXES_RAS`)."""
    affine = np.eye(4)
    affine[:3, :3] = AXES_RAS * np.asarray(voxel_dimensions, dtype=float)
    return affine


def load_openkbp_datalist(dataset_dir: str | Path, split: str = "training") -> list[dict]:
    """Load one split of an OpenKBP ``dataset.json`` with absolute file paths.

    Args:
        dataset_dir: folder holding ``dataset.json`` and the patient folders.
        split: ``"training"``, ``"validation"`` or ``"test"``.
    """
    dataset_dir = Path(dataset_dir)
    datalist_file = dataset_dir / "dataset.json"
    if not datalist_file.is_file():
        raise FileNotFoundError(f"{datalist_file}: no dataset.json (run `python -m monai_dose convert-openkbp`)")
    sections = json.loads(datalist_file.read_text())
    if split not in sections:
        raise ValueError(f"{datalist_file}: no '{split}' list (has {sorted(k for k in sections if k in SPLITS)})")
    return load_decathlon_datalist(datalist_file, is_segmentation=False, data_list_key=split, base_dir=dataset_dir)


def patient_files(folder: str | Path, keys: Sequence[str] = IMAGE_KEYS) -> dict[str, str]:
    """The file of each of ``keys`` in a patient folder, ``folder/<key>.nii.gz``, whether it exists or not."""
    return {k: str(Path(folder, f"{k}.nii.gz")) for k in keys}


def patient_folder_datalist(root: str | Path, require_dose: bool = False) -> list[dict]:
    """Datalist of every patient folder under ``root`` (``root/<id>/{ct,structures,possible_dose_mask}.nii.gz``).

    Folders are listed whatever they hold, so that a patient with a missing file reaches the pipeline and fails
    there with an error that names it; ``root`` itself may also be a single patient folder.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: not a folder")
    folders = [root] if (root / "ct.nii.gz").exists() else sorted(p for p in root.iterdir() if p.is_dir())
    keys = IMAGE_KEYS + ((DOSE_KEY,) if require_dose else ())
    return [{"id": p.name, **patient_files(p, keys)} for p in folders]
