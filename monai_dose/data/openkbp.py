"""The OpenKBP dataset: names, file layout and datalists of its NIfTI form."""

from __future__ import annotations

import json
from pathlib import Path

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

IMAGE_KEYS: tuple[str, ...] = ("ct", "structures", "possible_dose_mask")
"""Per-patient inputs, one NIfTI file each (``<key>.nii.gz``)."""
DOSE_KEY = "dose"
SPLITS: dict[str, str] = {"training": "train", "validation": "validation", "test": "test"}
"""Datalist section -> patient folder name."""


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
    return [{"id": p.name, **{k: str(p / f"{k}.nii.gz") for k in keys}} for p in folders]
