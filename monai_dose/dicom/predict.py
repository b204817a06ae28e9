"""``predict-dicom``: CT and RTSTRUCT in; dose predicted on the model grid; RTDOSE, NIfTI and DVH out."""

from __future__ import annotations

import csv
import json
import logging
import os
import tempfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from pydicom.dataset import Dataset
from scipy import ndimage

from monai_dose.data.openkbp import AXES_RAS, GRID_SHAPE, STRUCTURES, TARGETS
from monai_dose.inference import DosePredictor
from monai_dose.metrics import cumulative_dvh, dvh_metrics
from monai_dose.transforms import HU_OFFSET, MaskDose
from monai_dose.utils import check_writable

from .io import (
    CTSeries,
    StructureSet,
    read_ct_series,
    read_rtplan,
    read_rtstruct,
    referenced_series_uid,
    write_rtdose,
)
from .names import BODY_PATTERN, RoiMapping, load_name_map, map_roi_names, normalise_roi_name

logger = logging.getLogger(__name__)

MODEL_SPACING_MM: tuple[float, float, float] = (3.906, 3.906, 2.5)
"""Voxel size of the model grid: the most common OpenKBP voxel size."""
MODEL_AXES = np.diag([-1.0, -1.0, 1.0]) @ AXES_RAS
"""Patient (LPS) direction of each model-grid axis, as columns: the OpenKBP array axes (:data:`AXES_RAS`)."""
BODY_THRESHOLD_HU = -400.0
"""Without a body ROI, the body is the largest connected region above this CT number."""
DVH_BIN_GY = 0.1
DVH_CONVENTION = "voxel masks on the CT grid (rt-utils rasterisation), no partial volumes"
Predictor = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def model_grid(ct: CTSeries, target_centre: np.ndarray) -> np.ndarray:
    """Voxel-to-patient affine of the 128^3 model grid (:data:`MODEL_SPACING_MM`, axes :data:`MODEL_AXES`).

    The grid is centred on ``target_centre`` (LPS, mm), then moved as little as needed along each axis to lie
    inside the CT, or, where the CT is shorter than the grid, to cover the whole CT. A CT that already is a
    128^3 grid with the model's spacing and axes thus maps onto the model grid voxel for voxel.
    """
    rotation = MODEL_AXES * np.asarray(MODEL_SPACING_MM)
    corners = np.array(np.meshgrid(*[(0, n - 1) for n in ct.hu.shape], indexing="ij")).reshape(3, -1)
    corners = np.linalg.solve(rotation, ct.affine[:3, :3] @ corners + ct.affine[:3, 3:])  # in model voxels
    first, last = corners.min(axis=1), corners.max(axis=1) - (np.asarray(GRID_SHAPE) - 1)
    start = np.linalg.solve(rotation, target_centre) - (np.asarray(GRID_SHAPE) - 1) / 2
    start = np.clip(start, np.minimum(first, last), np.maximum(first, last))
    affine = np.eye(4)
    affine[:3, :3], affine[:3, 3] = rotation, rotation @ start
    return affine


def resample(
    image: np.ndarray, source: np.ndarray, target: np.ndarray, shape: tuple[int, ...], order: int
) -> np.ndarray:
    """``image`` (voxel-to-patient affine ``source``) on the grid ``target``/``shape``, zero outside it.

    ``order`` 0 (nearest) for masks, 1 (linear) for CT and dose.
    """
    matrix = np.linalg.solve(source, target)
    return ndimage.affine_transform(image, matrix, output_shape=shape, order=order, mode="grid-constant", cval=0.0)


def body_mask(hu: np.ndarray) -> np.ndarray:
    """The largest connected region above :data:`BODY_THRESHOLD_HU`, holes filled slice by slice."""
    labels, n = ndimage.label(hu > BODY_THRESHOLD_HU)
    if n == 0:
        return np.zeros(hu.shape, dtype=bool)
    body = labels == np.argmax(np.bincount(labels.ravel())[1:]) + 1
    return np.stack([ndimage.binary_fill_holes(body[..., k]) for k in range(body.shape[2])], axis=-1)


def dvh_tables(
    dose: np.ndarray, masks: Mapping[str, np.ndarray], spacing: tuple[float, float, float]
) -> tuple[list[list], dict[str, float | None]]:
    """Cumulative DVH table (header, then one row per 0.1 Gy) and OpenKBP DVH metrics, from CT-grid voxels."""
    levels = np.arange(0, dose.max() + DVH_BIN_GY, DVH_BIN_GY)
    curves = [cumulative_dvh(dose.flat[i], levels - 1e-6) for i in masks.values()]  # 1e-6: float steps of levels
    table = [["dose_gy", *(f"{s} (% volume)" for s in masks)]]
    table += [[round(float(d), 3), *(round(float(c[n]), 4) for c in curves)] for n, d in enumerate(levels)]
    # the metrics on the structures' bounding box: no 10-channel stack the size of the CT
    crop = tuple(slice(a.min(), a.max() + 1) for a in np.unravel_index(np.concatenate([*masks.values()]), dose.shape))
    stack = np.zeros((len(STRUCTURES), *dose[crop].shape), dtype=bool)
    for structure, indices in masks.items():
        ijk = np.unravel_index(indices, dose.shape)
        stack[(STRUCTURES.index(structure), *(i - c.start for i, c in zip(ijk, crop, strict=True)))] = True
    return table, dvh_metrics(dose[crop], stack, spacing)


def _body(ct: CTSeries, structure_set: StructureSet, mapping: RoiMapping) -> tuple[np.ndarray, str]:
    """The body on the CT grid: the first non-empty ROI named as :data:`BODY_PATTERN`, else :func:`body_mask`;
    with a description of the rule used."""
    for name in structure_set.names:
        if BODY_PATTERN.match(normalise_roi_name(name)) and (mask := structure_set.mask(name)).any():
            mapping.ignored[name] = "body"
            return mask, f"ROI '{name}'"
    return body_mask(ct.hu), f"CT > {BODY_THRESHOLD_HU:g} HU, largest connected region, holes filled"


def _named_mask(structure_set: StructureSet, name: str) -> np.ndarray:
    """The mask of ROI ``name``; ``ValueError`` when there is no such ROI or it has no contour."""
    if name not in structure_set.names or not (mask := structure_set.mask(name)).any():
        raise ValueError(f"{structure_set.path}: no contour of ROI '{name}' (possible-dose mask)")
    return mask


def _structure_masks(structure_set: StructureSet, mapping: RoiMapping) -> dict[str, np.ndarray]:
    """Flat CT-grid voxel indices of each found structure (union of its ROIs); empty ones move to ignored."""
    masks = {}
    for structure, rois in list(mapping.found.items()):
        mask = np.logical_or.reduce([structure_set.mask(roi) for roi in rois])
        if mask.any():
            masks[structure] = np.flatnonzero(mask)
        else:
            del mapping.found[structure]
            mapping.ignored.update(dict.fromkeys(rois, f"no contour ({structure})"))
    if not any(t in masks for t in TARGETS):
        raise ValueError(
            f"{structure_set.path}: no target contour (none of the ROIs {structure_set.names} is a non-empty "
            f"{', '.join(TARGETS)}; map the targets with a name map)"
        )
    return masks


def _model_inputs(
    ct: CTSeries, masks: Mapping[str, np.ndarray], body: np.ndarray, possible_dose: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Model grid affine and, on that grid, the CT (HU + :data:`~monai_dose.transforms.HU_OFFSET`, 0 outside the
    body as in OpenKBP), structures (channel last) and possible-dose mask."""
    target_voxels = np.unravel_index(np.concatenate([masks[t] for t in TARGETS if t in masks]), ct.hu.shape)
    target_centre = np.array([(a.min() + a.max()) / 2 for a in target_voxels])
    grid = model_grid(ct, ct.affine[:3, :3] @ target_centre + ct.affine[:3, 3])
    structures = np.zeros((*GRID_SHAPE, len(STRUCTURES)), dtype=np.uint8)
    for structure, indices in masks.items():
        mask = np.zeros(ct.hu.shape, dtype=np.uint8)
        mask.flat[indices] = 1
        structures[..., STRUCTURES.index(structure)] = resample(mask, ct.affine, grid, GRID_SHAPE, order=0)
    model_ct = np.clip(resample((ct.hu + HU_OFFSET) * body, ct.affine, grid, GRID_SHAPE, order=1), 0, None)
    model_mask = resample(possible_dose.astype(np.uint8), ct.affine, grid, GRID_SHAPE, order=0)
    return grid, model_ct, structures, model_mask


def _coverage(
    masks: Mapping[str, np.ndarray], ct: CTSeries, grid: np.ndarray, possible_dose: np.ndarray
) -> dict[str, dict[str, float]]:
    """Fraction of each structure's CT voxels inside the model grid and inside the possible-dose mask (no dose
    outside either; warned below 98%)."""
    to_model = np.linalg.solve(grid, ct.affine)
    coverage = {}
    for structure, indices in masks.items():
        ijk = to_model[:3, :3] @ np.stack(np.unravel_index(indices, ct.hu.shape)) + to_model[:3, 3:]
        within = ((ijk > -0.5) & (ijk < np.asarray(GRID_SHAPE)[:, None] - 0.5)).all(axis=0)
        coverage[structure] = {
            "model_grid": round(float(within.mean()), 4),
            "possible_dose_mask": round(float(possible_dose.flat[indices].mean()), 4),
        }
        for region, fraction in coverage[structure].items():
            if fraction < 0.98:
                logger.warning(
                    "%.0f%% of %s lies outside the %s: no dose there",
                    100 - 100 * fraction,
                    structure,
                    region.replace("_", " "),
                )
    return coverage


def write_prediction(
    out_dir: Path, ct: CTSeries, dose: np.ndarray, dvh: list[list], report: dict, plan: Dataset | None
) -> dict[str, Path]:
    """Write the outputs into a temporary folder beside ``out_dir``, then move them into ``out_dir``."""
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    written = {}
    with tempfile.TemporaryDirectory(dir=out_dir.parent, prefix=f".{out_dir.name}.") as tmp:
        staged = Path(tmp)
        write_rtdose(dose, ct, staged / "RTDOSE.dcm", "monai_dose predicted dose (research use)", plan)
        ras = np.diag([-1.0, -1.0, 1.0, 1.0]) @ ct.affine
        nib.save(nib.Nifti1Image(dose.astype(np.float32), ras), staged / "dose.nii.gz")
        with open(staged / "dvh.csv", "w", newline="") as f:
            csv.writer(f).writerows(dvh)
        (staged / "report.json").write_text(json.dumps(report, indent=2))
        out_dir.mkdir(exist_ok=True)
        for file in sorted(staged.iterdir()):
            os.replace(file, out_dir / file.name)
            written[file.name] = out_dir / file.name
    return written


@dataclass
class DicomPatient:
    """A CT series with its RTSTRUCT as ``predict-dicom`` reads them: the structures (flat CT-grid voxel indices,
    see :func:`read_dicom_patient`), the body and the possible-dose mask, with the rules that gave them."""

    ct: CTSeries
    structure_set: StructureSet
    mapping: RoiMapping
    masks: dict[str, np.ndarray]
    body: np.ndarray
    body_rule: str
    possible_dose: np.ndarray
    possible_dose_rule: str


def read_dicom_patient(
    ct_dir: str | os.PathLike,
    rtstruct: str | os.PathLike,
    name_map: str | os.PathLike | Mapping[str, str | None] | None = None,
    possible_dose_mask: str | None = None,
    allow_patient_mismatch: bool = False,
) -> DicomPatient:
    """Read and check a CT series and its RTSTRUCT, map the ROI names and rasterise the structures, body and
    possible-dose mask on the CT grid (arguments and errors as :func:`predict_dicom`)."""
    if name_map is not None and not isinstance(name_map, Mapping):
        name_map = load_name_map(name_map)
    structure_ds = read_rtstruct(rtstruct)
    ct = read_ct_series(ct_dir, series_uid=referenced_series_uid(structure_ds))
    structure_set = StructureSet(structure_ds, rtstruct, ct, allow_patient_mismatch)
    mapping = map_roi_names(structure_set.names, name_map)
    masks = _structure_masks(structure_set, mapping)
    body, body_rule = _body(ct, structure_set, mapping)
    possible_dose, possible_dose_rule = body, body_rule
    if possible_dose_mask is not None:
        possible_dose, possible_dose_rule = (
            _named_mask(structure_set, possible_dose_mask),
            f"ROI '{possible_dose_mask}'",
        )
        mapping.ignored[possible_dose_mask] = "possible-dose mask"
    logger.info("structures found: %s", mapping.found)
    logger.info("structures missing: %s", mapping.missing)
    logger.info("ROIs ignored: %s", mapping.ignored)
    logger.info("body: %s; possible-dose mask: %s", body_rule, possible_dose_rule)
    return DicomPatient(ct, structure_set, mapping, masks, body, body_rule, possible_dose, possible_dose_rule)


def predict_on_ct(patient: DicomPatient, bundle: str | os.PathLike | Predictor) -> tuple[np.ndarray, dict]:
    """The dose predicted on the model grid and interpolated onto the CT grid (Gy, zero outside the possible-dose
    mask), with the report entries of the model grid and the fraction of each structure inside it."""
    grid, model_ct, structures, model_mask = _model_inputs(
        patient.ct, patient.masks, patient.body, patient.possible_dose
    )
    coverage = _coverage(patient.masks, patient.ct, grid, patient.possible_dose)
    predictor = bundle if callable(bundle) else DosePredictor.from_bundle(bundle)
    grid_spacing = {"voxel_spacing": MODEL_SPACING_MM} if isinstance(predictor, DosePredictor) else {}
    model_dose = np.asarray(predictor(model_ct, structures, model_mask, **grid_spacing), dtype=np.float32)
    dose = resample(model_dose, grid, patient.ct.affine, patient.ct.hu.shape, order=1)
    dose = MaskDose()(dose[None], patient.possible_dose[None])[0]
    return dose, {"model_grid_affine_lps_mm": grid.round(4).tolist(), "fraction_inside": coverage}


def predict_dicom(
    ct_dir: str | os.PathLike,
    rtstruct: str | os.PathLike,
    bundle: str | os.PathLike | Predictor,
    out_dir: str | os.PathLike,
    name_map: str | os.PathLike | Mapping[str, str | None] | None = None,
    possible_dose_mask: str | None = None,
    rtplan: str | os.PathLike | None = None,
    allow_patient_mismatch: bool = False,
) -> dict[str, Path]:
    """Predict the dose of a DICOM CT series with its RTSTRUCT; write RTDOSE, NIfTI, DVH and a report.

    All inputs are read and checked, and the dose predicted, before anything is written; the outputs are
    staged in a temporary folder beside ``out_dir`` and moved in at the end, so a failure leaves ``out_dir``
    untouched. Outputs: ``RTDOSE.dcm`` and ``dose.nii.gz`` (Gy, on the CT grid), ``dvh.csv`` (cumulative DVH
    of each found structure: % volume receiving at least each 0.1 Gy step, from voxel masks on the CT grid),
    ``report.json`` (ROIs found, missing and ignored, the body and possible-dose mask rules, the model grid,
    the fraction of each structure inside the grid and the mask, OpenKBP DVH metrics).

    Args:
        ct_dir: folder of the CT series.
        rtstruct: RTSTRUCT file contoured on that CT.
        bundle: bundle folder, or a :class:`~monai_dose.inference.DosePredictor` (any callable
            ``(ct, structures, possible_dose_mask) -> dose`` on the model grid).
        out_dir: output folder.
        name_map: JSON file or mapping ``{"ROI name": "Structure" or None}`` applied before the default rules.
        possible_dose_mask: ROI to use as possible-dose mask (default: the body).
        rtplan: RT Plan of the patient that the RTDOSE references (ReferencedRTPlanSequence), so that planning
            systems link the dose to it on import.
        allow_patient_mismatch: accept an RTSTRUCT whose PatientID is not the CT's (with a warning).

    Returns:
        output file name -> path.

    Raises:
        FileNotFoundError: a missing input.
        PermissionError: ``out_dir`` (or the folder it is to be made in) is not writable; checked first.
        ValueError: a bad input (unreadable files, CT series problems, an RTSTRUCT of another PatientID, a frame
            of reference differing from the CT's, no target contour, an RT Plan of another patient or frame of
            reference), naming the problem and the file.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: exists and is not a folder")
    for folder in (out_dir.parent, out_dir) if out_dir.is_dir() else (out_dir.parent,):
        check_writable(folder)
    patient = read_dicom_patient(ct_dir, rtstruct, name_map, possible_dose_mask, allow_patient_mismatch)
    plan = None if rtplan is None else read_rtplan(rtplan, patient.ct)
    dose, model_report = predict_on_ct(patient, bundle)

    dvh, metrics = dvh_tables(dose, patient.masks, patient.ct.spacing)
    report = {
        "ct_series": str(patient.ct.slices[0].SeriesInstanceUID),
        "rtstruct": str(patient.structure_set.path),
        "rtplan": None if rtplan is None else str(rtplan),
        "structures_found": patient.mapping.found,
        "structures_missing": patient.mapping.missing,
        "rois_ignored": patient.mapping.ignored,
        "body": patient.body_rule,
        "possible_dose_mask": patient.possible_dose_rule,
        **model_report,
        "dvh_convention": DVH_CONVENTION,
        "dvh_metrics_gy": metrics,
    }
    written = write_prediction(out_dir, patient.ct, dose, dvh, report, plan)
    logger.info("wrote %s", ", ".join(str(p) for p in written.values()))
    return written
