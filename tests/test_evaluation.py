"""`python -m monai_dose evaluate` against what the official OpenKBP evaluator says, and its user errors."""

from __future__ import annotations

import csv
import json
import math
import shutil
from pathlib import Path

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest

from monai_dose.cli import main
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
