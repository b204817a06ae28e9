"""`scripts/gpu_kit.py`: the compact dataset a lent GPU run carries gives the same network inputs and labels on
the slices training and validation read."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import torch

from monai_dose.data import load_openkbp_datalist
from monai_dose.transforms import scale_ct

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_kit.py"
spec = importlib.util.spec_from_file_location("gpu_kit", SCRIPT)
gpu_kit = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_kit)


def _scaled_bf16(ct: np.ndarray) -> torch.Tensor:
    return scale_ct(torch.from_numpy(ct.astype(np.float32))).to(torch.bfloat16)


def _world(image: nib.Nifti1Image, k: int) -> np.ndarray:
    return image.affine @ np.array([0, 0, k, 1.0])


def test_compact_copy_keeps_what_training_and_validation_read(openkbp_dir, tmp_path):
    archive = tmp_path / "kit" / "openkbp.tar.xz"
    assert (
        gpu_kit.main(["pack", "--data", str(openkbp_dir), "--out", str(archive), "--num_train", "2", "--num_val", "1"])
        == 0
    )
    assert not list(archive.parent.glob("*.partial"))
    gpu_kit.main(["unpack", str(archive), str(tmp_path / "data")])
    assert json.loads((tmp_path / "data" / "dataset.json").read_text())["compact_copy"].startswith("slices of")
    for split in ("training", "validation"):
        originals = load_openkbp_datalist(openkbp_dir, split)
        copies = load_openkbp_datalist(tmp_path / "data", split)
        assert [c["id"] for c in copies] == [o["id"] for o in originals[: len(copies)]] and len(copies) == (
            2 if split == "training" else 1
        )
        for original, copy in zip(originals, copies, strict=False):
            assert copy["voxel_dimensions"] == original["voxel_dimensions"]
            mask = np.asanyarray(nib.load(original["possible_dose_mask"]).dataobj)
            kept = gpu_kit.kept_slices(mask)
            occupied = np.flatnonzero(mask.any((0, 1)))
            assert kept.start == max(occupied[0] - 2, 0) and kept.stop == min(occupied[-1] + 3, mask.shape[2])
            for key in ("ct", "structures", "possible_dose_mask", "dose"):
                full, small = nib.load(original[key]), nib.load(copy[key])
                assert small.shape[2] == kept.stop - kept.start and small.shape[:2] == full.shape[:2]
                # every kept voxel keeps its position in the world
                np.testing.assert_allclose(_world(small, 0), _world(full, kept.start))
                np.testing.assert_allclose(small.affine[:3, :3], full.affine[:3, :3])
                assert nib.aff2axcodes(small.affine) == nib.aff2axcodes(full.affine)
                a, b = np.asanyarray(full.dataobj)[:, :, kept], np.asanyarray(small.dataobj)
                if key == "ct" and split == "training":
                    assert torch.equal(_scaled_bf16(b), _scaled_bf16(a))  # what bf16 training sees
                    assert not np.array_equal(a, b)
                elif key == "dose" and split == "training":
                    np.testing.assert_allclose(b, a, atol=gpu_kit.DOSE_STEP_GY / 2 + 1e-4)
                    assert b.dtype.kind == "f" and np.asarray(small.dataobj.get_unscaled()).dtype == np.int16
                else:
                    np.testing.assert_array_equal(b, a)
