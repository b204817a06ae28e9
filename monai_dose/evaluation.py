"""Evaluate predicted doses on the OpenKBP scores: ``scores.json``, a per-patient CSV and DVH plots."""

from __future__ import annotations

import csv
import json
import logging
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from .data.openkbp import DOSE_KEY, load_openkbp_datalist
from .metrics.openkbp import DVH_METRICS, dose_error, dvh_abs_differences, dvh_metrics, dvh_score
from .plots import DVHCurves, dvh_curves, plot_dvh
from .utils import check_writable, patient_path, write_atomic

logger = logging.getLogger(__name__)

NIFTI_SUFFIX = ".nii.gz"


@dataclass
class PatientEvaluation:
    """OpenKBP scores of one patient's predicted dose, with the DVH curves of its plot."""

    id: str
    dose_error: float
    reference_dvh_metrics: dict[str, float | None]
    prediction_dvh_metrics: dict[str, float | None]
    reference_dvh: DVHCurves
    prediction_dvh: DVHCurves


def evaluate_patient(
    patient_id: str,
    prediction: np.ndarray,
    reference: np.ndarray,
    possible_dose_mask: np.ndarray,
    structures: np.ndarray,
    voxel_spacing: Sequence[float],
) -> PatientEvaluation:
    """Score one predicted dose against the reference dose.

    Args:
        patient_id: patient name, used as a key in the outputs.
        prediction: (H, W, D) predicted dose in Gy.
        reference: (H, W, D) reference dose in Gy.
        possible_dose_mask: (H, W, D) mask of the voxels where dose may be non-zero.
        structures: (10, H, W, D) ROI masks in :data:`~monai_dose.data.openkbp.STRUCTURES` order.
        voxel_spacing: voxel size in mm.
    """
    return PatientEvaluation(
        id=patient_id,
        dose_error=dose_error(prediction, reference, possible_dose_mask),
        reference_dvh_metrics=dvh_metrics(reference, structures, voxel_spacing),
        prediction_dvh_metrics=dvh_metrics(prediction, structures, voxel_spacing),
        reference_dvh=dvh_curves(reference, structures),
        prediction_dvh=dvh_curves(prediction, structures),
    )


def _csv_rows(results: Sequence[PatientEvaluation]) -> list[dict[str, object]]:
    """Per patient: dose error, mean DVH error, then reference, prediction and difference of each metric."""
    rows = []
    for r in results:
        differences = dvh_abs_differences(r.reference_dvh_metrics, r.prediction_dvh_metrics)
        row: dict[str, object] = {
            "id": r.id,
            "dose_error": r.dose_error,
            "dvh_error": float(np.nanmean(differences)) if np.isfinite(differences).any() else None,
        }
        for key, difference in zip(DVH_METRICS, differences, strict=True):
            row[f"{key}/reference"] = r.reference_dvh_metrics[key]
            row[f"{key}/prediction"] = r.prediction_dvh_metrics[key]
            row[f"{key}/abs_difference"] = None if np.isnan(difference) else float(difference)
        rows.append(row)
    return rows


def write_evaluation(results: Sequence[PatientEvaluation], out_dir: str | Path) -> dict:
    """Write ``scores.json``, ``scores_per_patient.csv`` and ``dvh/<id>.png`` in ``out_dir``; return scores.

    ``scores.json`` holds ``dose_score`` and ``dvh_score`` (Gy), ``dose_error_per_patient`` and each patient's
    ``reference_dvh_metrics`` and ``prediction_dvh_metrics`` (``null`` for absent ROIs), keyed like the
    output of the official OpenKBP evaluator.
    """
    if not results:
        raise ValueError("no patients to write")
    out_dir = Path(out_dir)
    plots = {r.id: _dvh_plot_file(out_dir, r.id) for r in results}  # refuses ids that could lead outside out_dir
    scores = {
        "dose_score": float(np.mean([r.dose_error for r in results])),
        "dvh_score": dvh_score([r.reference_dvh_metrics for r in results], [r.prediction_dvh_metrics for r in results]),
        "dose_error_per_patient": {r.id: r.dose_error for r in results},
        "reference_dvh_metrics": {r.id: r.reference_dvh_metrics for r in results},
        "prediction_dvh_metrics": {r.id: r.prediction_dvh_metrics for r in results},
    }
    write_atomic(out_dir / "scores.json", lambda p: p.write_text(json.dumps(scores, indent=1) + "\n"))

    rows = _csv_rows(results)

    def write_csv(path: Path) -> None:
        with path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)

    write_atomic(out_dir / "scores_per_patient.csv", write_csv)
    for r in results:
        dvhs = {"reference": r.reference_dvh, "prediction": r.prediction_dvh}
        write_atomic(plots[r.id], lambda p, d=dvhs, t=r.id: plot_dvh(d, p, title=t))
    return scores


def _dvh_plot_file(out_dir: Path, patient_id: str) -> Path:
    """``out_dir/dvh/<patient_id>.png``, refusing a ``patient_id`` that is not a single file name."""
    return patient_path(out_dir / "dvh", patient_id).with_name(f"{patient_id}.png")


def _hidden(path: Path) -> bool:
    """Whether ``path`` is hidden; a hidden NIfTI file, such as the temporary file of a killed writer, is skipped with
    a warning."""
    if not path.name.startswith("."):
        return False
    if path.name.endswith(NIFTI_SUFFIX):
        logger.warning(f"{path}: hidden file skipped (the temporary file of an interrupted run?)")
    return True


def find_predictions(predictions_dir: str | Path) -> dict[str, Path]:
    """Predicted dose file per patient: ``<dir>/<id>/`` holding one ``.nii.gz``, or ``<dir>/<id>.nii.gz``; hidden
    files and folders are skipped."""
    predictions_dir = Path(predictions_dir)
    if not predictions_dir.is_dir():
        raise FileNotFoundError(f"{predictions_dir}: not a folder")
    found: dict[str, Path] = {}
    for entry in sorted(predictions_dir.iterdir()):
        if _hidden(entry):
            continue
        if entry.is_dir():
            files = [f for f in sorted(entry.glob(f"*{NIFTI_SUFFIX}")) if not _hidden(f)]
            if len(files) != 1:
                raise ValueError(
                    f"{entry}: patient {entry.name} needs one {NIFTI_SUFFIX} prediction, found {len(files)}"
                )
            patient_id, path = entry.name, files[0]
        elif entry.name.endswith(NIFTI_SUFFIX):
            patient_id, path = entry.name[: -len(NIFTI_SUFFIX)], entry
        else:
            continue
        if patient_id in found:
            raise ValueError(f"{predictions_dir}: two predictions of patient {patient_id}: {found[patient_id]}, {path}")
        found[patient_id] = path
    if not found:
        raise ValueError(f"{predictions_dir}: no predictions found (<id>/*{NIFTI_SUFFIX} or <id>{NIFTI_SUFFIX})")
    return found


def _grid(image: nib.spatialimages.SpatialImage) -> str:
    affine = np.round(image.affine, 3)
    return f"shape {image.shape}, affine rows {affine[:3].tolist()}"


def _read(patient_id: str, path: str | Path) -> tuple[nib.spatialimages.SpatialImage, np.ndarray]:
    """A NIfTI image and its array; an unreadable file (empty, truncated, not NIfTI) is a ``ValueError`` naming
    the patient and the file."""
    try:
        image = nib.load(path)
        return image, np.asanyarray(image.dataobj)
    except (OSError, EOFError, zlib.error, nib.filebasedimages.ImageFileError) as err:
        raise ValueError(
            f"{patient_id}: {path}: unreadable, truncated or not NIfTI ({type(err).__name__}: {err})"
        ) from err


def _check_dose(patient_id: str, path: str | Path, dose: np.ndarray) -> None:
    """Refuse a dose holding NaN, infinite or negative values, which would give meaningless scores."""
    non_finite = np.count_nonzero(~np.isfinite(dose))
    if non_finite:
        raise ValueError(f"{patient_id}: {path}: {non_finite} NaN or infinite dose value(s)")
    negative = np.count_nonzero(dose < 0)
    if negative:
        raise ValueError(f"{patient_id}: {path}: {negative} negative dose value(s), down to {dose.min():.4g} Gy")


def _load_patient(item: dict, prediction_file: Path) -> PatientEvaluation:
    """Load the reference data of a datalist item and its predicted dose, checking they share one grid and that both
    doses are finite and non-negative."""
    patient_id = item["id"]
    if DOSE_KEY not in item:
        raise ValueError(f"{patient_id}: no reference dose in the datalist")
    reference, reference_dose = _read(patient_id, item[DOSE_KEY])
    prediction, predicted_dose = _read(patient_id, prediction_file)
    if prediction.shape != reference.shape or not np.allclose(prediction.affine, reference.affine, atol=1e-3):
        raise ValueError(
            f"{patient_id}: the grid of prediction {prediction_file} ({_grid(prediction)}) differs from "
            f"that of the reference dose {item[DOSE_KEY]} ({_grid(reference)})"
        )
    _check_dose(patient_id, item[DOSE_KEY], reference_dose)
    _check_dose(patient_id, prediction_file, predicted_dose)
    spacing = item.get("voxel_dimensions", reference.header.get_zooms()[:3])
    return evaluate_patient(
        patient_id,
        prediction=np.asarray(predicted_dose, dtype=np.float64),
        reference=np.asarray(reference_dose, dtype=np.float64),
        possible_dose_mask=_read(patient_id, item["possible_dose_mask"])[1],
        structures=np.moveaxis(_read(patient_id, item["structures"])[1], -1, 0),
        voxel_spacing=spacing,
    )


def evaluate_predictions(
    data_dir: str | Path, predictions_dir: str | Path, out_dir: str | Path, split: str = "validation"
) -> dict:
    """Score every predicted dose of ``predictions_dir`` against the reference doses of ``data_dir``.

    Args:
        data_dir: OpenKBP NIfTI dataset folder (with ``dataset.json``).
        predictions_dir: ``<id>/`` folders holding one ``.nii.gz`` file each, or ``<id>.nii.gz`` files, in Gy
            on the grid of the reference dose.
        out_dir: output folder, see :func:`write_evaluation`.
        split: datalist section holding the patients.

    Returns:
        the scores written to ``out_dir/scores.json``, also printed with ``out_dir``.

    Raises:
        ValueError: a patient id of the datalist is not a single file name, or a prediction is unreadable, on
            another grid, or holds NaN, infinite or negative doses (the message names the patient and the file);
            no file is written then.
        PermissionError: ``out_dir`` cannot be written, found before any scoring.
    """
    items = {item["id"]: item for item in load_openkbp_datalist(data_dir, split)}
    for patient_id in items:
        try:
            _dvh_plot_file(Path(out_dir), patient_id)
        except ValueError as err:
            raise ValueError(f"{Path(data_dir, 'dataset.json')}: '{split}' list: {err}") from None
    predictions = find_predictions(predictions_dir)
    unknown = sorted(set(predictions) - set(items))
    if unknown:
        raise ValueError(f"{predictions_dir}: patients not in the '{split}' split of {data_dir}: {', '.join(unknown)}")
    check_writable(out_dir)
    patients = [pid for pid in items if pid in predictions]
    missing = [pid for pid in items if pid not in predictions]
    if missing:
        logger.warning(
            f"{predictions_dir}: predictions for {len(patients)} of the {len(items)} '{split}' patients; the scores "
            f"are of these only, not comparable with scores of the whole split (missing: {', '.join(missing)})"
        )
    with tqdm(patients, desc="evaluate", unit="patient") as progress:  # closed (a new line) on errors too
        results = [_load_patient(items[pid], predictions[pid]) for pid in progress]
    scores = write_evaluation(results, out_dir)
    print(f"dose score {scores['dose_score']:.4f} Gy, DVH score {scores['dvh_score']:.4f} Gy -> {out_dir}")
    return scores
