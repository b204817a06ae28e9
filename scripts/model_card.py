"""Figures and tables of the bundle's model card, from the output of ``python -m monai_dose evaluate``.

Usage::

    python -m monai_dose evaluate --data DATA --predictions PRED --out EVAL
    python scripts/model_card.py --eval EVAL --data DATA --predictions PRED --out FIGDIR

writes in FIGDIR: ``dose_error_per_patient.png``, ``dvh_error_by_roi.png``, ``dvh_median_patient.png``,
``slice_median_patient.png`` (the patient with the median dose error) and ``model_card_tables.md``.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd

from monai_dose.data.openkbp import DOSE_KEY, STRUCTURES, TARGETS, load_openkbp_datalist
from monai_dose.evaluation import find_predictions
from monai_dose.metrics import DVH_METRICS
from monai_dose.plots import dvh_curves, plot_dose_slice, plot_dvh, plot_metric_errors, plot_patient_errors

SCORE_KEYS = ("dose_score", "dvh_score", "dose_error_per_patient")
CT_HU_OFFSET = 1024.0
"""OpenKBP CT values are Hounsfield units + 1024."""
CROP_MARGIN = 4
"""Voxels kept around the body in the slice figure."""


def load_evaluation(eval_dir: str | Path) -> tuple[dict, pd.DataFrame]:
    """``scores.json`` and ``scores_per_patient.csv`` (indexed by patient id) of an evaluation folder."""
    eval_dir = Path(eval_dir)
    scores_file, table_file = eval_dir / "scores.json", eval_dir / "scores_per_patient.csv"
    for file in (scores_file, table_file):
        if not file.is_file():
            raise FileNotFoundError(f"{file}: missing (run `python -m monai_dose evaluate --out {eval_dir}`)")
    scores = json.loads(scores_file.read_text())
    missing = [key for key in SCORE_KEYS if key not in scores]
    if missing:
        raise ValueError(f"{scores_file}: missing {', '.join(missing)}")
    table = pd.read_csv(table_file, dtype={"id": str}).set_index("id")
    columns = ["dose_error", "dvh_error", *(f"{key}/abs_difference" for key in DVH_METRICS)]
    missing = [column for column in columns if column not in table.columns]
    if missing:
        raise ValueError(f"{table_file}: missing columns {', '.join(missing)}")
    if sorted(table.index) != sorted(scores["dose_error_per_patient"]):
        raise ValueError(f"{table_file} and {scores_file} list different patients")
    return scores, table


def median_patient(dose_errors: Mapping[str, float]) -> str:
    """Patient with the median dose error (the lower of the two middle ones for an even count)."""
    if not dose_errors:
        raise ValueError("no patients")
    ordered = sorted(dose_errors, key=lambda pid: (dose_errors[pid], pid))
    return ordered[(len(ordered) - 1) // 2]


def select_slice(structures: np.ndarray, possible_dose_mask: np.ndarray) -> int:
    """Axial (axis 2) index of the slice with the largest PTV area, or the centre of the possible-dose mask."""
    ptv_area = structures[[STRUCTURES.index(t) for t in TARGETS]].any(axis=0).sum(axis=(0, 1))
    if ptv_area.any():
        return int(np.argmax(ptv_area))
    slices = np.flatnonzero(np.asarray(possible_dose_mask).any(axis=(0, 1)))
    if slices.size == 0:
        raise ValueError("no PTV and an empty possible-dose mask: no slice to show")
    return int((slices[0] + slices[-1]) // 2)


def _body_crop(body: np.ndarray) -> tuple[slice, slice]:
    """Bounding box of a 2D body mask with :data:`CROP_MARGIN` voxels around it, or the whole slice if empty."""
    rows, cols = np.flatnonzero(body.any(axis=1)), np.flatnonzero(body.any(axis=0))
    if rows.size == 0:
        return slice(None), slice(None)
    return (
        slice(max(rows[0] - CROP_MARGIN, 0), rows[-1] + CROP_MARGIN + 1),
        slice(max(cols[0] - CROP_MARGIN, 0), cols[-1] + CROP_MARGIN + 1),
    )


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [header, ["---"] * len(header), *rows]
    return "\n".join(f"| {' | '.join(line)} |" for line in lines) + "\n"


def _gy(value: float, digits: int = 2) -> str:
    return "n/a" if not np.isfinite(value) else f"{value:.{digits}f}"


def markdown_tables(scores: Mapping, table: pd.DataFrame, median_id: str) -> str:
    """Overall scores, per-patient and per-ROI DVH error tables in markdown."""
    dose_errors = table["dose_error"].astype(float)
    dvh_errors = table["dvh_error"].astype(float)
    overall = _markdown_table(
        ["Score", "Value"],
        [
            ["Dose score (Gy)", _gy(scores["dose_score"], 3)],
            ["DVH score (Gy)", _gy(scores["dvh_score"], 3)],
            ["Patients", str(len(table))],
            ["Median patient (dose error)", f"{median_id} ({_gy(dose_errors[median_id])} Gy)"],
        ],
    )
    patient_rows = [[pid, _gy(dose_errors[pid]), _gy(dvh_errors[pid])] for pid in table.index]
    patient_rows += [
        ["**mean**", f"**{_gy(dose_errors.mean())}**", f"**{_gy(dvh_errors.mean())}**"],
        ["**median**", f"**{_gy(dose_errors.median())}**", f"**{_gy(dvh_errors.median())}**"],
    ]
    per_patient = _markdown_table(["Patient", "Dose error (Gy)", "Mean abs. DVH error (Gy)"], patient_rows)
    roi_rows = []
    for key in DVH_METRICS:
        errors = table[f"{key}/abs_difference"].astype(float).dropna()
        roi, metric = key.split("/", 1)
        roi_rows.append([roi, metric, _gy(errors.mean()) if len(errors) else "n/a", str(len(errors))])
    per_roi = _markdown_table(["ROI", "Metric", "Mean abs. error (Gy)", "Patients"], roi_rows)
    return (
        "## OpenKBP scores\n\n"
        "Dose score: mean over patients of the mean absolute dose error in the possible-dose mask. "
        "DVH score: mean absolute error over every (patient, DVH metric) pair of the contoured ROIs.\n\n"
        f"{overall}\n"
        "## Per patient\n\n"
        "Mean abs. DVH error: mean over the patient's DVH metrics (its mean over patients differs from the DVH "
        "score, which weights patients by their number of contoured ROIs).\n\n"
        f"{per_patient}\n"
        "## DVH metric errors per ROI\n\n"
        "Absolute difference of the predicted and reference metric over the patients where the ROI is contoured; "
        "D_0.1_cc: dose to the hottest 0.1 cc, D_99/D_95/D_1: dose to 99/95/1% of the volume.\n\n"
        f"{per_roi}"
    )


def _load_patient(item: dict, prediction_file: Path) -> dict[str, np.ndarray]:
    """CT (HU), reference and predicted dose (Gy), structures (channel first) and possible-dose mask."""
    volumes = {
        "ct": np.asarray(nib.load(item["ct"]).dataobj, dtype=np.float64) - CT_HU_OFFSET,
        "reference": np.asarray(nib.load(item[DOSE_KEY]).dataobj, dtype=np.float64),
        "prediction": np.asarray(nib.load(prediction_file).dataobj, dtype=np.float64),
        "structures": np.moveaxis(np.asarray(nib.load(item["structures"]).dataobj, dtype=bool), -1, 0),
        "possible_dose_mask": np.asarray(nib.load(item["possible_dose_mask"]).dataobj, dtype=bool),
    }
    if volumes["prediction"].shape != volumes["reference"].shape:
        raise ValueError(
            f"{prediction_file}: shape {volumes['prediction'].shape} differs from the reference dose "
            f"{item[DOSE_KEY]} ({volumes['reference'].shape})"
        )
    return volumes


def write_model_card(
    eval_dir: str | Path,
    data_dir: str | Path,
    predictions_dir: str | Path,
    out_dir: str | Path,
    split: str = "validation",
) -> tuple[str, list[Path]]:
    """Write the model card's figures and tables in ``out_dir``; return the median patient and the files."""
    scores, table = load_evaluation(eval_dir)
    dose_errors = {pid: float(e) for pid, e in table["dose_error"].items()}
    median_id = median_patient(dose_errors)
    items = {item["id"]: item for item in load_openkbp_datalist(data_dir, split)}
    if median_id not in items:
        raise ValueError(f"{data_dir}: patient {median_id} is not in the '{split}' split")
    predictions = find_predictions(predictions_dir)
    if median_id not in predictions:
        raise FileNotFoundError(f"{predictions_dir}: no prediction of patient {median_id}")
    volumes = _load_patient(items[median_id], predictions[median_id])
    spacing = items[median_id].get("voxel_dimensions", nib.load(items[median_id]["ct"]).header.get_zooms()[:3])

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = len(table)
    paths = [out_dir / name for name in ("dose_error_per_patient.png", "dvh_error_by_roi.png")]
    plot_patient_errors(
        dose_errors,
        paths[0],
        quantity="Mean absolute dose error",
        title=f"OpenKBP dose error per patient (n={n}, dose score {scores['dose_score']:.2f} Gy)",
    )
    plot_metric_errors(
        {key: table[f"{key}/abs_difference"].to_numpy(dtype=float) for key in DVH_METRICS},
        paths[1],
        title=f"DVH metric errors over {n} patients (DVH score {scores['dvh_score']:.2f} Gy)",
    )

    label = f"{median_id}, median dose error {dose_errors[median_id]:.2f} Gy"
    paths.append(out_dir / "dvh_median_patient.png")
    dvhs = {name: dvh_curves(volumes[name], volumes["structures"]) for name in ("reference", "prediction")}
    plot_dvh(dvhs, paths[-1], title=f"DVH of {label}: reference (solid) and prediction (dashed)")

    k = select_slice(volumes["structures"], volumes["possible_dose_mask"])
    crop = _body_crop(volumes["ct"][:, :, k] > -CT_HU_OFFSET)
    ptvs = {t: volumes["structures"][STRUCTURES.index(t), :, :, k][crop] for t in TARGETS}
    paths.append(out_dir / "slice_median_patient.png")
    plot_dose_slice(
        *(volumes[name][:, :, k][crop] for name in ("ct", "reference", "prediction")),
        paths[-1],
        pixel_spacing=spacing[:2],
        contours=ptvs,
        title=f"{label}: axial slice {k} of {volumes['ct'].shape[2]}, anterior up",
    )

    paths.append(out_dir / "model_card_tables.md")
    paths[-1].write_text(markdown_tables(scores, table, median_id))
    return median_id, paths


def main(argv: list[str] | None = None) -> int:
    """Command line; errors on missing or inconsistent inputs print one line and return 1."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--eval", type=Path, required=True, help="output folder of `python -m monai_dose evaluate`")
    parser.add_argument("--data", type=Path, required=True, help="NIfTI dataset folder (with dataset.json)")
    parser.add_argument("--predictions", type=Path, required=True, help="PRED/<id>/*.nii.gz or PRED/<id>.nii.gz")
    parser.add_argument("--out", type=Path, required=True, help="output folder for the figures and tables")
    parser.add_argument("--split", default="validation", help="datalist section holding the reference doses")
    args = parser.parse_args(argv)
    try:
        median_id, paths = write_model_card(args.eval, args.data, args.predictions, args.out, split=args.split)
    except (FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"median patient: {median_id}")
    for path in paths:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
