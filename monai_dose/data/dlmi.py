"""The DLMI 2023 2D slice dataset (``sample_N/{ct,structure_masks,possible_dose_mask,dose}.npy``)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Transposed

DLMI_FILES: dict[str, str] = {
    "ct": "ct.npy",
    "structures": "structure_masks.npy",
    "possible_dose_mask": "possible_dose_mask.npy",
    "dose": "dose.npy",
}
"""Dictionary key -> file name, the same keys as the OpenKBP volumes."""


def load_dlmi_datalist(root: str | Path, split: str = "train") -> list[dict]:
    """Datalist of the ``sample_N`` folders of ``root/split`` (``dose`` only where the sample has one)."""
    split_dir = Path(root) / split
    if not split_dir.is_dir():
        raise FileNotFoundError(f"{split_dir}: no such DLMI split folder")
    samples = sorted((p for p in split_dir.iterdir() if p.is_dir()), key=lambda p: int(p.name.split("_")[-1]))
    return [{"id": p.name, **{k: str(p / f) for k, f in DLMI_FILES.items() if (p / f).exists()}} for p in samples]


def dlmi_loader(with_dose: bool = True) -> Compose:
    """Load a DLMI sample into the keys and orientation of an OpenKBP axial slice (``C, H, W``), in float32: half the
    memory of the files' float64, the integer CT and binary masks exact, the dose as OpenKBP's float32 NIfTI holds it.

    DLMI slices are stored transposed (``sample = volume[:, :, k].T``); this undoes it.
    """
    keys = list(DLMI_FILES) if with_dose else [k for k in DLMI_FILES if k != "dose"]
    single = [k for k in keys if k != "structures"]
    return Compose(
        [
            LoadImaged(keys, reader="NumpyReader", dtype=np.float32, image_only=True),
            EnsureChannelFirstd(single, channel_dim="no_channel"),
            EnsureChannelFirstd("structures", channel_dim=0),
            Transposed(keys, indices=(0, 2, 1)),
        ]
    )
