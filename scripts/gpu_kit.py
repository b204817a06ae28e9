"""Pack an OpenKBP NIfTI dataset small enough to travel with a lent GPU run (64 MiB with the repository and the
wheels), and unpack it there.

Usage::

    python scripts/gpu_kit.py pack --data ../shared/data/openkbp --out .gpu/openkbp.tar.xz [--num_train N] [--num_val N]
    python scripts/gpu_kit.py unpack .gpu/openkbp.tar.xz /tmp/openkbp

Each patient keeps the slices training and validation read: those of its possible-dose mask, with 2 more on each
side (the neighbours of a 2.5D network), its affine's origin moved to the first kept slice so that every kept voxel
keeps its position. The target proximity and the beam prior are unchanged on those slices (the targets lie inside
the mask; the prior is computed per slice). Training patients are stored at the precision bf16 training sees: the
CT rounded so that its scaled value (``DoseInput``) rounds to the same bfloat16 number, the dose as int16 in steps
of 0.1 Gy (NIfTI ``scl_slope`` 0.1: the loaders read float Gy); validation patients stay exact, so their scores
equal those on the full data. About 0.29 MiB per training patient (one xz tar of the uncompressed volumes), so all
169 OpenKBP training patients and a few validation ones fit beside the repository and the wheels.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tarfile
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from tqdm import tqdm

from monai_dose.data.openkbp import DOSE_KEY, IMAGE_KEYS, load_openkbp_datalist
from monai_dose.transforms import CT_RANGE, scale_ct

MARGIN = 2
"""Slices kept on each side of the possible-dose mask."""
DOSE_STEP_GY = 0.1
SPLITS = {"training": "train", "validation": "validation"}


def kept_slices(mask: np.ndarray, margin: int = MARGIN) -> slice:
    """The slices (last axis) of ``mask``'s non-empty ones, with ``margin`` more on each side where there are."""
    occupied = np.flatnonzero(mask.any(axis=(0, 1)))
    if not len(occupied):
        raise ValueError("the possible-dose mask is empty")
    return slice(max(int(occupied[0]) - margin, 0), min(int(occupied[-1]) + 1 + margin, mask.shape[2]))


def bf16_ct(ct: np.ndarray) -> np.ndarray:
    """``ct`` (int16, OpenKBP values) clipped to :data:`~monai_dose.transforms.CT_RANGE` and rounded to the
    values whose scaled value is the bfloat16 rounding of the original's."""
    low, high = CT_RANGE
    scaled = scale_ct(torch.from_numpy(ct).double()).to(torch.bfloat16).double().numpy()
    return np.round(scaled * (high - low) + low).astype(np.int16)


def cropped(image: nib.Nifti1Image, kept: slice, key: str, compact: bool = False) -> nib.Nifti1Image:
    """Slices ``kept`` of ``image`` (axis 2) with the affine moved to them; with ``compact`` the CT at bf16 precision
    (:func:`bf16_ct`) and the dose (``key``) in steps of :data:`DOSE_STEP_GY`."""
    data = np.asanyarray(image.dataobj)[:, :, kept]
    affine = image.affine.copy()
    affine[:3, 3] = image.affine[:3, :3] @ np.array([0.0, 0.0, kept.start]) + image.affine[:3, 3]
    dose_step = DOSE_STEP_GY if compact and key == DOSE_KEY else None
    if compact and key == "ct":
        data = bf16_ct(data)
    if dose_step is not None:
        data = np.round(data / dose_step).astype(np.int16)
    out = nib.Nifti1Image(data, affine)
    out.header.set_qform(affine, code=int(image.header["qform_code"]))
    out.header.set_sform(affine, code=int(image.header["sform_code"]))
    if dose_step is not None:
        out.header.set_slope_inter(dose_step, 0.0)
    return out


def _add(tar: tarfile.TarFile, name: str, content: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(content)
    tar.addfile(info, io.BytesIO(content))


def pack(data: Path, out: Path, num_train: int | None = None, num_val: int | None = None) -> dict:
    """Write the compact copy of the dataset at ``data`` to the xz tar ``out``; returns its ``dataset.json``."""
    dataset = json.loads((data / "dataset.json").read_text())
    keys = [*IMAGE_KEYS, DOSE_KEY]
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_name(out.name + ".partial")
    with tarfile.open(partial, "w:xz", preset=9) as tar:
        for split, count in (("training", num_train), ("validation", num_val)):
            items = []
            for item in tqdm(load_openkbp_datalist(data, split)[:count], desc=f"packing {split}", unit="patient"):
                try:
                    kept = kept_slices(np.asanyarray(nib.load(item["possible_dose_mask"]).dataobj))
                except ValueError as err:
                    raise ValueError(f"{item['possible_dose_mask']}: {err}") from None
                entry = {"id": item["id"], "voxel_dimensions": item["voxel_dimensions"]}
                for key in keys:
                    entry[key] = f"{SPLITS[split]}/{item['id']}/{key}.nii"
                    image = cropped(nib.load(item[key]), kept, key, compact=split == "training")
                    _add(tar, entry[key], image.to_bytes())
                items.append(entry)
            dataset[split] = items
        dataset["compact_copy"] = (
            f"slices of the possible-dose mask +-{MARGIN}; training CT at bf16 precision, training doses in "
            f"{DOSE_STEP_GY} Gy steps (scripts/gpu_kit.py)"
        )
        _add(tar, "dataset.json", json.dumps(dataset, indent=1).encode())
    partial.replace(out)
    return dataset


def unpack(archive: Path, out: Path) -> None:
    """Extract a packed dataset to ``out``."""
    with tarfile.open(archive, "r:xz") as tar:
        tar.extractall(out, filter="data")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("pack", help="pack a dataset into one xz tar")
    p.add_argument("--data", type=Path, required=True, help="OpenKBP NIfTI dataset folder (with dataset.json)")
    p.add_argument("--out", type=Path, required=True, help="the .tar.xz to write")
    p.add_argument("--num_train", type=int, default=None, help="first N training patients (default: all)")
    p.add_argument("--num_val", type=int, default=None, help="first N validation patients (default: all)")
    u = commands.add_parser("unpack", help="extract a packed dataset")
    u.add_argument("archive", type=Path)
    u.add_argument("out", type=Path)
    args = parser.parse_args(argv)
    if args.command == "pack":
        dataset = pack(args.data, args.out, args.num_train, args.num_val)
        size = args.out.stat().st_size / 2**20
        print(
            f"{args.out}: {len(dataset['training'])} training, {len(dataset['validation'])} validation, {size:.1f} MiB"
        )
    else:
        unpack(args.archive, args.out)
        print(f"{args.out}: unpacked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
