"""`python -m monai_dose evaluate` against what the official OpenKBP evaluator says, and its user errors."""

from __future__ import annotations

import csv
import json
import logging
import math
import re
import shutil
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

from monai_dose import evaluation
from monai_dose.cli import main
from monai_dose.evaluation import evaluate_patient, write_evaluation
from monai_dose.metrics import DVH_METRICS
from monai_dose.plots import dvh_curves

ORACLE_PATIENTS = ("pt_201", "pt_202", "pt_203", "pt_204", "pt_206")


@pytest.fixture(scope="module")
def evaluated(openkbp_dir: Path, oracle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("evaluate")
    assert main(["evaluate", "--data", str(openkbp_dir), "--predictions", str(oracle_dir), "--out", str(out)]) == 0
    return out


def assert_same(ours: object, official: object, where: str) -> None:
    """Same nested structure and key order, nulls where null, numbers to 1e-6 relative."""
    if isinstance(official, dict):
        assert isinstance(ours, dict) and list(ours) == list(official), where
        for key in official:
            assert_same(ours[key], official[key], f"{where}/{key}")
    elif official is None:
        assert ours is None, where
    else:
        assert math.isclose(ours, official, rel_tol=1e-6), f"{where}: {ours} != {official}"


def test_scores_reproduce_the_official_evaluator(evaluated: Path, oracle_dir: Path):
    official = json.loads((oracle_dir / "official_scores.json").read_text())
    ours = json.loads((evaluated / "scores.json").read_text())
    del official["evaluator"]
    assert_same(ours, official, "scores.json")


def test_partial_predictions_warned(
    openkbp_dir: Path, oracle_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    """Scores of 5 of the 33 validation patients are not scores of the split: the run says so, naming the others."""
    with caplog.at_level(logging.WARNING, logger="monai_dose.evaluation"):
        args = ["evaluate", "--data", str(openkbp_dir), "--predictions", str(oracle_dir), "--out", str(tmp_path)]
        assert main(args) == 0
    warning = next(m for m in caplog.messages if "predictions for" in m)
    assert f"{oracle_dir}: predictions for 5 of the 33 'validation' patients" in warning
    assert "pt_205" not in warning and "pt_207" in warning and "pt_201" not in warning.split("missing:")[1]


def test_csv_and_dvh_plots(evaluated: Path):
    with (evaluated / "scores_per_patient.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["id"] for row in rows] == list(ORACLE_PATIENTS)
    scores = json.loads((evaluated / "scores.json").read_text())
    for row in rows:
        pid = row["id"]
        assert float(row["dose_error"]) == scores["dose_error_per_patient"][pid]
        for key in DVH_METRICS:
            ref, pred = scores["reference_dvh_metrics"][pid][key], scores["prediction_dvh_metrics"][pid][key]
            if ref is None:
                assert row[f"{key}/reference"] == row[f"{key}/abs_difference"] == ""
            else:
                assert float(row[f"{key}/abs_difference"]) == pytest.approx(abs(ref - pred))
    for pid in ORACLE_PATIENTS:
        image = matplotlib.image.imread(evaluated / "dvh" / f"{pid}.png")
        assert image.ndim == 3 and min(image.shape[:2]) > 200 and image.std() > 0


def test_dvh_curves():
    dose = np.arange(100, dtype=np.float64).reshape(4, 5, 5)  # 0..99 Gy
    masks = np.zeros((2, 4, 5, 5), dtype=np.uint8)
    masks[0] = 1
    curves = dvh_curves(dose, masks, names=("all", "absent"), bin_width=1.0)
    assert list(curves) == ["all"]
    bins, volume = curves["all"]
    assert volume[0] == 100.0 and volume[-1] == 0.0 and np.all(np.diff(volume) <= 0)
    assert volume[bins == 50.0] == pytest.approx(50.0)  # half the voxels get at least 50 Gy


def run_evaluate(capsys: pytest.CaptureFixture, data: Path, predictions: Path, out: Path) -> tuple[int, str]:
    code = main(["evaluate", "--data", str(data), "--predictions", str(predictions), "--out", str(out)])
    return code, capsys.readouterr().err


def test_grid_mismatch(openkbp_dir: Path, oracle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    image = nib.load(oracle_dir / "pt_202" / "prediction.nii.gz")
    shifted = image.affine.copy()
    shifted[0, 3] += 5.0
    nib.save(nib.Nifti1Image(np.asarray(image.dataobj), shifted), tmp_path / "pt_202.nii.gz")
    code, err = run_evaluate(capsys, openkbp_dir, tmp_path, tmp_path / "out")
    assert code == 1 and "pt_202" in err and "grid" in err
    assert not (tmp_path / "out" / "scores.json").exists()


def test_missing_or_unknown_predictions(openkbp_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture):
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    code, err = run_evaluate(capsys, openkbp_dir, predictions, tmp_path / "out")
    assert code == 1 and "no predictions found" in err

    (predictions / "pt_201").mkdir()
    code, err = run_evaluate(capsys, openkbp_dir, predictions, tmp_path / "out")
    assert code == 1 and "pt_201" in err and "found 0" in err

    shutil.rmtree(predictions / "pt_201")
    (predictions / "pt_999.nii.gz").touch()
    code, err = run_evaluate(capsys, openkbp_dir, predictions, tmp_path / "out")
    assert code == 1 and "pt_999" in err and "validation" in err


@pytest.fixture
def pt_201_dose(oracle_dir: Path) -> nib.Nifti1Image:
    """The oracle prediction of pt_201, to corrupt."""
    return nib.load(oracle_dir / "pt_201" / "prediction.nii.gz")


@pytest.mark.parametrize(
    "value,message",
    [
        (np.nan, "1 NaN or infinite dose value(s)"),
        (np.inf, "1 NaN or infinite dose value(s)"),
        (-1.0, "1 negative dose value(s), down to -1 Gy"),
    ],
)
def test_garbage_dose_refused(
    openkbp_dir: Path, pt_201_dose: nib.Nifti1Image, tmp_path: Path, capsys: pytest.CaptureFixture, value, message
):
    """A NaN, infinite or negative value in a target is an error naming the patient and the file, not a score."""
    ptv70 = np.asarray(nib.load(openkbp_dir / "validation" / "pt_201" / "structures.nii.gz").dataobj)[..., -1]
    dose = np.asarray(pt_201_dose.dataobj, dtype=np.float32)
    dose[tuple(np.argwhere(ptv70)[0])] = value
    predictions = tmp_path / "predictions"
    predictions.mkdir()
    nib.save(nib.Nifti1Image(dose, pt_201_dose.affine), predictions / "pt_201.nii.gz")
    out = tmp_path / "out"
    code, err = run_evaluate(capsys, openkbp_dir, predictions, out)
    assert code == 1
    assert f"error: pt_201: {predictions / 'pt_201.nii.gz'}: {message}" in err
    assert not (out / "scores.json").exists() and not (out / "dvh").exists()


@pytest.mark.parametrize("keep", [0.0, 0.5])
def test_empty_or_truncated_prediction(
    openkbp_dir: Path, oracle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, keep: float
):
    """An empty or truncated file (a copy cut short) is an error naming the patient and the file."""
    data = (oracle_dir / "pt_201" / "prediction.nii.gz").read_bytes()
    prediction = tmp_path / "predictions" / "pt_201" / "dose.nii.gz"
    prediction.parent.mkdir(parents=True)
    prediction.write_bytes(data[: int(len(data) * keep)])
    out = tmp_path / "out"
    code, err = run_evaluate(capsys, openkbp_dir, tmp_path / "predictions", out)
    assert code == 1 and f"error: pt_201: {prediction}: unreadable, truncated or not NIfTI" in err
    assert not (out / "scores.json").exists()


def test_hidden_temporary_files_skipped(
    openkbp_dir: Path, oracle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, caplog: pytest.LogCaptureFixture
):
    """The hidden temporary files of a killed inference are skipped with a warning; the good prediction is scored."""
    predictions = tmp_path / "predictions"
    (predictions / "pt_201").mkdir(parents=True)
    shutil.copy(oracle_dir / "pt_201" / "prediction.nii.gz", predictions / "pt_201" / "dose.nii.gz")
    hidden = [predictions / "pt_201" / ".tmp123.dose.nii.gz", predictions / ".tmp123.pt_202.nii.gz"]
    for path in hidden:
        path.touch()
    with caplog.at_level(logging.WARNING, logger="monai_dose.evaluation"):
        code, err = run_evaluate(capsys, openkbp_dir, predictions, tmp_path / "out")
    assert code == 0, err
    for path in hidden:
        assert f"{path}: hidden file skipped (the temporary file of an interrupted run?)" in caplog.messages
    assert list(json.loads((tmp_path / "out" / "scores.json").read_text())["dose_error_per_patient"]) == ["pt_201"]


@pytest.mark.parametrize("bad_id", ["../escaped", "/abs"])
def test_datalist_id_that_is_a_path(
    openkbp_dir: Path, oracle_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture, bad_id: str
):
    """A datalist id that is not a single file name is an error naming it and the datalist; nothing is written."""
    files = {k: str(openkbp_dir / "validation" / "pt_201" / f"{k}.nii.gz") for k in ("dose", "possible_dose_mask")}
    files["structures"] = str(openkbp_dir / "validation" / "pt_201" / "structures.nii.gz")
    data = tmp_path / "data"
    data.mkdir()
    datalist = {"validation": [{"id": "pt_201", **files}, {"id": bad_id, **files}]}
    (data / "dataset.json").write_text(json.dumps(datalist))
    out = tmp_path / "out"
    code, err = run_evaluate(capsys, data, oracle_dir, out)
    assert code == 1 and f"error: {data / 'dataset.json'}: 'validation' list: patient id {bad_id!r}" in err
    assert not out.exists() and not list(tmp_path.glob("escaped*"))


@pytest.mark.parametrize("bad_id", ["../../escaped", "/abs"])
def test_write_evaluation_refuses_id_that_is_a_path(tmp_path: Path, bad_id: str):
    """No plot is written outside ``out_dir`` by an id holding a path; nothing is written at all."""
    dose = np.ones((4, 5, 5))
    structures = np.zeros((10, *dose.shape), dtype=np.uint8)
    structures[-1] = 1
    bad_id = str(tmp_path / "abs") if bad_id == "/abs" else bad_id
    result = evaluate_patient(bad_id, dose, dose, np.ones_like(dose), structures, (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match=re.escape(f"patient id {bad_id!r} is not a single folder name")):
        write_evaluation([result], tmp_path / "out")
    assert not list(tmp_path.rglob("*"))


def test_unwritable_out_found_before_scoring(
    openkbp_dir: Path, oracle_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """An --out that cannot be created is reported before any prediction is read."""
    (tmp_path / "file").touch()
    out = tmp_path / "file" / "out"

    def no_scoring(*args):
        raise AssertionError("a patient was scored before the output folder was checked")

    monkeypatch.setattr(evaluation, "_load_patient", no_scoring)
    with pytest.raises(PermissionError, match=re.escape(f"{out}: cannot write there")):
        evaluation.evaluate_predictions(openkbp_dir, oracle_dir, out)
