"""OpenKBP CSV -> NIfTI conversion: exact reproduction of the reference files and errors on bad input."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from monai_dose.cli import main
from monai_dose.data import convert
from monai_dose.data.convert import convert_openkbp
from monai_dose.data.openkbp import openkbp_affine

PATIENTS = [
    ("training", "train", "pt_1"),
    ("training", "train", "pt_2"),
    ("validation", "validation", "pt_201"),
]
KEYS = ("ct", "dose", "possible_dose_mask", "structures")
HEADER_FIELDS = ("dim", "pixdim", "sform_code", "qform_code", "xyzt_units", "srow_x", "srow_y", "srow_z")


@pytest.fixture(scope="module")
def converted(openkbp_csv_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    dst = tmp_path_factory.mktemp("openkbp")
    return dst, convert_openkbp(openkbp_csv_dir, dst)


@pytest.fixture
def one_patient(openkbp_csv_dir: Path, tmp_path: Path) -> Path:
    """``tmp_path/src/train-pats/pt_1``, a copy of a sample patient to corrupt."""
    patient = tmp_path / "src" / "train-pats" / "pt_1"
    shutil.copytree(openkbp_csv_dir / "train-pats" / "pt_1", patient)
    return patient


def assert_nothing_written(dst: Path) -> None:
    assert not (dst / "dataset.json").exists()
    assert not list(dst.glob("*/pt_*")), "a patient folder was left behind"
    assert not list(dst.glob(".tmp*")), "a temporary file or folder was left behind"


@pytest.mark.parametrize("section,folder,pid", PATIENTS)
def test_reproduces_reference(converted, openkbp_dir, section, folder, pid):
    dst, _ = converted
    for key in KEYS:
        out = nib.load(dst / folder / pid / f"{key}.nii.gz")
        ref = nib.load(openkbp_dir / folder / pid / f"{key}.nii.gz")
        assert out.get_data_dtype() == ref.get_data_dtype(), key
        np.testing.assert_array_equal(np.asanyarray(out.dataobj), np.asanyarray(ref.dataobj), err_msg=key)
        np.testing.assert_array_equal(out.affine, ref.affine, err_msg=key)
        for field in HEADER_FIELDS:
            np.testing.assert_array_equal(out.header[field], ref.header[field], err_msg=f"{key} {field}")


def test_dataset_json(converted, openkbp_dir):
    dst, summary = converted
    out = json.loads((dst / "dataset.json").read_text())
    ref = json.loads((openkbp_dir / "dataset.json").read_text())
    assert list(out) == list(ref)
    for key in ("name", "description", "reference", "source_format", "files", "structures"):
        assert out[key] == ref[key], key
    assert "[[0,-s1,0,0],[-s0,0,0,0],[0,0,-s2,0],[0,0,0,1]]" in out["geometry"]
    assert out["oars"] + out["targets"] == out["structures"]
    assert out["excluded_incomplete"] == {"training": [], "validation": []}
    for section, _, pid in PATIENTS:
        assert [e for e in out[section] if e["id"] == pid] == [e for e in ref[section] if e["id"] == pid]
    assert summary["converted"] == {"training": ["pt_1", "pt_2"], "validation": ["pt_201"]}
    assert summary["excluded"] == {"training": [], "validation": []}
    assert not list(dst.glob(".tmp*"))


def test_incomplete_patients_skipped(one_patient, tmp_path, caplog):
    """A missing CT excludes a training patient; a test patient needs no dose."""
    test_patient = tmp_path / "src" / "test-pats" / "pt_241"
    shutil.copytree(one_patient, test_patient)
    (test_patient / "dose.csv").unlink()
    (one_patient / "ct.csv").unlink()
    dst = tmp_path / "dst"
    with caplog.at_level(logging.WARNING, logger="monai_dose.data.convert"):
        summary = convert_openkbp(tmp_path / "src", dst)
    assert f"{one_patient}: no ct.csv; patient skipped" in caplog.messages
    assert summary["converted"] == {"training": [], "test": ["pt_241"]}
    assert summary["excluded"] == {"training": ["pt_1"], "test": []}
    data = json.loads((dst / "dataset.json").read_text())
    assert data["excluded_incomplete"] == {"training": ["pt_1"], "test": []}
    assert data["source_format"] == "OpenKBP provided-data CSV (train-pats, test-pats)"
    assert data["training"] == [] and "validation" not in data
    assert set(data["test"][0]) == {"id", "ct", "possible_dose_mask", "structures", "voxel_dimensions"}
    assert sorted(p.name for p in (dst / "test" / "pt_241").iterdir()) == [
        "ct.nii.gz",
        "possible_dose_mask.nii.gz",
        "structures.nii.gz",
    ]
    assert not (dst / "train" / "pt_1").exists()

    shutil.rmtree(test_patient.parent)
    caplog.clear()
    assert main(["convert-openkbp", str(tmp_path / "src"), str(tmp_path / "cli")]) == 0
    assert f"{one_patient}: no ct.csv; patient skipped" in caplog.messages
    assert json.loads((tmp_path / "cli" / "dataset.json").read_text())["excluded_incomplete"] == {"training": ["pt_1"]}


def _replace_line(path: Path, line: int, text: str) -> None:
    lines = path.read_text().splitlines()
    lines[line] = text
    path.write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(
    "name,line,text,message",
    [
        ("ct.csv", 2, "532645,abc", "non-numeric value"),
        ("dose.csv", 5, "2097152,1.0", "line 6: index 2097152 outside the 128x128x128 grid (0..2097151)"),
        ("possible_dose_mask.csv", 1, "-1,", "line 2: index -1 outside the 128x128x128 grid"),
        ("ct.csv", 3, "532646,", "line 4: value nan missing or not a valid int16"),
        ("PTV70.csv", 0, "index,data", "header 'index,data', expected ',data'"),
        ("voxel_dimensions.csv", 2, "", "expected 3 positive voxel sizes"),
        ("voxel_dimensions.csv", 0, "abc", "could not convert string 'abc'"),
        ("dose.csv", 5, "565029,1.0", "line 6: index 565029 already given on line 2"),
        ("possible_dose_mask.csv", 3, "565029,", "line 4: index 565029 already given on line 2"),
    ],
)
def test_malformed_csv(one_patient, tmp_path, capsys, name, line, text, message):
    """The patient is skipped with the file and problem named; the others are converted and listed."""
    shutil.copytree(one_patient, one_patient.parent / "pt_2")
    _replace_line(one_patient / name, line, text)
    dst = tmp_path / "dst"
    assert main(["convert-openkbp", str(tmp_path / "src"), str(dst)]) == 1
    err = capsys.readouterr().err
    assert "error: 1 patient(s) not converted" in err and f"{one_patient / name}: " in err and message in err
    data = json.loads((dst / "dataset.json").read_text())
    assert [e["id"] for e in data["training"]] == ["pt_2"]
    assert list(data["excluded_malformed"]["training"]) == ["pt_1"]
    assert message in data["excluded_malformed"]["training"]["pt_1"]
    assert not (dst / "train" / "pt_1").exists() and (dst / "train" / "pt_2" / "ct.nii.gz").is_file()
    assert not list(dst.glob(".tmp*")), "a temporary file or folder was left behind"
    with pytest.raises(ValueError, match=name):
        convert_openkbp(tmp_path / "src", dst, overwrite=True)


def test_existing_dataset_refused_without_overwrite(one_patient, tmp_path, capsys):
    """A second conversion into a converted dataset leaves its dataset.json and patient folders untouched."""
    dst = tmp_path / "dst"
    assert main(["convert-openkbp", str(tmp_path / "src"), str(dst)]) == 0
    dataset, ct = (dst / "dataset.json").read_bytes(), (dst / "train" / "pt_1" / "ct.nii.gz").stat()
    capsys.readouterr()
    assert main(["convert-openkbp", str(tmp_path / "src"), str(dst)]) == 1
    err = capsys.readouterr().err
    assert f"error: {dst / 'dataset.json'}: the folder already holds a converted dataset; pass --overwrite" in err
    assert (dst / "dataset.json").read_bytes() == dataset
    assert (dst / "train" / "pt_1" / "ct.nii.gz").stat() == ct
    assert not list(dst.glob(".tmp*"))


def test_overwrite_merges(one_patient, tmp_path, caplog):
    """--overwrite replaces the patients converted again and keeps the others of the earlier dataset.json."""
    train = one_patient.parent
    shutil.copytree(one_patient, train / "pt_2")
    shutil.copytree(one_patient, train / "pt_3")
    (train / "pt_3" / "ct.csv").unlink()
    dst = tmp_path / "dst"
    assert main(["convert-openkbp", str(tmp_path / "src"), str(dst)]) == 0
    earlier = json.loads((dst / "dataset.json").read_text())

    second = tmp_path / "second" / "train-pats"
    shutil.copytree(train / "pt_2", second / "pt_2")
    _replace_line(second / "pt_2" / "ct.csv", 1, "532261,1234")
    shutil.copytree(one_patient, second.parent / "test-pats" / "pt_241")
    (second.parent / "test-pats" / "pt_241" / "dose.csv").unlink()
    with caplog.at_level(logging.INFO, logger="monai_dose.data.convert"):
        assert main(["convert-openkbp", "--overwrite", str(second.parent), str(dst)]) == 0
    assert "training: merged with the earlier dataset.json: replaced pt_2; kept pt_1" in caplog.messages
    data = json.loads((dst / "dataset.json").read_text())
    assert data["training"] == earlier["training"]  # the same entries, pt_1 then pt_2
    assert [e["id"] for e in data["test"]] == ["pt_241"]
    assert data["excluded_incomplete"] == {"training": ["pt_3"], "test": []}
    assert data["source_format"] == "OpenKBP provided-data CSV (train-pats, test-pats)"
    assert np.asarray(nib.load(dst / "train" / "pt_2" / "ct.nii.gz").dataobj).flat[532261] == 1234
    assert np.asarray(nib.load(dst / "train" / "pt_1" / "ct.nii.gz").dataobj).flat[532261] == 18
    assert not list(dst.glob(".tmp*"))


def test_patient_folder_name_that_is_not_a_file_name(one_patient, tmp_path, capsys):
    """A source folder whose name is not a single path component on every system is refused before any write."""
    bad = one_patient.rename(one_patient.parent / "pt\\1")
    dst = tmp_path / "dst"
    assert main(["convert-openkbp", str(tmp_path / "src"), str(dst)]) == 1
    assert f"error: {bad}: patient id 'pt\\\\1' is not a single folder name" in capsys.readouterr().err
    assert not dst.exists()


def test_no_partial_patient_on_write_error(one_patient, tmp_path, monkeypatch):
    save = nib.save

    def save_then_fail(img, path):
        if Path(path).name != "ct.nii.gz":
            raise OSError("disk full")
        save(img, path)

    monkeypatch.setattr(convert.nib, "save", save_then_fail)
    with pytest.raises(OSError, match="disk full"):
        convert_openkbp(tmp_path / "src", tmp_path / "dst")
    assert_nothing_written(tmp_path / "dst")


def test_missing_source(tmp_path, capsys):
    assert main(["convert-openkbp", str(tmp_path), str(tmp_path / "dst")]) == 1
    assert "no train-pats/, validation-pats/, test-pats/ folder" in capsys.readouterr().err


def test_affine_is_anatomical(converted, openkbp_csv_dir):
    """Array axes anterior->posterior, right->left, superior->inferior: axis codes P, L, I with the spacing of
    voxel_dimensions.csv in mm, for the converted patients and the example patient shipped in examples/."""
    dst, _ = converted
    csv_folders = {"train": "train-pats", "validation": "validation-pats"}
    pairs = [
        (dst / folder / pid / "ct.nii.gz", openkbp_csv_dir / csv_folders[folder] / pid) for _, folder, pid in PATIENTS
    ]
    example = Path(__file__).parents[1] / "examples" / "pt_201" / "ct.nii.gz"
    pairs.append((example, openkbp_csv_dir / "validation-pats" / "pt_201"))
    for file, csv_folder in pairs:
        image = nib.load(file)
        assert nib.aff2axcodes(image.affine) == ("P", "L", "I"), file
        assert image.header.get_xyzt_units()[0] == "mm", file
        spacing = np.loadtxt(csv_folder / "voxel_dimensions.csv")
        np.testing.assert_allclose(image.affine, openkbp_affine(spacing), err_msg=str(file))
