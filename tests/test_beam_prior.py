"""BeamPrior: the beam-geometry prior on synthetic water phantoms."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor

from monai_dose.data import STRUCTURES
from monai_dose.data.openkbp import openkbp_affine
from monai_dose.transforms import BEAM_ANGLES_DEG, BeamPrior, BeamPriord

SPACING = (3.0, 3.0, 2.5)
POSTERIOR_ANGLES = tuple(range(20, 360, 40))
DEVICES = ["cpu", *(["cuda"] if torch.cuda.is_available() else [])]


def phantom(
    shape: tuple[int, int, int] = (64, 64, 4),
    spacing: tuple[float, ...] = SPACING,
    centre_mm: tuple[float, float] = (0.0, 0.0),
    target_radius_mm: float = 9.0,
    body_radius_mm: float = 90.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Structures with a PTV70 disk on the middle slices and a water-cylinder body, both defined in mm from the
    centre of the slice (axis 0, axis 1)."""
    x0 = (torch.arange(shape[0]) - (shape[0] - 1) / 2) * spacing[0]
    x1 = (torch.arange(shape[1]) - (shape[1] - 1) / 2) * spacing[1]
    r0, r1 = torch.meshgrid(x0, x1, indexing="ij")
    body = (r0**2 + r1**2 <= body_radius_mm**2)[None, ..., None].expand(1, *shape).to(torch.uint8)
    disk = (r0 - centre_mm[0]) ** 2 + (r1 - centre_mm[1]) ** 2 <= target_radius_mm**2
    structures = torch.zeros(len(STRUCTURES), *shape, dtype=torch.uint8)
    structures[STRUCTURES.index("PTV70"), ..., 1 : shape[2] - 1] = disk[..., None].to(torch.uint8)
    return structures, body


def polar_voxel(radius_mm: float, angle_deg: float, shape=(64, 64), spacing=SPACING) -> tuple[int, int]:
    """The voxel ``radius_mm`` from the slice centre towards the source of a beam at gantry ``angle_deg``."""
    theta = np.deg2rad(angle_deg)
    return (
        int(round((shape[0] - 1) / 2 - radius_mm * np.cos(theta) / spacing[0])),
        int(round((shape[1] - 1) / 2 + radius_mm * np.sin(theta) / spacing[1])),
    )


def test_highest_in_target_and_along_the_beams():
    structures, body = phantom()
    prior = BeamPrior()(structures, body, SPACING)
    assert prior.shape == (1, 64, 64, 4) and prior.dtype == torch.float32
    target = structures[STRUCTURES.index("PTV70")] > 0
    assert prior[0][target].min() > 0.5 and prior[0][target].min() > prior[0][~target].max() - 0.05
    far = phantom(target_radius_mm=24.0)[0][STRUCTURES.index("PTV70")] == 0  # 15 mm or more outside the target
    assert prior[0][target].mean() > 2 * prior[0][far].max()
    assert torch.all(prior[..., [0, 3]] == 0)  # no target on the slice: no beam
    assert torch.all(prior[0][body[0] == 0] == 0)
    # 80 mm from the centre: on the axis of each beam, upstream and downstream of the target (one half-line every
    # 20 deg), but in no beam 10 deg off them (14 mm off the axes, the target's radius is 9 mm)
    for angle in BEAM_ANGLES_DEG:
        for side in (0.0, 180.0):
            on_axis = prior[0][(*polar_voxel(80.0, angle + side), 2)]
            between = prior[0][(*polar_voxel(80.0, angle + side + 10.0), 2)]
            assert on_axis > 0.03 and between < 0.003, (angle, side)


def test_beams_enter_from_their_gantry_side_and_attenuate():
    structures, body = phantom()
    beams = BeamPrior(per_beam=True)(structures, body, SPACING)
    assert beams.shape == (9, 64, 64, 4)
    torch.testing.assert_close(beams.mean(0, keepdim=True), BeamPrior()(structures, body, SPACING))
    # gantry 0 enters from the anterior (axis 0 index 0): decreasing from entrance to exit along axis 0
    centre_column = beams[0, 5:59, 31, 2]
    assert torch.all(centre_column[1:] < centre_column[:-1])
    ratio = centre_column[1:] / centre_column[:-1]
    torch.testing.assert_close(ratio[5:-5], torch.full_like(ratio[5:-5], np.exp(-0.005 * SPACING[0])))
    # gantry 80 enters from the patient's left (high axis 1 index)
    left, right = beams[2][(*polar_voxel(45.0, 80.0), 2)], beams[2][(*polar_voxel(45.0, 260.0), 2)]
    assert left > right > 0


def test_left_right_flip_flips_the_prior_and_anterior_posterior_flip_offsets_the_angles():
    structures, body = phantom(centre_mm=(20.0, -35.0), target_radius_mm=12.0)
    for angles in (BEAM_ANGLES_DEG, POSTERIOR_ANGLES):
        prior = BeamPrior(angles)(structures, body, SPACING)
        flipped = BeamPrior(angles)(structures.flip(2), body.flip(2), SPACING)
        torch.testing.assert_close(flipped, prior.flip(2), atol=1e-4, rtol=0)
    mirrored = BeamPrior()(structures.flip(1), body.flip(1), SPACING)
    torch.testing.assert_close(
        mirrored, BeamPrior(POSTERIOR_ANGLES)(structures, body, SPACING).flip(1), atol=1e-4, rtol=0
    )
    assert (mirrored - BeamPrior()(structures, body, SPACING).flip(1)).abs().max() > 0.03  # a beam is 1 / 9


def test_anisotropic_spacing_rotates_in_mm():
    spacing = (2.0, 5.0, 2.5)
    structures, body = phantom((64, 32, 3), spacing, target_radius_mm=8.0, body_radius_mm=1000.0)
    beams = BeamPrior((0, 40, 90), per_beam=True)(structures, body, spacing)
    kw = {"shape": (64, 32), "spacing": spacing}
    # gantry 40 runs at 40 deg in mm (not in voxels): on its axis 40 mm out, not on the voxel-space diagonal
    on_axis = polar_voxel(40.0, 40.0, **kw)
    voxel_diagonal = (on_axis[0], int(round(15.5 + (31.5 - on_axis[0]) * np.tan(np.deg2rad(40.0)))))
    assert beams[1][(*on_axis, 1)] > 0.5 and beams[1][(*voxel_diagonal, 1)] == 0
    # depths in mm: attenuation per voxel exp(-mu * s0) along axis 0 (gantry 0) and exp(-mu * s1) along axis 1
    along_0, along_1 = beams[0, 40:60, 16, 1], beams[2, 31, 2:12, 1].flip(0)
    torch.testing.assert_close(along_0[1:] / along_0[:-1], torch.full((19,), np.exp(-0.005 * 2.0)))
    torch.testing.assert_close(along_1[1:] / along_1[:-1], torch.full((9,), np.exp(-0.005 * 5.0)), rtol=0, atol=2e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_metatensor_spacing_device_and_dtype(device):
    structures, body = phantom()
    meta = MetaTensor(structures, affine=torch.as_tensor(openkbp_affine(SPACING))).to(device)
    prior = BeamPrior(dtype=torch.float16)(meta, body.to(device))
    assert prior.device.type == device and prior.dtype == torch.float16 and not isinstance(prior, MetaTensor)
    torch.testing.assert_close(prior.cpu().float(), BeamPrior()(structures, body, SPACING), atol=1e-3, rtol=1e-3)
    with pytest.raises(ValueError, match="voxel_spacing"):
        BeamPrior()(structures, body)
    with pytest.raises(ValueError, match="structures"):
        BeamPrior()(structures[:3], body, SPACING)
    with pytest.raises(ValueError, match="body"):
        BeamPrior()(structures, body[..., :2], SPACING)


def test_no_target_and_ct_body():
    structures, body = phantom()
    assert torch.all(BeamPrior()(torch.zeros_like(structures), body, SPACING) == 0)
    ct = body.to(torch.int16) * 1024  # water at HU 0, 0 outside the body
    torch.testing.assert_close(
        BeamPrior(body_threshold=100)(structures, ct, SPACING), BeamPrior()(structures, body, SPACING)
    )


def test_dictionary_wrapper():
    structures, body = phantom()
    meta = MetaTensor(structures, affine=torch.as_tensor(openkbp_affine(SPACING)))
    out = BeamPriord(per_beam=True)({"structures": meta, "possible_dose_mask": body})
    torch.testing.assert_close(out["beam_prior"], BeamPrior(per_beam=True)(structures, body, SPACING))
    assert set(out) == {"structures", "possible_dose_mask", "beam_prior"}
    with pytest.raises(ValueError, match="structures and body"):
        BeamPriord(keys="structures")
