"""``plan-qa``: a treatment plan's dose beside the dose the model predicts as achievable for the same anatomy.

Organ by organ the report asks: does the plan meet the clinical goals (:mod:`monai_dose.qa.protocol`), and does it
spare less than the prediction ("room to improve") or cover the targets less than the prediction ("under-covered")?
"""

from __future__ import annotations

import csv
import datetime
import json
import logging
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from tqdm import tqdm

from monai_dose.data.openkbp import DOSE_KEY, OARS, STRUCTURES, TARGETS, patient_files, patient_folder_datalist
from monai_dose.dicom.io import CTSeries, read_rtdose
from monai_dose.dicom.predict import (
    DVH_CONVENTION,
    LPS_TO_RAS,
    Predictor,
    dvh_tables,
    predict_on_ct,
    read_dicom_patient,
    resample,
    write_prediction,
)
from monai_dose.inference import DosePredictor, load_patient
from monai_dose.metrics import DVH_METRICS
from monai_dose.transforms import CheckGridsd, save_dose
from monai_dose.utils import check_writable, patient_path, write_atomic

from .protocol import Goal, Metric, Protocol, load_protocol, parse_metric
from .report import display_spacing, dvh_figure, render_report, render_summary, slice_figures, to_display

logger = logging.getLogger(__name__)

ROOM_TO_IMPROVE = "room to improve"
UNDER_COVERED = "under-covered"
TRUST_FACTOR = 2.0
"""A flag whose plan - predicted difference is within this many times the model's mean absolute validation error
for that metric is marked as within the model's typical error."""
MODEL_ERRORS = Path("docs") / "validation_dvh_errors.json"
"""Per-ROI validation errors of a bundle's model, relative to the bundle folder."""
_NIFTI_CONVENTION = "voxel masks on the dose grid, no partial volumes (OpenKBP)"
_ERRORS = (ValueError, FileNotFoundError, RuntimeError, OSError)
SUMMARY_COLUMNS = [
    "patient",
    "status",
    "flags",
    "goals_failed",
    "room_to_improve",
    "under_covered",
    "largest_difference_gy",
    "flagged",
]
"""Columns of ``summary.csv``."""


@dataclass
class PlanDoses:
    """A plan's dose and the predicted dose of one patient on one grid, with the CT and the structures."""

    patient: str
    plan: np.ndarray
    """Gy."""
    predicted: np.ndarray
    """Gy."""
    ct_hu: np.ndarray
    masks: dict[str, np.ndarray]
    """Structure -> flat (C-order) voxel indices; only the contoured structures."""
    affine: np.ndarray
    """Voxel-to-world (RAS, mm)."""
    inputs: dict[str, str]
    dvh_convention: str

    @property
    def spacing(self) -> tuple[float, float, float]:
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]


@dataclass
class QAModel:
    """The predictor of a bundle with the model's mean absolute validation error (Gy) of each ``ROI/metric``."""

    predictor: Predictor
    name: str
    errors: dict[str, float]
    errors_file: str | None = None

    @classmethod
    def from_bundle(cls, bundle: str | os.PathLike | Predictor | QAModel) -> QAModel:
        """A bundle folder's :class:`~monai_dose.inference.DosePredictor` and :data:`MODEL_ERRORS` (none, with a
        warning, when the bundle lacks them); a predictor object has no known errors."""
        if isinstance(bundle, QAModel):
            return bundle
        if callable(bundle):
            return cls(bundle, type(bundle).__name__, {})
        path = Path(bundle) / MODEL_ERRORS
        errors = {}
        if path.is_file():
            errors = {k: float(v) for k, v in json.loads(path.read_text())["mean_abs_error_gy"].items()}
        else:
            logger.warning("%s: no validation errors of the model; the report cannot say how far to trust it", path)
        return cls(DosePredictor.from_bundle(bundle), str(bundle), errors, str(path) if errors else None)


def _row(
    roi: str, metric: Metric, doses: PlanDoses, margin_gy: float, errors: Mapping[str, float], goal: Goal | None
) -> dict:
    """One row of the report: plan and predicted value, goal, flag and the model's error for that metric."""
    row: dict = {"roi": roi, "metric": metric.key, "unit": metric.unit}
    if goal is not None:
        row.update(goal=goal.text, source=goal.source)
    if roi not in doses.masks:
        return {
            **row,
            "plan": None,
            "predicted": None,
            "plan_minus_predicted": None,
            "flag": None,
            "note": "ROI not contoured",
        }
    voxel_volume = float(np.prod(doses.spacing))
    plan, predicted = (metric(d.flat[doses.masks[roi]], voxel_volume) for d in (doses.plan, doses.predicted))
    difference = plan - predicted
    coverage = (metric.kind == "D" and not metric.in_cc and metric.value >= 50) or (goal is not None and not goal.upper)
    flag = None
    if metric.unit == "Gy" and roi in OARS and difference > margin_gy:
        flag = ROOM_TO_IMPROVE
    elif metric.unit == "Gy" and roi in TARGETS and coverage and -difference > margin_gy:
        flag = UNDER_COVERED
    error = errors.get(f"{roi}/{metric.key}")
    row.update(plan=plan, predicted=predicted, plan_minus_predicted=difference, flag=flag, model_error_gy=error)
    if flag is not None and error is not None:
        row["within_model_error"] = abs(difference) <= TRUST_FACTOR * error
    if goal is not None:
        row.update(plan_meets_goal=goal.met(plan), predicted_meets_goal=goal.met(predicted))
    return row


def compare(
    doses: PlanDoses,
    protocol: Protocol,
    margin_gy: float = 3.0,
    model_errors: Mapping[str, float] | None = None,
) -> dict:
    """The plan-QA report of ``doses``: a row per goal of ``protocol`` (``goals``) and per OpenKBP DVH metric of
    every contoured structure (``dvh_metrics``), each with the plan's and the predicted value, their difference,
    pass/fail against the goal, the flag (:data:`ROOM_TO_IMPROVE` where an OAR dose metric of the plan exceeds the
    prediction by more than ``margin_gy``, :data:`UNDER_COVERED` where a target coverage metric, D_x with x >= 50 %
    or a goal with a minimum, falls short of it by more than ``margin_gy``) and the model's validation error
    (``model_errors``, ``ROI/metric`` -> Gy); ``summary`` counts them."""
    errors = model_errors or {}
    goals = [_row(g.roi, g.metric, doses, margin_gy, errors, g) for g in protocol.goals]
    metrics = [
        _row(roi, parse_metric(name), doses, margin_gy, errors, None)
        for roi, name in (key.split("/") for key in DVH_METRICS)
        if roi in doses.masks
    ]
    flagged = [r for r in goals + metrics if r["flag"] is not None]
    summary = {
        "goals_failed": sum(r.get("plan_meets_goal") is False for r in goals),
        "goals_failed_by_prediction": sum(r.get("predicted_meets_goal") is False for r in goals),
        "room_to_improve": len({(r["roi"], r["metric"]) for r in flagged if r["flag"] == ROOM_TO_IMPROVE}),
        "under_covered": len({(r["roi"], r["metric"]) for r in flagged if r["flag"] == UNDER_COVERED}),
        "largest_difference_gy": max((abs(r["plan_minus_predicted"]) for r in flagged), default=0.0),
    }
    return {
        "patient": doses.patient,
        "created": datetime.datetime.now().isoformat(timespec="seconds"),
        "inputs": doses.inputs,
        "protocol": {"name": protocol.name, "file": str(protocol.path)},
        "margin_gy": margin_gy,
        "structures": list(doses.masks),
        "summary": summary,
        "goals": goals,
        "dvh_metrics": metrics,
        "dvh_convention": doses.dvh_convention,
    }


def _write_report(out_dir: Path, doses: PlanDoses, report: dict, model: QAModel, predicted_table: list) -> dict:
    """Figures, DVH tables, ``report.json`` and ``report.html`` (written last) in ``out_dir``; returns the report."""
    report.update(bundle=model.name, model_error={"file": model.errors_file, "trust_factor": TRUST_FACTOR})
    plan_table, _ = dvh_tables(doses.plan, doses.masks, doses.spacing)
    labels = np.zeros(doses.plan.shape, dtype=np.uint16)
    for structure, indices in doses.masks.items():
        labels.flat[indices] |= np.uint16(1 << STRUCTURES.index(structure))
    display = [to_display(v, doses.affine) for v in (doses.ct_hu, doses.plan, doses.predicted, labels)]
    slices, difference = slice_figures(*display, display_spacing(doses.affine), list(doses.masks))
    figures = {
        "dvh": dvh_figure(plan_table, predicted_table, doses.patient),
        "slices": slices,
        "difference": difference,
    }

    def table_writer(table: list) -> Callable[[Path], None]:
        def write(path: Path) -> None:
            with open(path, "w", newline="") as f:
                csv.writer(f).writerows(table)

        return write

    write_atomic(out_dir / "plan" / "dvh.csv", table_writer(plan_table))
    write_atomic(out_dir / "prediction" / "dvh.csv", table_writer(predicted_table))
    write_atomic(out_dir / "report.json", lambda p: p.write_text(json.dumps(report, indent=1) + "\n"))
    write_atomic(out_dir / "report.html", lambda p: p.write_text(render_report(report, figures)))
    return report


def read_plan_nifti(plan_dose: str | os.PathLike, ct_file: str | os.PathLike) -> np.ndarray:
    """The plan's dose (Gy) from a NIfTI file on the grid of ``ct_file``; ``ValueError`` naming the file otherwise."""
    plan_dose = Path(plan_dose)
    if not plan_dose.is_file():
        raise FileNotFoundError(f"{plan_dose}: no such plan dose file")
    try:
        image, ct = nib.load(plan_dose), nib.load(ct_file)
        dose = np.asarray(image.dataobj, dtype=np.float32)
    except Exception as err:  # nibabel and zlib raise many types on corrupt input
        raise ValueError(f"{plan_dose}: not a readable NIfTI file ({type(err).__name__}: {err})") from err
    if image.shape != ct.shape[:3] or not np.allclose(image.affine, ct.affine, atol=1e-3):
        raise ValueError(
            f"{plan_dose}: the plan dose grid (shape {image.shape}, affine {np.round(image.affine, 3).tolist()}) is "
            f"not the CT's grid of {ct_file} (shape {ct.shape}, affine {np.round(ct.affine, 3).tolist()}); resample "
            "the plan dose onto the CT first"
        )
    if not np.isfinite(dose).all():
        raise ValueError(f"{plan_dose}: the plan dose holds NaN or infinite values")
    return np.ascontiguousarray(dose)


def plan_qa_nifti(
    patient_dir: str | os.PathLike,
    plan_dose: str | os.PathLike,
    out_dir: str | os.PathLike,
    bundle: str | os.PathLike | Predictor | QAModel,
    protocol: str | os.PathLike | Protocol | None = None,
    margin_gy: float = 3.0,
) -> dict:
    """Plan QA of a patient folder as the bundle's inference reads it (``ct.nii.gz``, ``structures.nii.gz``,
    ``possible_dose_mask.nii.gz``) and a plan dose on the CT's grid.

    Everything is read and checked before ``out_dir`` is made; it then receives ``report.html``, ``report.json``,
    ``prediction/dose.nii.gz`` (on the CT's grid, with its header), ``plan/dvh.csv`` and ``prediction/dvh.csv``
    (cumulative DVH per 0.1 Gy, as ``predict-dicom`` writes it), each written atomically.

    Args:
        patient_dir: the patient folder; its name is the patient id.
        plan_dose: the plan's dose in Gy (NIfTI, on the CT's grid).
        out_dir: output folder.
        bundle: bundle folder, a predictor (any callable ``(ct, structures, possible_dose_mask) -> dose``) or a
            :class:`QAModel`.
        protocol: JSON protocol (default: :data:`~monai_dose.qa.protocol.DEFAULT_PROTOCOL`), or one loaded.
        margin_gy: plan - predicted difference beyond which a metric is flagged.

    Returns:
        the report (as ``report.json``).

    Raises:
        FileNotFoundError, ValueError: a missing or bad input (protocol, patient files, plan dose on another grid),
            naming the file.
    """
    protocol = protocol if isinstance(protocol, Protocol) else load_protocol(protocol)
    patient_dir = Path(patient_dir)
    item = patient_files(patient_dir)
    missing = [Path(f).name for f in item.values() if not Path(f).is_file()]
    if missing:
        raise FileNotFoundError(f"{patient_dir}: missing {', '.join(missing)}")
    plan = read_plan_nifti(plan_dose, item["ct"])
    patient = load_patient(item)
    CheckGridsd()({k: v.movedim(-1, 0) if k == "structures" else v[None] for k, v in patient.items()})
    out_dir = check_writable(out_dir)
    model = QAModel.from_bundle(bundle)
    predicted = model.predictor(patient["ct"], patient["structures"], patient["possible_dose_mask"])
    structures = np.asarray(patient["structures"])
    doses = PlanDoses(
        patient=patient_dir.name,
        plan=plan,
        predicted=np.ascontiguousarray(predicted, dtype=np.float32),
        ct_hu=np.asarray(patient["ct"], dtype=np.float32) - 1024,
        masks={s: np.flatnonzero(structures[..., c]) for c, s in enumerate(STRUCTURES) if structures[..., c].any()},
        affine=np.asarray(patient["ct"].affine, dtype=np.float64),
        inputs={"patient folder": str(patient_dir), "plan dose": str(plan_dose)},
        dvh_convention=_NIFTI_CONVENTION,
    )
    report = compare(doses, protocol, margin_gy, model.errors)
    save_dose(doses.predicted, item["ct"], out_dir / "prediction" / "dose.nii.gz")
    return _write_report(out_dir, doses, report, model, dvh_tables(doses.predicted, doses.masks, doses.spacing)[0])


def read_plan_rtdose(path: str | os.PathLike, ct: CTSeries) -> np.ndarray:
    """The plan's dose (Gy) of an RTDOSE file (:func:`~monai_dose.dicom.io.read_rtdose`: DoseGridScaling applied,
    the CT's patient and frame of reference checked), linearly interpolated onto the CT grid (zero outside the
    dose grid)."""
    dose, affine = read_rtdose(path, ct)
    return resample(dose, affine, ct.affine, ct.hu.shape, order=1)


def plan_qa_dicom(
    ct_dir: str | os.PathLike,
    rtstruct: str | os.PathLike,
    rtdose: str | os.PathLike,
    out_dir: str | os.PathLike,
    bundle: str | os.PathLike | Predictor | QAModel,
    protocol: str | os.PathLike | Protocol | None = None,
    margin_gy: float = 3.0,
    name_map: str | os.PathLike | Mapping[str, str | None] | None = None,
    possible_dose_mask: str | None = None,
) -> dict:
    """Plan QA of a DICOM CT series, its RTSTRUCT and the plan's RTDOSE, read as ``predict-dicom`` reads them
    (:func:`~monai_dose.dicom.predict.read_dicom_patient`, :func:`~monai_dose.dicom.predict.predict_on_ct`), the
    plan's dose resampled onto the CT grid (:func:`read_plan_rtdose`).

    ``out_dir`` receives what :func:`plan_qa_nifti` writes, ``prediction/`` holding ``predict-dicom``'s outputs
    (``RTDOSE.dcm``, ``dose.nii.gz``, ``dvh.csv``, ``report.json``). Arguments and errors as :func:`plan_qa_nifti`
    and :func:`~monai_dose.dicom.predict.predict_dicom`.
    """
    protocol = protocol if isinstance(protocol, Protocol) else load_protocol(protocol)
    patient = read_dicom_patient(ct_dir, rtstruct, name_map, possible_dose_mask)
    plan = read_plan_rtdose(rtdose, patient.ct)
    out_dir = check_writable(out_dir)
    model = QAModel.from_bundle(bundle)
    predicted, model_report = predict_on_ct(patient, model.predictor)
    doses = PlanDoses(
        patient=str(patient.ct.slices[0].get("PatientID") or Path(ct_dir).name),
        plan=plan,
        predicted=predicted.astype(np.float32),
        ct_hu=patient.ct.hu,
        masks=patient.masks,
        affine=LPS_TO_RAS @ patient.ct.affine,
        inputs={"CT series": str(ct_dir), "RTSTRUCT": str(rtstruct), "plan RTDOSE": str(rtdose)},
        dvh_convention=DVH_CONVENTION,
    )
    report = compare(doses, protocol, margin_gy, model.errors)
    report["dicom"] = {
        "structures_found": patient.mapping.found,
        "structures_missing": patient.mapping.missing,
        "rois_ignored": patient.mapping.ignored,
        "body": patient.body_rule,
        "possible_dose_mask": patient.possible_dose_rule,
        **model_report,
    }
    predicted_table, _ = dvh_tables(doses.predicted, doses.masks, doses.spacing)
    write_prediction(out_dir / "prediction", patient.ct, doses.predicted, predicted_table, report["dicom"], None)
    return _write_report(out_dir, doses, report, model, predicted_table)


def plan_qa_cohort(
    cohort_dir: str | os.PathLike,
    out_dir: str | os.PathLike,
    bundle: str | os.PathLike | Predictor | QAModel,
    protocol: str | os.PathLike | Protocol | None = None,
    margin_gy: float = 3.0,
    plan_name: str = f"{DOSE_KEY}.nii.gz",
) -> list[dict]:
    """:func:`plan_qa_nifti` of every patient folder of ``cohort_dir`` (the plan dose: ``<folder>/<plan_name>``)
    into ``out_dir/<id>/``, then ``out_dir/summary.csv`` and ``summary.html``: one row per patient, failed patients
    first, then the most flags first. A patient that fails is logged and listed there; the others still run.

    Returns:
        the summary rows.

    Raises:
        ValueError: after the summary is written, when some patients failed (listing them).
    """
    protocol = protocol if isinstance(protocol, Protocol) else load_protocol(protocol)
    folders = [Path(item["ct"]).parent for item in patient_folder_datalist(cohort_dir)]
    if not folders:
        raise ValueError(f"{cohort_dir}: no patient folders")
    out_dir = check_writable(out_dir)
    model = QAModel.from_bundle(bundle)
    rows = []
    for folder in tqdm(folders, desc="plan QA", unit="patient"):
        row = dict.fromkeys(SUMMARY_COLUMNS)
        row.update(patient=folder.name, status="ok")
        try:
            report = plan_qa_nifti(
                folder, folder / plan_name, patient_path(out_dir, folder.name), model, protocol, margin_gy
            )
        except _ERRORS as err:
            logger.error("patient %s: %s", folder.name, err)
            row["status"] = f"error: {err}"
            rows.append(row)
            continue
        counts = report["summary"]
        flagged = [r for r in report["goals"] + report["dvh_metrics"] if r["flag"]]
        row.update(
            flags=counts["room_to_improve"] + counts["under_covered"],
            goals_failed=counts["goals_failed"],
            room_to_improve=counts["room_to_improve"],
            under_covered=counts["under_covered"],
            largest_difference_gy=round(counts["largest_difference_gy"], 2),
            flagged="; ".join(dict.fromkeys(f"{r['roi']} {r['metric']}" for r in flagged)),
        )
        rows.append(row)
    rows.sort(key=lambda r: (r["status"] == "ok", -(r["flags"] or 0), -(r["goals_failed"] or 0)))

    def write_csv(path: Path) -> None:
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
            writer.writeheader()
            writer.writerows(rows)

    write_atomic(out_dir / "summary.csv", write_csv)
    write_atomic(out_dir / "summary.html", lambda p: p.write_text(render_summary(rows, f"Plan QA: {cohort_dir}")))
    failed = [r for r in rows if r["status"] != "ok"]
    if failed:
        details = "; ".join(f"{r['patient']}: {r['status'].removeprefix('error: ')}" for r in failed)
        raise ValueError(f"{len(failed)} of {len(rows)} patients failed ({details}); see {out_dir / 'summary.csv'}")
    return rows
