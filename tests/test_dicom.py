"""Clinical I/O: DICOM CT + RTSTRUCT in, RTDOSE out, checked by round trips through OpenKBP patients.

Orientation: OpenKBP arrays ``a[i, j, k]`` run anterior -> posterior (i), right -> left (j) and superior ->
inferior (k). The DICOM CT written here is the usual head-first-supine axial series: ImageOrientationPatient
``[1, 0, 0, 0, 1, 0]``, pixel rows along +y (posterior) = axis i, columns along +x (patient left) = axis j,
slice ``k`` at ``z = ORIGIN_z - k * dz`` (+z is superior). rt-utils masks are (rows, columns, slices) in
ascending z, i.e. ``a[:, :, ::-1]``.
"""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
import torch
from monai.networks.nets import BasicUNet
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, RTDoseStorage, RTPlanStorage, generate_uid
from rt_utils import RTStructBuilder

from monai_dose.cli import main
from monai_dose.data.openkbp import STRUCTURES
from monai_dose.dicom import load_name_map, map_roi_names, match_roi_name, predict_dicom
from monai_dose.inference import DosePredictor
from monai_dose.metrics import dvh_metrics

ORIGIN = np.array([-250.0, -230.0, 40.0])
"""Patient position (LPS, mm) of OpenKBP voxel (0, 0, 0)."""
ROI_NAMES = {
    "Brainstem": "BrainStem",
    "SpinalCord": "Cord",
    "RightParotid": "Parotid_R",
    "LeftParotid": "Lt Parotid",
    "Esophagus": "Esophagus_S",
    "Larynx": "larynx",
    "Mandible": "Bone_Mandible",
    "PTV56": "PTV_5600",
    "PTV63": "PTV63Gy",
    "PTV70": "PTV_70",
}
"""Clinical-style names that the default name map must resolve."""


def load_patient(openkbp_dir: Path, split: str, pid: str) -> tuple[dict[str, np.ndarray], list[float]]:
    """OpenKBP arrays and voxel size (mm, as in ``dataset.json``) of one patient."""
    folder = openkbp_dir / split / pid
    arrays = {k: np.asarray(nib.load(folder / f"{k}.nii.gz").dataobj) for k in ("ct", "structures")}
    arrays["possible_dose_mask"] = np.asarray(nib.load(folder / "possible_dose_mask.nii.gz").dataobj)
    datalist = json.loads((openkbp_dir / "dataset.json").read_text())
    section = "training" if split == "train" else "validation"
    (spacing,) = [p["voxel_dimensions"] for p in datalist[section] if p["id"] == pid]
    return arrays, spacing


def write_ct(ct: np.ndarray, spacing: list[float], folder: Path) -> None:
    """Write an OpenKBP CT (HU + 1024) as a head-first-supine axial DICOM series."""
    folder.mkdir(parents=True)
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    for k in range(ct.shape[2]):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, generate_uid()
        ds.Modality, ds.PatientName, ds.PatientID = "CT", "OpenKBP^Test", "openkbp-test"
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.InstanceNumber = "20200101", "120000", "1", k + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [*ORIGIN[:2], ORIGIN[2] - k * spacing[2]]
        ds.PixelSpacing, ds.SliceThickness = spacing[:2], spacing[2]
        ds.Rows, ds.Columns = ct.shape[:2]
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = np.ascontiguousarray(ct[:, :, k], dtype="<i2").tobytes()
        ds.save_as(folder / f"CT{k:03d}.dcm", enforce_file_format=True)


def write_rtstruct(ct_dir: Path, masks: dict[str, np.ndarray], path: Path) -> None:
    """Write OpenKBP masks ``a[i, j, k]`` as the ROIs of an RTSTRUCT on the series in ``ct_dir``."""
    rtstruct = RTStructBuilder.create_new(str(ct_dir))
    for name, mask in masks.items():
        rtstruct.add_roi(mask=np.ascontiguousarray(mask[:, :, ::-1] > 0), name=name)
    rtstruct.save(str(path))


def build_dicom(arrays: dict[str, np.ndarray], spacing: list[float], folder: Path, body: bool = True) -> Path:
    """CT series in ``folder/ct`` and ``folder/rtstruct.dcm``: the structures named as :data:`ROI_NAMES`, a
    helper ``z_ring``, and when ``body`` the OpenKBP body (CT > 0) as ``External`` and the possible-dose mask
    as ``PossibleDose``. Returns ``folder``."""
    write_ct(arrays["ct"], spacing, folder / "ct")
    structures = arrays["structures"]
    masks = {ROI_NAMES[s]: structures[..., c] for c, s in enumerate(STRUCTURES) if structures[..., c].any()}
    masks["z_ring"] = structures[..., STRUCTURES.index("PTV70")]
    if body:
        masks["External"] = arrays["ct"] > 0
        masks["PossibleDose"] = arrays["possible_dose_mask"]
    write_rtstruct(folder / "ct", masks, folder / "rtstruct.dcm")
    return folder


def read_rtdose(path: Path) -> tuple[Dataset, np.ndarray]:
    """The RT Dose file and its dose in Gy as OpenKBP ``a[i, j, k]`` (frames are in ascending z)."""
    ds = pydicom.dcmread(path)
    dose = ds.pixel_array.astype(np.float64) * float(ds.DoseGridScaling)
    return ds, dose.transpose(1, 2, 0)[:, :, ::-1]


@pytest.fixture(scope="module")
def predictor() -> DosePredictor:
    """Random but deterministic 2D network (softplus keeps its dose positive and varied)."""
    torch.manual_seed(0)
    unet = BasicUNet(spatial_dims=2, in_channels=12, out_channels=1, features=(4, 4, 8, 8, 16, 4))
    return DosePredictor(torch.nn.Sequential(unet, torch.nn.Softplus()), spatial_dims=2, device="cpu", amp=False)


@pytest.fixture(scope="module")
def pt1(openkbp_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, np.ndarray]]:
    """OpenKBP train/pt_1 (3.906 x 3.906 x 2.5 mm, the model's voxel size) as DICOM."""
    arrays, spacing = load_patient(openkbp_dir, "train", "pt_1")
    return build_dicom(arrays, spacing, tmp_path_factory.mktemp("pt_1")), arrays


@pytest.mark.parametrize(
    "name, structure",
    [
        ("Brainstem", "Brainstem"),
        ("Brain Stem", "Brainstem"),
        ("Cord", "SpinalCord"),
        ("SpinalCord_Cerv", "SpinalCord"),
        ("Parotid_L", "LeftParotid"),
        ("Lt_Parotid", "LeftParotid"),
        ("parotid right", "RightParotid"),
        ("R-Parotid", "RightParotid"),
        ("Parotids", None),
        ("Esophagus_S", "Esophagus"),
        ("LARYNX", "Larynx"),
        ("Bone_Mandible", "Mandible"),
        ("PTV70", "PTV70"),
        ("PTV_70Gy", "PTV70"),
        ("PTV 7000", "PTV70"),
        ("PTV_69.96", "PTV70"),
        ("ptv_63", "PTV63"),
        ("PTV_Low", "PTV56"),
        ("PTV_54", None),
        ("PTV70_opt", None),
        ("Cord_PRV5", None),
        ("zPTV_70", None),
        ("Ring_PTV70", None),
        ("OpticNerve_L", None),
        ("CTV_70", None),
    ],
)
def test_default_name_rules(name: str, structure: str | None):
    assert match_roi_name(name)[0] == structure


def test_name_map_file(tmp_path: Path):
    path = tmp_path / "names.json"
    path.write_text(json.dumps({"ptv 6600": "PTV70", "Parotid_L": None}))
    mapping = map_roi_names(["PTV_6600", "Parotid_L", "Cord", "Ring_PTV", "SpinalCord"], load_name_map(path))
    assert mapping.found == {"SpinalCord": ["Cord", "SpinalCord"], "PTV70": ["PTV_6600"]}
    assert mapping.ignored["Parotid_L"] == "set to null in the name map"
    assert mapping.ignored["Ring_PTV"].startswith("helper structure")
    assert "LeftParotid" in mapping.missing
    path.write_text(json.dumps({"Parotid_L": "Parotid"}))
    with pytest.raises(ValueError, match="names.json.*no model structure"):
        load_name_map(path)


def test_round_trip_matches_nifti_prediction(
    pt1: tuple[Path, dict[str, np.ndarray]],
    predictor: DosePredictor,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
):
    """``predict-dicom`` on pt_1 as DICOM gives the NIfTI-path prediction of the same predictor, to 1e-4 Gy.

    Tolerance: pt_1 has the model's voxel size (3.906 x 3.906 x 2.5 mm) and 128^3 voxels, so the grid rule
    puts the model grid exactly on the CT: both resamplings hit voxel centres (interpolation weights 0 or 1 up
    to ~1e-12 of floating-point noise) and rt-utils rasterises its contours of these pixel masks back to the
    same masks. What remains is float noise and the RTDOSE's uint32 quantisation (DoseGridScaling =
    max / (2^32 - 1), ~1e-9 Gy); 1e-4 Gy bounds both. A wrong axis, a flip or a one-voxel shift moves the
    random network's dose off its voxels: errors of 1 Gy and more.
    """
    folder, arrays = pt1
    bundles = []
    monkeypatch.setattr(DosePredictor, "from_bundle", lambda bundle, **kw: bundles.append(bundle) or predictor)
    caplog.set_level("INFO")
    out = tmp_path / "out"
    args = ["predict-dicom", "--ct", str(folder / "ct"), "--rtstruct", str(folder / "rtstruct.dcm")]
    assert main([*args, "--bundle", "my_bundle", "--out", str(out), "--possible-dose-mask", "PossibleDose"]) == 0
    assert bundles == [Path("my_bundle")]
    assert sorted(p.name for p in out.iterdir()) == ["RTDOSE.dcm", "dose.nii.gz", "dvh.csv", "report.json"]

    expected = predictor(arrays["ct"], arrays["structures"], arrays["possible_dose_mask"])
    ds, dose = read_rtdose(out / "RTDOSE.dcm")
    assert expected.max() > 1.0
    np.testing.assert_allclose(dose, expected, atol=1e-4)

    first = pydicom.dcmread(folder / "ct" / "CT127.dcm")  # the most inferior slice: the first frame
    assert (ds.SOPClassUID, ds.Modality, ds.DoseUnits, ds.DoseType) == (
        RTDoseStorage,
        "RTDOSE",
        "GY",
        "PHYSICAL",
    )
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert (ds.StudyInstanceUID, ds.FrameOfReferenceUID, ds.PatientID) == (
        first.StudyInstanceUID,
        first.FrameOfReferenceUID,
        first.PatientID,
    )
    assert ds.SeriesInstanceUID != first.SeriesInstanceUID
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (32, 32, 31, 0)
    assert (ds.Rows, ds.Columns, ds.NumberOfFrames) == (128, 128, 128)
    np.testing.assert_allclose(ds.ImagePositionPatient, first.ImagePositionPatient)
    np.testing.assert_allclose(ds.GridFrameOffsetVector, np.arange(128) * 2.5)
    np.testing.assert_allclose(ds.pixel_array.max() * float(ds.DoseGridScaling), expected.max(), rtol=1e-9)
    ct_uids = {pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID for f in (folder / "ct").iterdir()}
    assert {item.ReferencedSOPInstanceUID for item in ds.ReferencedImageSequence} == ct_uids
    assert "ReferencedRTPlanSequence" not in ds  # no plan given

    image = nib.load(out / "dose.nii.gz")
    assert nib.aff2axcodes(image.affine) == ("P", "L", "S")
    np.testing.assert_allclose(image.affine @ [0, 0, 127, 1], [250, 230, 40, 1])  # OpenKBP voxel (0, 0, 0)
    np.testing.assert_allclose(np.asarray(image.dataobj)[:, :, ::-1], expected, atol=1e-4)

    present = [s for c, s in enumerate(STRUCTURES) if arrays["structures"][..., c].any()]
    report = json.loads((out / "report.json").read_text())
    assert report["structures_found"] == {s: [ROI_NAMES[s]] for s in present}
    assert report["structures_missing"] == ["Esophagus", "Larynx"]
    assert report["rois_ignored"] == {
        "z_ring": "helper structure (PRV, opt, eval, ring or z-prefixed)",
        "External": "body",
        "PossibleDose": "possible-dose mask",
    }
    assert (report["body"], report["possible_dose_mask"]) == ("ROI 'External'", "ROI 'PossibleDose'")
    assert "structures missing: ['Esophagus', 'Larynx']" in caplog.text
    reference = dvh_metrics(expected, arrays["structures"].transpose(3, 0, 1, 2), [3.906, 3.906, 2.5])
    assert report["dvh_metrics_gy"] == pytest.approx(reference, abs=1e-4)

    with open(out / "dvh.csv", newline="") as f:
        header, *rows = list(csv.reader(f))
    assert header == ["dose_gy", *(f"{s} (% volume)" for s in present)]
    table = np.array(rows, dtype=np.float64)
    ptv70 = expected[arrays["structures"][..., STRUCTURES.index("PTV70")] > 0]
    assert table[0, 1:] == pytest.approx(100)
    at_1gy = table[np.isclose(table[:, 0], 1.0)][0, header.index("PTV70 (% volume)")]
    assert at_1gy == pytest.approx(100 * np.mean(ptv70 >= 1.0), abs=1e-3)


OAR_LEVELS = {
    "Brainstem": 10.0,
    "SpinalCord": 20.0,
    "RightParotid": 30.0,
    "LeftParotid": 40.0,
    "Larynx": 60.0,
}


LEVELS = np.array([OAR_LEVELS.get(s, 0.0) for s in STRUCTURES], dtype=np.float32)


def level_dose(ct: np.ndarray, structures: np.ndarray, possible_dose_mask: np.ndarray) -> np.ndarray:
    """Stand-in predictor (a plain callable, given the CT-grid arrays): each OAR of :data:`OAR_LEVELS` gets its own
    dose level."""
    return (structures * LEVELS).max(axis=-1) * possible_dose_mask


class LevelNetwork(torch.nn.Module):
    """Stand-in 2D dose network on the reference input: each OAR of :data:`OAR_LEVELS` gets its own dose level."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("levels", torch.from_numpy(LEVELS)[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x[:, 1 : 1 + len(STRUCTURES)] * self.levels).amax(1, keepdim=True)


def test_other_voxel_size_keeps_the_anatomy(openkbp_dir: Path, tmp_path: Path):
    """pt_201 (5.422 x 5.422 x 3 mm, a 694 mm field, LPS) goes through the dose pipeline: reoriented to the model's
    axes, resampled in-plane to 3.906 mm (a predictor whose training range ends at 4 mm) and back.

    With :class:`LevelNetwork` as the network, every OAR's median dose on the CT grid must be its level within 20%:
    nearest-neighbour masks onto the model grid and linear interpolation back blur each border by about a
    voxel, which thin ROIs such as the cord feel. Any flip or axis swap puts the levels on the wrong ROIs.
    Without a body ROI the possible-dose mask comes from the CT threshold rule; the name map drops a ROI.
    """
    arrays, spacing = load_patient(openkbp_dir, "validation", "pt_201")
    folder = build_dicom(arrays, spacing, tmp_path / "in", body=False)
    name_map = tmp_path / "names.json"
    name_map.write_text(json.dumps({"bone mandible": None}))
    predictor = DosePredictor(LevelNetwork(), device="cpu", max_pixdim=(4.0, 4.0, 3.5))
    predict_dicom(folder / "ct", folder / "rtstruct.dcm", predictor, tmp_path / "out", name_map=name_map)
    _, dose = read_rtdose(tmp_path / "out" / "RTDOSE.dcm")
    for structure, level in OAR_LEVELS.items():
        roi = arrays["structures"][..., STRUCTURES.index(structure)] > 0
        assert np.median(dose[roi]) == pytest.approx(level, rel=0.2), structure
    assert dose[arrays["ct"] == 0].max() == 0  # outside the body
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["possible_dose_mask"] == report["body"] == "CT > -400 HU, largest connected region, holes filled"
    assert report["rois_ignored"]["Bone_Mandible"] == "set to null in the name map"
    assert "Mandible" in report["structures_missing"]
    assert report["fraction_inside"]["PTV70"] == {"possible_dose_mask": 1.0}


def write_rtplan(ct_dir: Path, path: Path, **attributes: str) -> Path:
    """A minimal RT Plan of the CT's patient and frame of reference (``attributes`` override them)."""
    first = pydicom.dcmread(next(ct_dir.iterdir()), stop_before_pixels=True)
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = RTPlanStorage, generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = RTPlanStorage, meta.MediaStorageSOPInstanceUID, "RTPLAN"
    ds.PatientID, ds.FrameOfReferenceUID = first.PatientID, first.FrameOfReferenceUID
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_rtdose_references_the_given_rtplan(pt1: tuple[Path, dict], tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    folder = pt1[0]
    plan = write_rtplan(folder / "ct", tmp_path / "plan.dcm")
    monkeypatch.setattr(DosePredictor, "from_bundle", lambda bundle, **kw: level_dose)
    args = ["predict-dicom", "--ct", str(folder / "ct"), "--rtstruct", str(folder / "rtstruct.dcm")]
    assert main([*args, "--out", str(tmp_path / "out"), "--rtplan", str(plan)]) == 0
    ds, _ = read_rtdose(tmp_path / "out" / "RTDOSE.dcm")
    (item,) = ds.ReferencedRTPlanSequence
    assert (item.ReferencedSOPClassUID, item.ReferencedSOPInstanceUID) == (
        RTPlanStorage,
        pydicom.dcmread(plan).SOPInstanceUID,
    )
    assert json.loads((tmp_path / "out" / "report.json").read_text())["rtplan"] == str(plan)


@pytest.mark.parametrize(
    "attributes, message",
    [
        ({"PatientID": "someone else"}, r"plan.dcm: PatientID 'someone else' is not the CT's"),
        ({"FrameOfReferenceUID": "1.2.3"}, r"plan.dcm: FrameOfReferenceUID '1.2.3' is not the CT's"),
        ({"SOPClassUID": RTDoseStorage}, r"plan.dcm: not an RT Plan"),
    ],
)
def test_bad_rtplan_writes_nothing(attributes: dict, message: str, pt1: tuple[Path, dict], tmp_path: Path):
    plan = write_rtplan(pt1[0] / "ct", tmp_path / "plan.dcm", **attributes)
    with pytest.raises(ValueError, match=message):
        predict_dicom(pt1[0] / "ct", pt1[0] / "rtstruct.dcm", level_dose, tmp_path / "out", rtplan=plan)
    assert not (tmp_path / "out").exists()


def corrupt(case: str, source: Path, work: Path) -> tuple[Path, Path]:
    """A copy of the DICOM in ``source`` broken as ``case`` says; returns the CT folder and RTSTRUCT."""
    ct_dir, rtstruct = work / "ct", work / "rtstruct.dcm"
    shutil.copytree(source / "ct", ct_dir)
    shutil.copy(source / "rtstruct.dcm", rtstruct)
    if case == "missing slice":
        (ct_dir / "CT064.dcm").unlink()
    elif case == "uneven spacing":
        ds = pydicom.dcmread(ct_dir / "CT064.dcm")
        ds.ImagePositionPatient[2] += 1.0
        ds.save_as(ct_dir / "CT064.dcm")
    elif case == "unreadable CT file":
        (ct_dir / "CT999.dcm").write_bytes(b"not DICOM")
    elif case == "unreadable RTSTRUCT":
        rtstruct.write_bytes(bytes(300))
    elif case == "other patient":
        ds = pydicom.dcmread(rtstruct)
        ds.PatientID = "someone else"
        ds.save_as(rtstruct)
    elif case in ("frame of reference", "no target"):
        ds = pydicom.dcmread(rtstruct)
        uid = generate_uid()
        if case == "frame of reference":
            ds.ReferencedFrameOfReferenceSequence[0].FrameOfReferenceUID = uid
        for roi in ds.StructureSetROISequence:
            if case == "frame of reference":
                roi.ReferencedFrameOfReferenceUID = uid
            elif roi.ROIName.startswith("PTV"):
                roi.ROIName = "CTV" + roi.ROIName[3:]
        ds.save_as(rtstruct)
    return ct_dir, rtstruct


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing slice", r"ct: missing slice\(s\) between CT065.dcm and CT063.dcm"),
        ("uneven spacing", r"ct: duplicate or unevenly spaced slices between CT065.dcm and CT064.dcm"),
        ("unreadable CT file", r"CT999.dcm: unreadable DICOM file"),
        ("unreadable RTSTRUCT", r"rtstruct.dcm: unreadable DICOM file"),
        ("frame of reference", r"rtstruct.dcm: ROI '.*' is in frame of reference"),
        ("no target", r"rtstruct.dcm: no target contour"),
        (
            "other patient",
            r"rtstruct.dcm: PatientID 'someone else' is not the CT's \('openkbp-test'\): another patient",
        ),
    ],
)
def test_bad_input_writes_nothing(
    case: str, message: str, pt1: tuple[Path, dict], predictor: DosePredictor, tmp_path: Path
):
    ct_dir, rtstruct = corrupt(case, pt1[0], tmp_path)
    with pytest.raises(ValueError, match=message):
        predict_dicom(ct_dir, rtstruct, predictor, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct", "rtstruct.dcm"]


def test_patient_mismatch_accepted_on_request(
    pt1: tuple[Path, dict],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture,
    caplog: pytest.LogCaptureFixture,
):
    """An RTSTRUCT of another PatientID: exit 1 naming it and nothing written; ``--allow-patient-mismatch``
    predicts, with a warning."""
    ct_dir, rtstruct = corrupt("other patient", pt1[0], tmp_path / "in")
    monkeypatch.setattr(DosePredictor, "from_bundle", lambda bundle, **kw: level_dose)
    args = ["predict-dicom", "--ct", str(ct_dir), "--rtstruct", str(rtstruct), "--out", str(tmp_path / "out")]
    assert main(args) == 1
    assert "--allow-patient-mismatch accepts them" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
    assert main([*args, "--allow-patient-mismatch"]) == 0
    assert (tmp_path / "out" / "RTDOSE.dcm").is_file()
    assert "rtstruct.dcm: PatientID 'someone else' is not the CT's ('openkbp-test'): accepted" in caplog.text


def test_unwritable_output_fails_before_reading(pt1: tuple[Path, dict], tmp_path: Path):
    """An output folder that cannot be made fails first, before the inputs are read and the dose predicted."""
    (tmp_path / "file").write_text("")
    calls = []
    with pytest.raises(PermissionError, match=r"file: cannot write there"):
        predict_dicom(pt1[0] / "ct", tmp_path / "no_such.dcm", lambda *a: calls.append(a), tmp_path / "file" / "out")
    assert calls == []


def test_cli_error(pt1: tuple[Path, dict], tmp_path: Path, capsys: pytest.CaptureFixture):
    """A bad input exits with status 1 and one ``error:`` line (here: no ROI of the requested mask name)."""
    args = ["predict-dicom", "--ct", str(pt1[0] / "ct"), "--rtstruct", str(pt1[0] / "rtstruct.dcm")]
    assert main([*args, "--out", str(tmp_path / "out"), "--possible-dose-mask", "Body"]) == 1
    assert "error: " in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
