"""The dose pipeline defined once: the bundle's configs pass MONAI's property checks, validation and inference
build the same network input, and any axis-aligned input geometry gives the dose on the input's own grid."""

from __future__ import annotations

import shutil
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.bundle import ConfigParser, ConfigWorkflow
from nibabel.processing import resample_from_to

from monai_dose.data import patient_folder_datalist
from monai_dose.inference import DosePredictor, load_patient, predict_patients
from monai_dose.networks import DCNN

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "bundles" / "openkbp_dose"
CONFIGS = BUNDLE / "configs"
FILES = ("ct", "structures", "possible_dose_mask", "dose")


@pytest.mark.parametrize("workflow_type, configs", [("infer", ["inference.json"]), ("train", ["train.json"])])
def test_bundle_properties(workflow_type, configs, openkbp_dir, tmp_path):
    """MONAI's own check of what MONAI Label, Deploy and FL drive a bundle through (on one patient per split)."""
    small = {"num_train": 1, "num_val": 1, "cache_workers": 0, "run_dir": str(tmp_path)}
    workflow = ConfigWorkflow(
        config_file=[str(CONFIGS / c) for c in configs],
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=str(CONFIGS / "logging.conf"),
        workflow_type=workflow_type,
        bundle_root=str(BUNDLE),
        dataset_dir=str(openkbp_dir),
        **(small if workflow_type == "train" else {}),
    )
    workflow.initialize()
    assert workflow.check_properties() in (None, [])


def test_validation_and_inference_build_the_same_network_input(openkbp_dir):
    """pt_201: train.json's validation dataset and inference.json's preprocessing give the same network input."""
    train = ConfigParser()
    train.read_config(CONFIGS / "train.json")
    train.update({"dataset_dir": str(openkbp_dir), "num_val": 1, "cache_workers": 0})
    validation = train.get_parsed_content("validate#dataset")[0]["image"]
    infer = ConfigParser()
    infer.read_config(CONFIGS / "inference.json")
    infer.update({"dataset_dir": str(openkbp_dir / "validation" / "pt_201")})
    inference = infer.get_parsed_content("preprocessing")(infer.get_parsed_content("dataset_data")[0])["image"]
    assert inference.shape == (15, 128, 128, 128)  # the channels of each slice: the network takes the neighbours
    assert torch.equal(torch.as_tensor(validation), torch.as_tensor(inference))


def _ras(patient: Path, out: Path) -> None:
    """``patient`` stored in RAS orientation (``nibabel.as_closest_canonical``)."""
    out.mkdir(parents=True)
    for name in FILES:
        nib.save(nib.as_closest_canonical(nib.load(patient / f"{name}.nii.gz")), out / f"{name}.nii.gz")


def _resampled(patient: Path, out: Path, spacing: float = 2.0) -> None:
    """``patient`` resampled to ``spacing`` mm voxels over the same extent and orientation (CT and dose linear,
    masks nearest)."""
    out.mkdir(parents=True)
    reference = nib.load(patient / "ct.nii.gz")
    zooms = np.asarray(reference.header.get_zooms()[:3])
    shape = tuple(int(n) for n in np.floor(np.asarray(reference.shape) * zooms / spacing))
    affine = reference.affine.copy()
    affine[:3, :3] = affine[:3, :3] / zooms * spacing
    for name in FILES:
        image = nib.load(patient / f"{name}.nii.gz")
        order = 0 if "mask" in name or name == "structures" else 1
        data = np.asanyarray(image.dataobj)
        channels = [data[..., c] for c in range(data.shape[-1])] if data.ndim == 4 else [data]
        resampled = [
            np.asanyarray(resample_from_to(nib.Nifti1Image(c, image.affine), (shape, affine), order=order).dataobj)
            for c in channels
        ]
        array = np.stack(resampled, -1) if data.ndim == 4 else resampled[0]
        nib.save(nib.Nifti1Image(array.astype(data.dtype), affine), out / f"{name}.nii.gz")


def _wider(patient: Path, out: Path, pad: list[tuple[int, int]]) -> None:
    """``patient`` in a larger field of view: its volumes padded in-plane by ``pad`` voxels of air (0), the affine
    moved so that every voxel keeps its place in the patient."""
    out.mkdir(parents=True)
    for name in FILES:
        image = nib.load(patient / f"{name}.nii.gz")
        data = np.asanyarray(image.dataobj)
        affine = image.affine @ np.array([[1, 0, 0, -pad[0][0]], [0, 1, 0, -pad[1][0]], [0, 0, 1, 0], [0, 0, 0, 1]])
        padded = np.pad(data, [*pad, (0, 0)] + [(0, 0)] * (data.ndim - 3))
        nib.save(nib.Nifti1Image(padded, affine), out / f"{name}.nii.gz")


def test_ras_input_gives_the_same_dose(tmp_path, openkbp_dir):
    """A patient stored in RAS orientation gets, reoriented back, the dose of the original voxel for voxel (a small
    random network: the geometry, not the weights, is under test)."""
    torch.manual_seed(0)
    network = DCNN(2, 45, 1, channels=(4, 8), dilations=(2,))
    torch.nn.init.constant_(network.head.conv.bias, 5.0)  # a positive dose
    predictor = DosePredictor(network, input_set="target_proximity", neighbours=1, device="cpu")
    patient = openkbp_dir / "validation" / "pt_202"
    _ras(patient, tmp_path / "ras" / "pt_202")
    doses = []
    for folder in (patient, tmp_path / "ras" / "pt_202"):
        item = patient_folder_datalist(folder)[0]
        loaded = load_patient(item)
        dose = predictor(loaded["ct"], loaded["structures"], loaded["possible_dose_mask"])
        image = nib.Nifti1Image(dose, loaded["ct"].affine.numpy())
        doses.append(np.asanyarray(nib.as_closest_canonical(image).dataobj))
    assert doses[0].max() > 0 and doses[0].std() > 0
    np.testing.assert_allclose(doses[1], doses[0], atol=1e-4)


def test_field_of_view_does_not_change_the_dose(openkbp_dir):
    """pt_202 in two larger fields of view (air around it), off-centre in different ways, gets in the network's frame
    the same dose voxel for voxel, and on its own 128 x 128 grid (kept as it is) nearly the same; run on the whole
    grid, the network sees other borders in each and predicts another dose."""
    torch.manual_seed(0)
    network = DCNN(2, 36, 1, channels=(4, 8), dilations=(2,))
    torch.nn.init.constant_(network.head.conv.bias, 5.0)  # a positive dose
    loaded = load_patient(openkbp_dir / "validation" / "pt_202")
    spacing = tuple(float(z) for z in loaded["ct"].pixdim)
    inputs = [np.asarray(loaded[k]) for k in ("ct", "structures", "possible_dose_mask")]
    pads = ([(40, 8), (3, 29)], [(6, 30), (64, 0)])  # 176 x 160 and 164 x 192, the patient near different edges
    doses = {}
    for frame in ((128, 128), None):
        predictor = DosePredictor(network, neighbours=1, device="cpu", amp=False, frame=frame)
        doses[frame] = [predictor(*inputs, voxel_spacing=spacing)]
        for pad in pads:
            embedded = [np.pad(a, pad + [(0, 0)] * (a.ndim - 2)) for a in inputs]
            wide = predictor(*embedded, voxel_spacing=spacing)
            grid = (slice(pad[0][0], pad[0][0] + 128), slice(pad[1][0], pad[1][0] + 128))
            doses[frame].append(wide[grid].copy())
            wide[grid] = 0
            assert not wide.any()  # no dose outside the patient's grid: outside its mask
    own, first, second = doses[(128, 128)]
    assert own.max() > 0 and own.std() > 0
    np.testing.assert_allclose(second, first, atol=1e-5)
    assert 0 < np.abs(first - own).mean() < 0.1 * own.mean()  # pt_202's mask is 1 column off its grid's centre
    own, first, second = doses[None]
    assert np.abs(second - first).max() > 0.01


@pytest.mark.parametrize(
    "problem, message",
    [
        ("oblique", "oblique orientation"),
        ("affine", "affine differs from the CT affine"),
        ("grid", "differs from the CT grid"),
    ],
)
def test_geometry_that_cannot_be_handled_is_named(problem, message, tmp_path, openkbp_dir):
    """An oblique CT, or a mask on another affine or grid than the CT's: an error naming the file and the reason;
    the other patient is still predicted."""
    for pid in ("pt_201", "pt_202"):
        shutil.copytree(openkbp_dir / "validation" / pid, tmp_path / "in" / pid)
    patient = tmp_path / "in" / "pt_202"
    name = "ct" if problem == "oblique" else "possible_dose_mask"
    image = nib.load(patient / f"{name}.nii.gz")
    data, affine = np.asanyarray(image.dataobj), image.affine.copy()
    if problem == "oblique":
        angle = np.deg2rad(10)
        rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
        affine[:3, :3] = rotation @ affine[:3, :3]
    elif problem == "affine":
        affine[:3, 3] += 10
    else:
        data = data[:, :, :100]
    nib.save(nib.Nifti1Image(data, affine), patient / f"{name}.nii.gz")
    predictor = DosePredictor(DCNN(2, 36, 1, channels=(4, 8), dilations=(2,)), neighbours=1, device="cpu")
    with pytest.raises(RuntimeError, match=r"1 of 2 patients failed \(pt_202: .*") as err:
        predict_patients(predictor, patient_folder_datalist(tmp_path / "in"), tmp_path / "out")
    assert f"{name}.nii.gz: " in str(err.value) and message in str(err.value)
    assert (tmp_path / "out" / "pt_201" / "dose.nii.gz").is_file()


@pytest.mark.slow
def test_bundle_inference_of_any_geometry(tmp_path, openkbp_dir):
    """With the shipped weights: pt_202 stored in RAS orientation gets the dose of the original within 0.05 Gy
    voxel for voxel once reoriented back; in a larger field of view (176 x 160, off-centre), where the network's frame
    is centred on the mask (1 column off the original grid's centre), its mean absolute error against the plan dose
    stays within 0.1 Gy of the original's; resampled to 2 mm voxels, its mean absolute error against the equally
    resampled plan dose stays within 0.5 Gy of the original's."""
    patient = openkbp_dir / "validation" / "pt_202"
    root = tmp_path / "in"
    shutil.copytree(patient, root / "original")
    _ras(patient, root / "ras")
    _resampled(patient, root / "mm2")
    _wider(patient, root / "wide", [(40, 8), (3, 29)])
    workflow = ConfigWorkflow(
        config_file=str(CONFIGS / "inference.json"),
        logging_file=False,
        workflow_type="infer",
        bundle_root=str(BUNDLE),
        dataset_dir=str(root),
        output_dir=str(tmp_path / "out"),
    )
    workflow.initialize()
    workflow.run()
    workflow.finalize()

    def dose(folder: str, name: str = "dose", out: bool = True) -> nib.Nifti1Image:
        return nib.load((tmp_path / "out" if out else root) / folder / f"{name}.nii.gz")

    for folder in ("original", "ras", "mm2", "wide"):
        written, ct = dose(folder), nib.load(root / folder / "ct.nii.gz")
        assert written.shape == ct.shape and np.allclose(written.affine, ct.affine)
    original = np.asanyarray(dose("original").dataobj)
    ras = np.asanyarray(nib.as_closest_canonical(dose("ras")).dataobj)
    reference = np.asanyarray(nib.as_closest_canonical(dose("original")).dataobj)
    assert np.abs(ras - reference).max() <= 0.05

    def error(folder: str) -> float:
        mask = np.asanyarray(dose(folder, "possible_dose_mask", out=False).dataobj) > 0
        plan = np.asanyarray(dose(folder, out=False).dataobj)
        return float(np.abs(np.asanyarray(dose(folder).dataobj) - plan)[mask].mean())

    assert original.max() > 30
    assert abs(error("mm2") - error("original")) <= 0.5, (error("mm2"), error("original"))
    assert abs(error("wide") - error("original")) <= 0.1, (error("wide"), error("original"))
