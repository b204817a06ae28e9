"""`scripts/model_card.py`: the model card's figures and tables from `python -m monai_dose evaluate` outputs."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import numpy as np
import pytest

from monai_dose.cli import main as cli_main
from monai_dose.data.openkbp import STRUCTURES

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "model_card.py"
FIGURES = ("dose_error_per_patient", "dvh_error_by_roi", "dvh_median_patient", "slice_median_patient")


@pytest.fixture(scope="module")
def model_card() -> dict:
    """The script's functions, imported by path."""
    return runpy.run_path(str(SCRIPT))


@pytest.fixture(scope="module")
def evaluated(openkbp_dir: Path, oracle_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("evaluate")
    assert cli_main(["evaluate", "--data", str(openkbp_dir), "--predictions", str(oracle_dir), "--out", str(out)]) == 0
    return out


def run_script(*args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    command = [sys.executable, str(SCRIPT), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=120)


def test_figures_and_tables(evaluated: Path, openkbp_dir: Path, oracle_dir: Path, tmp_path: Path):
    out = tmp_path / "figures"
    result = run_script("--eval", evaluated, "--data", openkbp_dir, "--predictions", oracle_dir, "--out", out)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    expected = [out / f"{name}.png" for name in FIGURES] + [out / "model_card_tables.md"]
    assert [Path(line) for line in lines[1:]] == expected

    scores = json.loads((evaluated / "scores.json").read_text())
    errors = scores["dose_error_per_patient"]
    median_id = sorted(errors, key=errors.get)[len(errors) // 2]  # 5 patients: the middle one
    assert lines[0] == f"median patient: {median_id}"

    for path in expected[:4]:
        image = matplotlib.image.imread(path)
        assert image.ndim == 3 and image.shape[0] >= 400 and image.shape[1] >= 500, path
        assert image[..., :3].std() > 0.05, f"{path} looks blank"

    tables = expected[4].read_text()
    for pid, error in errors.items():
        assert f"| {pid} | {error:.2f} |" in tables
    assert f"| Dose score (Gy) | {scores['dose_score']:.3f} |" in tables
    assert f"| DVH score (Gy) | {scores['dvh_score']:.3f} |" in tables
    assert f"| Median patient (dose error) | {median_id} ({errors[median_id]:.2f} Gy) |" in tables
    assert "| Brainstem | D_0.1_cc |" in tables and "| PTV70 | D_1 |" in tables


def test_missing_inputs(model_card: dict, evaluated: Path, openkbp_dir: Path, oracle_dir: Path, tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="scores.json"):
        model_card["write_model_card"](tmp_path, openkbp_dir, oracle_dir, tmp_path / "out")
    (tmp_path / "scores.json").write_text((evaluated / "scores.json").read_text())
    with pytest.raises(FileNotFoundError, match="scores_per_patient.csv"):
        model_card["write_model_card"](tmp_path, openkbp_dir, oracle_dir, tmp_path / "out")
    (tmp_path / "scores_per_patient.csv").write_text((evaluated / "scores_per_patient.csv").read_text())
    with pytest.raises(FileNotFoundError, match="dataset.json"):
        model_card["write_model_card"](tmp_path, tmp_path, oracle_dir, tmp_path / "out")
    with pytest.raises(ValueError, match="no predictions found"):
        model_card["write_model_card"](tmp_path, openkbp_dir, tmp_path, tmp_path / "out")
    argv = ["--eval", str(tmp_path / "none"), "--data", str(openkbp_dir), "--predictions", str(oracle_dir)]
    assert model_card["main"]([*argv, "--out", str(tmp_path / "out")]) == 1
    assert not (tmp_path / "out").exists()


def test_median_patient(model_card: dict):
    median_patient = model_card["median_patient"]
    assert median_patient({"a": 3.0, "b": 1.0, "c": 2.0}) == "c"
    assert median_patient({"a": 3.0, "b": 1.0, "c": 2.0, "d": 4.0}) == "c"  # the lower middle one
    with pytest.raises(ValueError):
        median_patient({})


def test_select_slice(model_card: dict):
    structures = np.zeros((len(STRUCTURES), 8, 8, 10), dtype=bool)
    mask = np.zeros((8, 8, 10), dtype=bool)
    mask[..., 2:7] = True
    assert model_card["select_slice"](structures, mask) == 4  # no PTV: centre of the possible-dose mask
    structures[STRUCTURES.index("PTV56"), :2, :2, 3] = True
    structures[STRUCTURES.index("PTV70"), 2:4, :3, 6] = True
    structures[STRUCTURES.index("PTV63"), :2, :2, 6] = True
    assert model_card["select_slice"](structures, mask) == 6
    with pytest.raises(ValueError, match="possible-dose mask"):
        model_card["select_slice"](np.zeros_like(structures), np.zeros_like(mask))
