"""``predict-dicom``: CT and RTSTRUCT in; dose predicted through the dose pipeline onto the CT grid; RTDOSE, NIfTI and
DVH out."""

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
import torch
from monai.data import MetaTensor
from pydicom.dataset import Dataset
from scipy import ndimage

from monai_dose.data.openkbp import STRUCTURES, TARGETS
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

BODY_THRESHOLD_HU = -400.0
"""Without a body ROI, the body is the largest connected region above this CT number."""
DVH_BIN_GY = 0.1
DVH_CONVENTION = "voxel masks on the CT grid (rt-utils rasterisation), no partial volumes"
Predictor = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


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


LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])
"""DICOM patient coordinates (LPS) to NIfTI/MONAI world coordinates (RAS)."""


def _model_inputs(patient: DicomPatient) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """On the CT grid: the CT as the model reads it (HU + :data:`~monai_dose.transforms.HU_OFFSET`, 0 outside the
    body as in OpenKBP), the structures (channel last) and the possible-dose mask."""
    ct = np.clip((patient.ct.hu + HU_OFFSET) * patient.body, 0, None).astype(np.float32)
    structures = np.zeros((*patient.ct.hu.shape, len(STRUCTURES)), dtype=np.uint8)
    for structure, indices in patient.masks.items():
        structures[(*np.unravel_index(indices, patient.ct.hu.shape), STRUCTURES.index(structure))] = 1
    return ct, structures, patient.possible_dose.astype(np.uint8)


def _coverage(masks: Mapping[str, np.ndarray], possible_dose: np.ndarray) -> dict[str, dict[str, float]]:
    """Fraction of each structure's CT voxels inside the possible-dose mask (no dose outside it; warned below
    98%)."""
    coverage = {}
    for structure, indices in masks.items():
        fraction = round(float(possible_dose.flat[indices].mean()), 4)
        coverage[structure] = {"possible_dose_mask": fraction}
        if fraction < 0.98:
            logger.warning(
                "%.0f%% of %s lies outside the possible-dose mask: no dose there", 100 - 100 * fraction, structure
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
        nib.save(nib.Nifti1Image(dose.astype(np.float32), LPS_TO_RAS @ ct.affine), staged / "dose.nii.gz")
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
    """The dose predicted on the CT grid (Gy, zero outside the possible-dose mask), with the report entry of the
    fraction of each structure inside the possible-dose mask.

    A :class:`~monai_dose.inference.DosePredictor` (or a bundle's) gets the inputs as ``MetaTensor`` with the CT's
    affine, so its pipeline (:func:`~monai_dose.transforms.patient_preprocessing`) reorients and resamples them to
    the model's geometry and inverts that for the dose, as for NIfTI input; any other callable gets the CT-grid
    arrays."""
    ct, structures, possible_dose = _model_inputs(patient)
    predictor = bundle if callable(bundle) else DosePredictor.from_bundle(bundle)
    if isinstance(predictor, DosePredictor):
        affine = torch.as_tensor(LPS_TO_RAS @ patient.ct.affine)
        sources = (patient.ct.folder, patient.structure_set.path, patient.structure_set.path)  # named in errors
        ct, structures, possible_dose = (
            MetaTensor(a, affine=affine, meta={"filename_or_obj": str(f)})
            for a, f in zip((ct, structures, possible_dose), sources, strict=True)
        )
    dose = np.asarray(predictor(ct, structures, possible_dose), dtype=np.float32)
    dose = MaskDose()(dose[None], patient.possible_dose[None])[0]
    return dose, {"fraction_inside": _coverage(patient.masks, patient.possible_dose)}


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
    ``report.json`` (ROIs found, missing and ignored, the body and possible-dose mask rules, the
    fraction of each structure inside the possible-dose mask, OpenKBP DVH metrics).

    Args:
        ct_dir: folder of the CT series.
        rtstruct: RTSTRUCT file contoured on that CT.
        bundle: bundle folder, or a :class:`~monai_dose.inference.DosePredictor` (any callable
            ``(ct, structures, possible_dose_mask) -> dose`` on the CT grid, see :func:`predict_on_ct`).
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
