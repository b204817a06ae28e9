"""Inputs in another convention than the model's (0/255 masks, probability maps, a CT in Hounsfield units), or
implausible ones (bad voxel spacing, no target), end in the right dose or a clear error, never in a wrong dose.

Synthetic patients on a 32 x 32 x 8 grid and tiny untrained networks keep these fast; a ``Softplus`` (or a
positive output bias) keeps their dose positive, so that a changed input shows in the dose.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.networks.nets import BasicUNet
from monai.transforms import Compose

from monai_dose.data import patient_folder_datalist
from monai_dose.data.openkbp import STRUCTURES, openkbp_affine
from monai_dose.inference import DosePredictor, predict_patients
from monai_dose.networks import DCNN
from monai_dose.transforms import (
    HU_OFFSET,
    BinariseMask,
    BinariseMaskd,
    EnsureOpenKBPCT,
    EnsureOpenKBPCTd,
    RequireTargets,
    RequireTargetsd,
    check_voxel_spacing,
)

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "openkbp_dose"
SHAPE = (32, 32, 8)
SPACING = (3.906, 3.906, 2.5)


def synthetic_patient() -> dict[str, np.ndarray]:
    """OpenKBP conventions on a small grid: a round body of soft tissue (HU + 1024, 0 outside) with a bone and an
    airway, a PTV70 inside a PTV56, a cord; the possible-dose mask is the body."""
    i, j, k = np.indices(SHAPE)
    body = (i - 16) ** 2 + (j - 16) ** 2 < 13**2
    ct = np.where(body, 1064, 0).astype(np.int16)
    ct[(i - 22) ** 2 + (j - 16) ** 2 < 9] = 2200
    ct[(i - 9) ** 2 + (j - 16) ** 2 < 4] = 24
    structures = np.zeros((*SHAPE, len(STRUCTURES)), np.uint8)
    ptv = (i - 14) ** 2 + (j - 12) ** 2 + 2 * (k - 4) ** 2
    structures[..., STRUCTURES.index("PTV70")] = ptv < 12
    structures[..., STRUCTURES.index("PTV56")] = ptv < 40
    structures[..., STRUCTURES.index("SpinalCord")] = (i - 24) ** 2 + (j - 16) ** 2 < 3
    return {"ct": ct, "structures": structures, "possible_dose_mask": body.astype(np.uint8)}


def hounsfield(ct: np.ndarray) -> np.ndarray:
    """The CT in Hounsfield units, air -1024 outside the body (as a scanner gives it)."""
    return ct.astype(np.int16) - int(HU_OFFSET)


def write_patient(folder: Path, arrays: dict[str, np.ndarray], spacing=SPACING) -> Path:
    """NIfTI files with the OpenKBP affine as sform (nibabel's qform cannot hold a zero spacing)."""
    folder.mkdir(parents=True)
    for key, array in arrays.items():
        image = nib.Nifti1Image(array, None)
        image.set_sform(openkbp_affine(spacing), code=1)
        nib.save(image, folder / f"{key}.nii.gz")
    return folder


@pytest.fixture(scope="module")
def predictor() -> DosePredictor:
    """Random 2D network on the reference input set."""
    torch.manual_seed(0)
    unet = BasicUNet(spatial_dims=2, in_channels=12, out_channels=1, features=(4, 4, 8, 8, 16, 4))
    return DosePredictor(torch.nn.Sequential(unet, torch.nn.Softplus()), device="cpu", amp=False)


@pytest.fixture(scope="module")
def proximity_predictor() -> DosePredictor:
    """Random 2D network on the target_proximity input set (uses the voxel spacing)."""
    torch.manual_seed(0)
    unet = BasicUNet(spatial_dims=2, in_channels=15, out_channels=1, features=(4, 4, 8, 8, 16, 4))
    return DosePredictor(
        torch.nn.Sequential(unet, torch.nn.Softplus()), input_set="target_proximity", device="cpu", amp=False
    )


# the transforms


def test_binarise_mask(caplog: pytest.LogCaptureFixture):
    binary = np.array([[0, 1], [1, 0]], np.uint8)
    assert BinariseMask()(binary) is binary  # 0/1: as given, no warning
    assert not caplog.records
    out = BinariseMask()(MetaTensor(torch.as_tensor(binary * 255), meta={"filename_or_obj": "a/structures.nii.gz"}))
    assert isinstance(out, MetaTensor) and out.meta["filename_or_obj"] == "a/structures.nii.gz"
    np.testing.assert_array_equal(out, binary)
    assert out.dtype == torch.uint8
    assert "a/structures.nii.gz: mask values from 0 to 255, not 0/1: binarised" in caplog.text
    np.testing.assert_array_equal(BinariseMask()(np.array([0.0, -1.0, 3.0])), [0, 1, 1])  # any non-zero: inside
    probability = np.array([0.0, 0.2, 0.7, 1.0], np.float32)
    with pytest.raises(ValueError, match=r"^possible_dose_mask: not a label map \(non-integer values such as 0.2"):
        BinariseMask()(probability, name="possible_dose_mask")
    with pytest.raises(ValueError, match="not a label map"):
        BinariseMask()(np.array([0.0, np.nan]))
    np.testing.assert_array_equal(BinariseMask(threshold=0.5)(probability), [0, 0, 1, 1])


def test_ensure_openkbp_ct(caplog: pytest.LogCaptureFixture):
    ct = synthetic_patient()["ct"]
    assert EnsureOpenKBPCT()(ct) is ct  # OpenKBP units: as given
    assert not caplog.records
    converted = EnsureOpenKBPCT()(hounsfield(ct), name="my_ct")
    np.testing.assert_array_equal(converted, ct)
    assert "my_ct: 50% of the CT below -500 (air near -1000): read as Hounsfield units" in caplog.text


def test_require_targets_and_voxel_spacing():
    structures = synthetic_patient()["structures"]
    assert RequireTargets(channel_dim=-1)(structures) is structures
    structures[..., STRUCTURES.index("PTV70")] = structures[..., STRUCTURES.index("PTV56")] = 0
    with pytest.raises(ValueError, match=r"^structures: no target \(PTV56, PTV63, PTV70 are all empty\)"):
        RequireTargets(channel_dim=-1)(structures)
    assert check_voxel_spacing([3.906, 3.906, 2.5]) == (3.906, 3.906, 2.5)
    for spacing in ([3.9, 0.0, 2.5], [3.9, -3.9, 2.5], [3.9, 3.9], [3.9, np.nan, 2.5]):
        with pytest.raises(ValueError, match=r"^voxel_spacing: voxel spacing .* mm is not 3 positive values"):
            check_voxel_spacing(spacing)


def test_dictionary_wrappers_name_the_key(caplog: pytest.LogCaptureFixture):
    patient = synthetic_patient()
    data = {**patient, "ct": hounsfield(patient["ct"]), "structures": patient["structures"] * 255}
    pipeline = Compose([EnsureOpenKBPCTd(), BinariseMaskd(), RequireTargetsd(channel_dim=-1)])
    out = pipeline(data)
    for key, value in patient.items():
        np.testing.assert_array_equal(out[key], value)
    assert "ct: 50% of the CT below -500" in caplog.text and "structures: mask values from 0 to 255" in caplog.text
    with pytest.raises(ValueError, match="possible_dose_mask: not a label map"):
        BinariseMaskd()({**patient, "possible_dose_mask": patient["possible_dose_mask"] * 0.5})


# DosePredictor (arrays in)


def test_predictor_binarises_0_255_masks(predictor: DosePredictor, caplog: pytest.LogCaptureFixture):
    """0/255 structures and possible-dose mask (340 Gy and more before) give the dose of the 0/1 masks."""
    patient = synthetic_patient()
    expected = predictor(**patient)
    assert expected.max() > 0.1
    dose = predictor(patient["ct"], patient["structures"] * 255, patient["possible_dose_mask"] * 255)
    np.testing.assert_allclose(dose, expected, atol=0.01)
    assert "structures: mask values from 0 to 255" in caplog.text
    assert "possible_dose_mask: mask values from 0 to 255" in caplog.text


def test_predictor_refuses_a_probability_map_without_threshold(predictor: DosePredictor):
    patient = synthetic_patient()
    probability = patient["possible_dose_mask"] * np.float32(0.9)
    with pytest.raises(ValueError, match=r"possible_dose_mask: not a label map .* give a mask threshold"):
        predictor(patient["ct"], patient["structures"], probability)
    dose = predictor(patient["ct"], patient["structures"], probability, mask_threshold=0.5)
    np.testing.assert_allclose(dose, predictor(**patient), atol=0.01)


def test_predictor_converts_a_ct_in_hounsfield_units(predictor: DosePredictor, caplog: pytest.LogCaptureFixture):
    """A CT in HU (clipped at 0 before: every voxel air) gives the dose of the same CT in OpenKBP units."""
    patient = synthetic_patient()
    with caplog.at_level(logging.WARNING):
        dose = predictor(hounsfield(patient["ct"]), patient["structures"], patient["possible_dose_mask"])
    np.testing.assert_allclose(dose, predictor(**patient), atol=0.01)
    assert "ct: 50% of the CT below -500 (air near -1000): read as Hounsfield units and converted" in caplog.text


@pytest.mark.parametrize("spacing", [(3.9, 0.0, 2.5), (3.9, 3.9, -2.5), (3.9, 3.9)], ids=["zero", "neg", "two"])
def test_predictor_rejects_implausible_spacing(spacing, proximity_predictor: DosePredictor):
    with pytest.raises(ValueError, match=r"voxel_spacing: voxel spacing .* mm is not 3 positive values"):
        proximity_predictor(**synthetic_patient(), voxel_spacing=spacing)


def test_predictor_rejects_structures_without_target(predictor: DosePredictor):
    patient = synthetic_patient()
    patient["structures"][..., [STRUCTURES.index(t) for t in ("PTV56", "PTV63", "PTV70")]] = 0
    with pytest.raises(ValueError, match=r"structures: no target \(PTV56, PTV63, PTV70 are all empty\)"):
        predictor(**patient)


# batch prediction of files (bundle inference)


def test_predict_patients_normalises_inputs(predictor: DosePredictor, tmp_path: Path, caplog: pytest.LogCaptureFixture):
    """0/255 masks and a CT in HU in NIfTI files give the dose of the OpenKBP-convention files; the warnings
    name the files."""
    patient = synthetic_patient()
    write_patient(tmp_path / "in" / "pt_ok", patient)
    scaled = write_patient(
        tmp_path / "in" / "pt_255",
        {
            **patient,
            "structures": patient["structures"] * 255,
            "possible_dose_mask": patient["possible_dose_mask"] * 255,
        },
    )
    hu = write_patient(tmp_path / "in" / "pt_hu", {**patient, "ct": hounsfield(patient["ct"])})
    with caplog.at_level(logging.WARNING):
        written = predict_patients(predictor, patient_folder_datalist(tmp_path / "in"), tmp_path / "out")
    expected = np.asanyarray(nib.load(written["pt_ok"]).dataobj)
    assert expected.max() > 0.1
    for pid in ("pt_255", "pt_hu"):
        np.testing.assert_allclose(np.asanyarray(nib.load(written[pid]).dataobj), expected, atol=0.01)
    assert f"{scaled / 'structures.nii.gz'}: mask values from 0 to 255" in caplog.text
    assert f"{scaled / 'possible_dose_mask.nii.gz'}: mask values from 0 to 255" in caplog.text
    assert f"{hu / 'ct.nii.gz'}: 50% of the CT below -500" in caplog.text


@pytest.mark.parametrize(
    "problem, message",
    [
        ("zero spacing", r"ct.nii.gz: voxel spacing \(0, 3.906, 2.5\) mm is not 3 positive values"),
        ("no target", r"structures.nii.gz: no target \(PTV56, PTV63, PTV70 are all empty\)"),
        ("probability map", r"possible_dose_mask.nii.gz: not a label map"),
    ],
)
def test_predict_patients_rejects_bad_input(problem, message, predictor: DosePredictor, tmp_path: Path):
    patient = synthetic_patient()
    write_patient(tmp_path / "in" / "pt_good", patient)
    spacing = SPACING
    if problem == "zero spacing":
        spacing = (0.0, *SPACING[1:])
    elif problem == "no target":
        patient["structures"][..., STRUCTURES.index("PTV70")] = patient["structures"][
            ..., STRUCTURES.index("PTV56")
        ] = 0
    else:
        patient["possible_dose_mask"] = patient["possible_dose_mask"] * np.float32(0.8)
    write_patient(tmp_path / "in" / "pt_bad", patient, spacing)
    with pytest.raises(RuntimeError, match=rf"1 of 2 patients failed \(pt_bad: .*{message}"):
        predict_patients(predictor, patient_folder_datalist(tmp_path / "in"), tmp_path / "out")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["pt_good"]


@pytest.mark.parametrize("patient_id", ["../escaped", "/tmp/absolute", "a/b", ".."])
def test_predict_patients_refuses_ids_that_are_paths(patient_id, predictor: DosePredictor, tmp_path: Path):
    """A datalist id must be a single folder name: nothing is written outside ``output_dir``."""
    folder = write_patient(tmp_path / "data" / "in" / "pt_1", synthetic_patient())
    items = patient_folder_datalist(folder) * 2
    items[0] = {**items[0], "id": str(tmp_path / "abs") if patient_id.startswith("/") else patient_id}
    out = tmp_path / "data" / "out"
    with pytest.raises(RuntimeError, match=r"1 of 2 patients failed .*is not a single folder name"):
        predict_patients(predictor, items, out)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("dose.nii.gz")) == [
        "data/out/pt_1/dose.nii.gz"
    ]


def test_predict_patients_checks_the_output_first(
    predictor: DosePredictor, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """An output folder that cannot be made fails before the first prediction (not after it)."""
    folder = write_patient(tmp_path / "in" / "pt_1", synthetic_patient())
    (tmp_path / "file").write_text("")
    calls = []
    monkeypatch.setattr(predictor, "inferer", lambda *a, **k: calls.append(a))
    with pytest.raises(PermissionError, match=r"file/out: cannot write there"):
        predict_patients(predictor, patient_folder_datalist(folder), tmp_path / "file" / "out")
    assert calls == []


# the bundle's inference.json


def run_inference_config(dataset_dir: Path, output_dir: Path, checkpoint: Path, **overrides) -> None:
    parser = ConfigParser()
    parser.read_config(BUNDLE / "configs" / "inference.json")
    parser.update({"bundle_root": str(BUNDLE), "dataset_dir": str(dataset_dir), "output_dir": str(output_dir)})
    parser.update({"ckpt_path": str(checkpoint), "network_def#channels": [4, 8, 16], "network_def#dilations": [2, 3]})
    parser.update(overrides)
    parser.get_parsed_content("evaluator").run()


def test_bundle_inference_mask_threshold(tmp_path: Path):
    """Through ``inference.json``: 0/255 masks and a CT in HU give the dose of the OpenKBP files; a probability
    map fails naming it, and predicts with ``mask_threshold``."""
    torch.manual_seed(0)
    network = DCNN(2, 45, 1, channels=(4, 8, 16), dilations=(2, 3))
    torch.nn.init.constant_(network.head.conv.bias, 5.0)  # a positive dose
    torch.save(network.state_dict(), tmp_path / "model.pt")
    patient = synthetic_patient()
    write_patient(tmp_path / "in" / "pt_ok", patient)
    write_patient(tmp_path / "in" / "pt_255", {**patient, "structures": patient["structures"] * 255})
    write_patient(tmp_path / "in" / "pt_hu", {**patient, "ct": hounsfield(patient["ct"])})
    run_inference_config(tmp_path / "in", tmp_path / "out", tmp_path / "model.pt")
    expected = np.asanyarray(nib.load(tmp_path / "out" / "pt_ok" / "dose.nii.gz").dataobj)
    assert expected.max() > 1
    for pid in ("pt_255", "pt_hu"):
        dose = np.asanyarray(nib.load(tmp_path / "out" / pid / "dose.nii.gz").dataobj)
        np.testing.assert_allclose(dose, expected, atol=0.01)

    mask = patient["possible_dose_mask"] * np.float32(0.9)
    write_patient(tmp_path / "map" / "pt_map", {**patient, "possible_dose_mask": mask})
    with pytest.raises(RuntimeError) as err:  # the evaluator's, listing the failed patients
        run_inference_config(tmp_path / "map", tmp_path / "out_map", tmp_path / "model.pt")
    assert re.search(r"pt_map: .*possible_dose_mask.nii.gz: not a label map", str(err.value))
    assert not (tmp_path / "out_map" / "pt_map").exists()
    run_inference_config(tmp_path / "map", tmp_path / "out_map", tmp_path / "model.pt", mask_threshold=0.5)
    dose = np.asanyarray(nib.load(tmp_path / "out_map" / "pt_map" / "dose.nii.gz").dataobj)
    np.testing.assert_allclose(dose, expected, atol=0.01)
