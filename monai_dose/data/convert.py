"""Conversion of the OpenKBP ``provided-data`` CSV folders to the NIfTI dataset of :mod:`.openkbp`."""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from tqdm import tqdm

from ..utils import patient_path, write_atomic
from .openkbp import DOSE_KEY, GRID_SHAPE, OARS, SPLITS, STRUCTURES, TARGETS, openkbp_affine

logger = logging.getLogger(__name__)

_HEADER = ",data"
_N_VOXELS = int(np.prod(GRID_SHAPE))
_REQUIRED = ("ct.csv", "possible_dose_mask.csv", "voxel_dimensions.csv")
_METADATA = {
    "name": "OpenKBP",
    "description": "Head-and-neck IMRT dose prediction data of the OpenKBP grand challenge (AAPM 2020), "
    "converted losslessly from the challenge's sparse CSV files to NIfTI. Only patients whose CT, dose "
    "and possible-dose-mask files were all available are included.",
    "reference": "A. Babier et al., OpenKBP: The open-access knowledge-based planning grand challenge and "
    "dataset, Medical Physics 48:5549-5561, 2021",
    "source_format": "OpenKBP provided-data CSV ({})",
    "files": {
        "ct": "int16, OpenKBP CT value (Hounsfield units + 1024, as in the CSV; 0 outside the body)",
        "dose": "float32, Gy; exactly 0 outside possible_dose_mask",
        "possible_dose_mask": "uint8 {0,1}",
        "structures": "uint8 {0,1}, 4D (128,128,128,10), last axis = the 'structures' list; "
        "an all-zero channel means the ROI was not contoured",
    },
    "geometry": "128x128x128 grid; array axes anterior->posterior, right->left, superior->inferior; "
    "affine [[0,-s1,0,0],[-s0,0,0,0],[0,0,-s2,0],[0,0,0,1]] (RAS+, mm; axis codes P, L, I) with s the "
    "voxel_dimensions; array axis 2 is the cranio-caudal (slice) axis",
    "structures": list(STRUCTURES),
    "oars": list(OARS),
    "targets": list(TARGETS),
}


def _read_sparse_csv(path: Path, dtype: type | None = None) -> np.ndarray:
    """Dense ``GRID_SHAPE`` array of an OpenKBP sparse CSV: flat C-order index and ``data`` column.

    ``dtype=None`` reads a mask (``data`` empty) as uint8 ones.
    """
    with open(path) as f:
        header = f.readline().rstrip("\r\n")
    if header != _HEADER:
        raise ValueError(f"{path}: header {header!r}, expected {_HEADER!r}")
    try:
        table = pd.read_csv(path, skiprows=1, header=None, dtype=np.float64, engine="c").to_numpy()
    except pd.errors.EmptyDataError:
        table = np.zeros((0, 2))
    except ValueError as err:  # also pandas' ParserError
        raise ValueError(f"{path}: non-numeric value or malformed row ({str(err).strip()})") from err
    if table.shape[1] != 2:
        raise ValueError(f"{path}: {table.shape[1]} columns, expected 2 (index, data)")
    index, data = table[:, 0], table[:, 1]
    bad = ~((index >= 0) & (index < _N_VOXELS) & (index == np.round(index)))
    if bad.any():
        row = int(np.flatnonzero(bad)[0])
        grid = "x".join(map(str, GRID_SHAPE))
        raise ValueError(
            f"{path}: line {row + 2}: index {index[row]:.15g} outside the {grid} grid (0..{_N_VOXELS - 1})"
        )
    if dtype is not None:
        bad = ~np.isfinite(data)
        if np.issubdtype(dtype, np.integer):
            bad |= (data != np.round(data)) | (data < np.iinfo(dtype).min) | (data > np.iinfo(dtype).max)
        if bad.any():
            row = int(np.flatnonzero(bad)[0])
            raise ValueError(f"{path}: line {row + 2}: value {data[row]:.15g} missing or not a valid {np.dtype(dtype)}")
    flat = index.astype(np.int64)
    repeated = np.bincount(flat, minlength=_N_VOXELS)[flat] > 1
    if repeated.any():
        first, second = np.flatnonzero(flat == flat[np.argmax(repeated)])[:2]
        raise ValueError(f"{path}: line {second + 2}: index {flat[first]} already given on line {first + 2}")
    out = np.zeros(_N_VOXELS, dtype=dtype or np.uint8)
    out[flat] = 1 if dtype is None else data
    return out.reshape(GRID_SHAPE)


def _read_voxel_dimensions(path: Path) -> list[float]:
    """The three voxel sizes (mm) of ``voxel_dimensions.csv``, one per line."""
    try:
        dims = np.loadtxt(path, dtype=np.float64, ndmin=1)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err
    if dims.shape != (3,) or not np.all(np.isfinite(dims) & (dims > 0)):
        raise ValueError(f"{path}: expected 3 positive voxel sizes (mm), one per line, got {dims.tolist()}")
    return dims.tolist()


def _convert_patient(src: Path, dst: Path, with_dose: bool) -> list[float]:
    """Write ``dst/<key>.nii.gz`` for one ``pt_N`` CSV folder; return its voxel dimensions."""
    spacing = _read_voxel_dimensions(src / "voxel_dimensions.csv")
    rois = [src / f"{name}.csv" for name in STRUCTURES]
    images = {
        "ct": _read_sparse_csv(src / "ct.csv", np.int16),
        "possible_dose_mask": _read_sparse_csv(src / "possible_dose_mask.csv"),
        "structures": np.stack(
            [_read_sparse_csv(f) if f.is_file() else np.zeros(GRID_SHAPE, np.uint8) for f in rois], axis=-1
        ),
    }
    if with_dose:
        images[DOSE_KEY] = _read_sparse_csv(src / "dose.csv", np.float32)
    affine = openkbp_affine(spacing)
    for key, array in images.items():
        image = nib.Nifti1Image(array, affine)
        image.set_qform(affine, code=1)
        image.set_sform(affine, code=1)
        image.header.set_xyzt_units("mm")
        nib.save(image, dst / f"{key}.nii.gz")
    return spacing


def _natural_key(name: str) -> list:
    """Sort key putting ``pt_2`` before ``pt_10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def _earlier_dataset(datalist: Path, overwrite: bool) -> dict:
    """The ``dataset.json`` of an earlier conversion into the same folder (``{}`` if none), refused unless
    ``overwrite``."""
    if not datalist.is_file():
        return {}
    if not overwrite:
        raise ValueError(
            f"{datalist}: the folder already holds a converted dataset; pass --overwrite to convert into it (patients "
            "converted again are replaced, the others kept)"
        )
    try:
        return json.loads(datalist.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{datalist}: not a readable dataset.json ({err}); remove it or convert elsewhere") from err


def _merge(
    earlier: dict, converted: dict[str, list[dict]], excluded: dict[str, list[str]], malformed: dict[str, dict]
) -> tuple[dict[str, list[dict]], dict[str, list[str]], dict[str, dict]]:
    """This run's ``converted``, ``excluded`` and ``malformed`` patients per section, with those of the ``earlier``
    ``dataset.json`` (may be empty) that this run did not convert; logs which were replaced and which kept."""
    merged: tuple[dict, dict, dict] = ({}, {}, {})
    for section in SPLITS:
        old = {e["id"]: e for e in earlier.get(section, [])}
        if section not in converted and section not in earlier:
            continue
        new = {e["id"]: e for e in converted.get(section, [])}
        if old:
            replaced, kept = [i for i in old if i in new], [i for i in old if i not in new]
            logger.info(
                f"{section}: merged with the earlier dataset.json: replaced {', '.join(replaced) or 'none'}; "
                f"kept {', '.join(kept) or 'none'}"
            )
        entries = {**old, **new}
        merged[0][section] = sorted(entries.values(), key=lambda e: _natural_key(e["id"]))
        skipped = set(earlier.get("excluded_incomplete", {}).get(section, [])) | set(excluded.get(section, []))
        merged[1][section] = sorted(skipped - entries.keys(), key=_natural_key)
        bad = {**earlier.get("excluded_malformed", {}).get(section, {}), **malformed.get(section, {})}
        merged[2][section] = {i: problem for i, problem in bad.items() if i not in entries}
    return merged


def convert_openkbp(src: str | Path, dst: str | Path, overwrite: bool = False) -> dict:
    """Convert an OpenKBP ``provided-data`` folder to NIfTI patient folders and a ``dataset.json``.

    ``src/{train,validation,test}-pats/pt_N/*.csv`` become ``dst/{train,validation,test}/pt_N/*.nii.gz``
    (layout in :mod:`monai_dose.data.openkbp`). A patient missing a required CSV (CT, possible-dose mask,
    voxel dimensions; dose except in the test split) is skipped with a logged warning and listed under
    ``excluded_incomplete``. A patient with a malformed CSV is skipped too, with the file and the problem logged
    and listed under ``excluded_malformed``; the others are still converted. Each patient is written to a
    temporary folder in ``dst`` and moved into place when complete, so an error leaves no partial patient folder.

    A ``dst`` already holding a ``dataset.json`` is refused unless ``overwrite``; then this run is merged into it:
    the patients it converts are replaced, those of earlier runs that it does not convert are kept (both logged).

    Returns:
        ``{"converted": {split: [ids]}, "excluded": {split: [ids]}, "dataset": <dataset.json path>}``.

    Raises:
        FileNotFoundError: ``src`` holds no ``*-pats`` folder.
        ValueError: before writing anything, when ``dst`` holds a ``dataset.json`` and not ``overwrite``, or a
            patient folder name is not a single file name; after writing ``dataset.json`` of the converted patients,
            when some had a malformed CSV; the message names each file and its problem.
    """
    src, dst = Path(src), Path(dst)
    sources = {s: src / f"{folder}-pats" for s, folder in SPLITS.items()}
    sources = {s: folder for s, folder in sources.items() if folder.is_dir()}
    if not sources:
        raise FileNotFoundError(f"{src}: no {', '.join(f'{f}-pats/' for f in SPLITS.values())} folder")
    jobs = []  # (section, source folder, patient folder in dst)
    for section, folder in sources.items():
        for patient in sorted((p for p in folder.iterdir() if p.is_dir()), key=lambda p: _natural_key(p.name)):
            try:
                jobs.append((section, patient, patient_path(dst / SPLITS[section], patient.name)))
            except ValueError as err:
                raise ValueError(f"{patient}: {err}") from None
    earlier = _earlier_dataset(dst / "dataset.json", overwrite)
    converted: dict[str, list[dict]] = {s: [] for s in sources}
    excluded: dict[str, list[str]] = {s: [] for s in sources}
    malformed: dict[str, dict[str, str]] = {s: {} for s in sources}
    dst.mkdir(parents=True, exist_ok=True)
    for section, patient, target in tqdm(jobs, desc="convert-openkbp", unit="patient"):
        with_dose = section != "test" or (patient / "dose.csv").is_file()
        missing = [f for f in _REQUIRED + ("dose.csv",) * with_dose if not (patient / f).is_file()]
        if missing:
            logger.warning(f"{patient}: no {', '.join(missing)}; patient skipped")
            excluded[section].append(patient.name)
            continue
        rel = f"{SPLITS[section]}/{patient.name}"
        tmp = dst / f".tmp-{SPLITS[section]}-{patient.name}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        try:
            spacing = _convert_patient(patient, tmp, with_dose)
            target.parent.mkdir(exist_ok=True)
            shutil.rmtree(target, ignore_errors=True)
            os.replace(tmp, target)
        except ValueError as err:
            logger.error(f"{err}; patient skipped")
            malformed[section][patient.name] = str(err)
            continue
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        keys = ("ct",) + (DOSE_KEY,) * with_dose + ("possible_dose_mask", "structures")
        entry = {"id": patient.name, **{k: f"{rel}/{k}.nii.gz" for k in keys}, "voxel_dimensions": spacing}
        converted[section].append(entry)

    problems = [problem for section in malformed.values() for problem in section.values()]
    summary = {s: [e["id"] for e in entries] for s, entries in converted.items()}
    sections, skipped, bad = _merge(earlier, converted, excluded, malformed)
    folders = ", ".join(f"{SPLITS[s]}-pats" for s in sections)
    metadata = dict(_METADATA, source_format=_METADATA["source_format"].format(folders))
    if any(bad.values()):
        metadata["excluded_malformed"] = bad
    dataset = dict(metadata, excluded_incomplete=skipped, **sections)
    write_atomic(dst / "dataset.json", lambda p: p.write_text(json.dumps(dataset, indent=1)))
    if problems:
        raise ValueError(
            f"{len(problems)} patient(s) not converted, the others are listed in {dst / 'dataset.json'}: "
            + "; ".join(problems)
        )
    counts = ", ".join(f"{s} {len(ids)} (excluded {len(excluded[s])})" for s, ids in summary.items())
    logger.info(f"converted {counts} -> {dst / 'dataset.json'}")
    return {"converted": summary, "excluded": excluded, "dataset": str(dst / "dataset.json")}
