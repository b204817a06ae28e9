"""Transforms: model input assembly (also on the training device: PrepareDoseBatch), mask packing, slice sampling,
joint augmentation, masked-dose post-processing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import MetaTensor, list_data_collate
from monai.transforms import Compose, LoadImaged

from monai_dose.data import STRUCTURES, dlmi_loader, load_dlmi_datalist, load_openkbp_datalist
from monai_dose.engines import PrepareDoseBatch
from monai_dose.transforms import (
    BatchRandAffine,
    BatchRandAffined,
    BeamPrior,
    DoseInput,
    DoseInputd,
    FrameCropd,
    MaskDose,
    MaskDosed,
    PackMasks,
    PackMasksd,
    RandSliceSampled,
    SliceMajord,
    SliceNeighbours,
    TargetProximity,
    TargetProximityd,
    UnpackMasks,
    derived_inputs,
    frame_window,
    input_channel_names,
    input_channels,
    mask_channel,
    torch_distance_transform_edt,
)

KEYS = ["ct", "structures", "possible_dose_mask", "dose"]


def synthetic_patient(shape=(16, 16, 12), seed=0) -> dict[str, torch.Tensor]:
    """A small volume with a box-shaped possible-dose mask on slices 3..8 and dose only inside it."""
    rng = np.random.default_rng(seed)
    mask = np.zeros((1, *shape), np.uint8)
    mask[:, 3:13, 2:14, 3:9] = 1
    structures = (rng.random((10, *shape)) > 0.7).astype(np.uint8) * mask
    dose = (rng.random((1, *shape)) * 70).astype(np.float32) * mask
    ct = rng.integers(-100, 5000, (1, *shape)).astype(np.int16)
    return {k: torch.as_tensor(v) for k, v in zip(KEYS, (ct, structures, mask, dose), strict=True)}


def test_dose_input_reference_channels():
    p = synthetic_patient()
    image = DoseInput("reference")(p["ct"], p["structures"], p["possible_dose_mask"])
    assert image.shape == (12, 16, 16, 12) and image.dtype == torch.float32
    assert image[0].min() >= 0 and image[0].max() <= 1  # CT clipped to 0..4095 and scaled
    np.testing.assert_allclose(image[0], np.clip(p["ct"][0].numpy(), 0, 4095) / 4095, rtol=1e-6)
    assert torch.equal(image[1:11], p["structures"].float())
    assert torch.equal(image[11], p["possible_dose_mask"][0].float())


def test_dose_input_merged_targets():
    p = synthetic_patient()
    image = DoseInput("merged_targets")(p["ct"], p["structures"], p["possible_dose_mask"])
    assert image.shape[0] == input_channels("merged_targets") == 10
    s = p["structures"].float()
    expected = torch.maximum(torch.maximum(s[7] * 56 / 70, s[8] * 63 / 70), s[9])
    assert torch.allclose(image[8], expected)


def test_dose_input_errors():
    p = synthetic_patient()
    with pytest.raises(ValueError, match="structure channels"):
        DoseInput()(p["ct"], p["structures"][:9], p["possible_dose_mask"])
    with pytest.raises(ValueError, match="same grid"):
        DoseInput()(p["ct"][..., :-1], p["structures"], p["possible_dose_mask"])
    with pytest.raises(ValueError, match="unknown input_set"):
        DoseInput("everything")


@pytest.mark.parametrize("shape, spacing", [((2, 20, 17, 11), (3.9, 2.1, 2.5)), ((1, 9, 13), (1.0, 2.0))])
def test_torch_distance_transform_matches_scipy(shape, spacing):
    """The GPU path's exact distance transform gives scipy's distances (per channel, anisotropic voxels)."""
    from scipy import ndimage

    img = np.random.default_rng(0).random(shape) > 0.05  # sparse zeros: long distances
    expected = np.stack([ndimage.distance_transform_edt(c, sampling=spacing) for c in img])
    got = torch_distance_transform_edt(torch.from_numpy(img), spacing)
    assert got.dtype == torch.float32
    np.testing.assert_allclose(got.numpy(), expected, atol=1e-4)
    assert torch_distance_transform_edt(torch.ones(1, 4, 4)).isinf().all()  # no zero voxel: infinitely far


def test_target_proximity_is_the_same_with_and_without_edt(monkeypatch):
    """The CPU's two exact distance transforms (the ``edt`` package of the ``fast`` extra, and scipy) give the
    same proximity."""
    import monai_dose.transforms.array as array

    pytest.importorskip("edt")
    structures = torch.from_numpy(np.random.default_rng(1).random((10, 24, 20, 12)) > 0.995).to(torch.uint8)
    fast = TargetProximity()(structures, voxel_spacing=(3.9, 2.7, 2.5))
    monkeypatch.setattr(array, "HAS_EDT", False)
    torch.testing.assert_close(TargetProximity()(structures, voxel_spacing=(3.9, 2.7, 2.5)), fast, atol=1e-5, rtol=0)


def test_target_proximity_stays_on_the_structures_device():
    """Off the CPU without cuCIM the proximity is computed in torch where the structures are, never on the host:
    shown on PyTorch's ``meta`` device, which the host's scipy cannot read."""
    structures = torch.zeros(10, 8, 8, 4, dtype=torch.uint8, device="meta")
    proximity = TargetProximity()(structures, voxel_spacing=(2.0, 2.0, 3.0))
    assert proximity.device.type == "meta" and proximity.shape == (3, 8, 8, 4)


def test_target_proximity_follows_distance_in_mm():
    structures = torch.zeros(10, 20, 20, 20, dtype=torch.uint8)
    structures[STRUCTURES.index("PTV70"), 5, 5, 5] = 1
    structures[STRUCTURES.index("PTV56"), 10:, :, :] = 1
    proximity = TargetProximity(length_mm=30.0)(structures, voxel_spacing=(2.0, 4.0, 3.0))
    assert proximity.shape == (3, 20, 20, 20)
    ptv56, ptv63, ptv70 = proximity
    assert not ptv63.any()  # absent target: no proximity anywhere
    assert ptv70[5, 5, 5] == 1 and ptv56[10:].eq(1).all()
    for offset, axis_mm in ((3, 2.0), (3, 4.0), (4, 3.0)):  # voxel spacing of each axis enters the distance
        index = [5, 5, 5]
        index[[2.0, 4.0, 3.0].index(axis_mm)] += offset
        assert ptv70[tuple(index)] == pytest.approx(np.exp(-offset * axis_mm / 30.0), rel=1e-5)
    assert ptv56[7, 0, 0] == pytest.approx(np.exp(-3 * 2.0 / 30.0), rel=1e-5)
    # a MetaTensor carries its spacing in the affine; a plain array must be given one
    meta = MetaTensor(structures, affine=torch.diag(torch.tensor([2.0, 4.0, 3.0, 1.0], dtype=torch.float64)))
    assert torch.equal(
        TargetProximityd("structures", length_mm=30.0)({"structures": meta})["target_proximity"], proximity
    )
    with pytest.raises(ValueError, match="voxel spacing"):
        TargetProximity()(structures)


def test_dose_input_target_proximity_channels():
    p = synthetic_patient()
    proximity = TargetProximity()(p["structures"], voxel_spacing=(4.0, 4.0, 2.5))
    image = DoseInput("target_proximity")(p["ct"], p["structures"], p["possible_dose_mask"], proximity)
    names = input_channel_names("target_proximity")
    assert image.shape[0] == input_channels("target_proximity") == len(names) == 15
    reference = DoseInput()(p["ct"], p["structures"], p["possible_dose_mask"])
    assert torch.equal(image[names.index("PTV63_proximity")], proximity[1])
    assert torch.equal(image[[i for i, n in enumerate(names) if "proximity" not in n]], reference)
    with pytest.raises(ValueError, match=r"input set 'target_proximity' needs \['target_proximity'\]"):
        DoseInput("target_proximity")(p["ct"], p["structures"], p["possible_dose_mask"])
    with pytest.raises(ValueError, match="expected 3 target_proximity channels, got 2"):
        DoseInput("target_proximity")(p["ct"], p["structures"], p["possible_dose_mask"], proximity[:2])
    # the beam-prior input set: the proximity set's channels and the prior before the mask
    prior = BeamPrior()(p["structures"], p["possible_dose_mask"], voxel_spacing=(4.0, 4.0, 2.5))
    beam = DoseInput("beam_prior")(p["ct"], p["structures"], p["possible_dose_mask"], proximity, prior)
    names = input_channel_names("beam_prior")
    assert beam.shape[0] == len(names) == 16 and names[-2:] == ["beam_prior", "possible_dose_mask"]
    assert torch.equal(beam[names.index("beam_prior")], prior[0])
    assert torch.equal(beam[[i for i, n in enumerate(names) if n != "beam_prior"]], image)
    with pytest.raises(ValueError, match=r"beam_prior \(16, 16, 8\): not on the same grid"):
        DoseInput("beam_prior")(p["ct"], p["structures"], p["possible_dose_mask"], proximity, prior[..., :8])


def test_input_channel_names_are_channel_major():
    names = input_channel_names("reference", neighbours=1)
    assert names[:4] == ["ct[-1]", "ct[0]", "ct[1]", "Brainstem[-1]"]
    assert names[mask_channel("reference", 1)] == "possible_dose_mask[0]"
    assert input_channel_names("target_proximity", 1)[mask_channel("target_proximity", 1)] == "possible_dose_mask[0]"


def test_slice_sampling_only_where_mask_is_non_empty():
    p = synthetic_patient()
    sampler = RandSliceSampled(KEYS, num_samples=20)
    sampler.set_random_state(0)
    samples = sampler(p)
    assert len(samples) == 20
    mask = p["possible_dose_mask"]
    for s in samples:
        assert s["ct"].shape == (1, 16, 16) and s["structures"].shape == (10, 16, 16)
        k = next(k for k in range(mask.shape[-1]) if torch.equal(p["dose"][..., k], s["dose"]))
        assert 3 <= k < 9  # sampled slice has possible dose
        assert torch.equal(s["ct"], p["ct"][..., k]) and torch.equal(s["structures"], p["structures"][..., k])


def test_neighbour_slices_match_volume_expansion():
    """2.5D: sampled slices with neighbours equal the same slices of the expanded volume (same channel order)."""
    p = synthetic_patient()
    sampler = RandSliceSampled(KEYS, num_samples=6, neighbours=1, neighbour_keys=KEYS[:3])
    sampler.set_random_state(1)
    samples = sampler(p)
    image_volume = SliceNeighbours(1)(DoseInput()(p["ct"], p["structures"], p["possible_dose_mask"]))
    assert image_volume.shape[0] == input_channels("reference", 1) == 36
    for s in samples:
        assert s["dose"].shape == (1, 16, 16) and s["ct"].shape == (3, 16, 16)
        k = next(k for k in range(12) if torch.equal(p["dose"][..., k], s["dose"]))
        image = DoseInput()(s["ct"], s["structures"], s["possible_dose_mask"])
        assert torch.equal(image, image_volume[..., k])
        assert torch.equal(image[mask_channel("reference", 1)], p["possible_dose_mask"][0, ..., k].float())
    edge = SliceNeighbours(1)(p["ct"])  # replicated edge slice
    assert torch.equal(edge[0, ..., 0], p["ct"][0, ..., 0])


def test_slice_major_layout_samples_the_same_slices():
    p = synthetic_patient()
    moved = SliceMajord(KEYS)(p)
    for key in KEYS:
        assert torch.equal(moved[key], p[key]) and moved[key].movedim(-1, 0).is_contiguous()
    sampler = RandSliceSampled(KEYS, num_samples=6, neighbours=1, neighbour_keys=KEYS[:3])
    plain, sliced = sampler.set_random_state(2)(p), sampler.set_random_state(2)(moved)
    for a, b in zip(plain, sliced, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in KEYS)


def test_empty_mask_is_an_error():
    p = synthetic_patient()
    p["possible_dose_mask"] = torch.zeros_like(p["possible_dose_mask"])
    with pytest.raises(ValueError, match="empty"):
        RandSliceSampled(KEYS)(p)


def test_mask_dose_clips_and_masks():
    dose = torch.tensor([[[-1.0, 2.0], [3.0, 4.0]]])
    mask = torch.tensor([[[1, 1], [0, 1]]], dtype=torch.uint8)
    assert torch.equal(MaskDose()(dose, mask), torch.tensor([[[0.0, 2.0], [0.0, 4.0]]]))
    np.testing.assert_array_equal(MaskDose()(dose.numpy(), mask.numpy()), [[[0.0, 2.0], [0.0, 4.0]]])
    out = MaskDosed("pred")({"pred": dose, "possible_dose_mask": mask})
    assert out["pred"].min() == 0
    # a batch of doses with 3-slice mask stacks: each dose is masked by its central mask slice
    doses, stacks = torch.randn(4, 1, 5, 5), (torch.rand(4, 3, 5, 5) > 0.5).float()
    expected = torch.stack([MaskDose()(d, m) for d, m in zip(doses, stacks, strict=True)])
    assert torch.equal(MaskDose(channel_dim=1)(doses, stacks), expected)
    assert torch.equal(expected[:, 0] > 0, (doses[:, 0] > 0) & (stacks[:, 1] > 0))


def test_packed_masks_round_trip_through_slices_with_neighbours():
    p = synthetic_patient()
    packed = PackMasks()(p["structures"])
    assert packed.shape == (1, 16, 16, 12) and packed.dtype == torch.int16
    assert torch.equal(UnpackMasks(10)(packed), p["structures"].float())
    # 2.5D: unpacking the packed neighbour slices gives the per-mask neighbour slices in DoseInput's order
    expanded = SliceNeighbours(1)(p["structures"])
    assert torch.equal(UnpackMasks(10)(SliceNeighbours(1)(packed)), expanded.float())
    assert PackMasks()(torch.ones(20, 2, 2)).dtype == torch.int32
    with pytest.raises(ValueError, match="at most 31"):
        PackMasks()(torch.ones(32, 2, 2))


MODES = ["bilinear", "nearest", "nearest", "bilinear"]


def sampled_batch(pack: bool, shape=(32, 32, 12), seed=7) -> dict[str, torch.Tensor]:
    """A collated batch of 2.5D slices drawn from two synthetic patients (structures packed or not)."""
    sampler = RandSliceSampled(KEYS, num_samples=3, neighbours=1, neighbour_keys=KEYS[:3])
    chain = Compose([PackMasksd("structures"), sampler] if pack else [sampler])
    chain.set_random_state(seed)
    samples = [s for i in range(2) for s in chain(synthetic_patient(shape, seed=i))]
    return {k: v.float() for k, v in list_data_collate(samples).items()}


def test_batch_affine_flip_and_identity_are_exact():
    x = torch.rand(4, 2, 16, 16)
    assert torch.allclose(BatchRandAffine(prob=0.0, flip_prob=0.0)(x), x, atol=1e-5)
    assert torch.equal(BatchRandAffine(prob=0.0, flip_prob=1.0)(x, "nearest"), x.flip(3))  # left-right: W
    volume = torch.rand(2, 1, 8, 8, 6)
    assert torch.allclose(BatchRandAffine(prob=0.0, flip_prob=1.0)(volume), volume.flip(3), atol=1e-5)


def test_batch_affine_draws_per_sample():
    same = torch.rand(1, 1, 32, 32).repeat(6, 1, 1, 1)
    moved = BatchRandAffine(prob=1.0, flip_prob=0.0).set_random_state(0)(same)
    assert not torch.allclose(moved[0], moved[1])  # every sample has its own draw
    affine = BatchRandAffine()
    affine.randomize(batch_size=6)
    with pytest.raises(ValueError, match="drawn for a batch of 6, got a batch of 2"):
        affine(torch.rand(2, 1, 8, 8), randomize=False)


def test_batch_augmentation_keeps_masks_exact_and_aligned():
    """One draw per sample for every key: nearest keeps masks binary and packed bits exact, CT and dose align."""
    plain, packed = sampled_batch(pack=False), sampled_batch(pack=True)
    plain["ct"] = plain["dose"].repeat(1, 3, 1, 1)  # identical content makes the alignment check exact
    moved_plain = BatchRandAffined(KEYS, mode=MODES, prob=1.0, flip_prob=0.5).set_random_state(3)(plain)
    moved_packed = BatchRandAffined(KEYS, mode=MODES, prob=1.0, flip_prob=0.5).set_random_state(3)(packed)
    assert set(torch.unique(moved_plain["structures"]).tolist()) == {0.0, 1.0}
    assert set(torch.unique(moved_plain["possible_dose_mask"]).tolist()) == {0.0, 1.0}
    for i in range(6):
        assert torch.equal(UnpackMasks(10)(moved_packed["structures"][i]), moved_plain["structures"][i])
        assert torch.allclose(moved_plain["ct"][i, 1], moved_plain["dose"][i, 0], atol=1e-5)
    assert not torch.equal(moved_plain["structures"], plain["structures"])


@pytest.mark.parametrize(
    "input_set, channels",
    [("reference", 36), ("merged_targets", 30), ("target_proximity", 45), ("beam_prior", 48)],
)
def test_prepare_dose_batch_equals_per_sample_input_assembly(input_set, channels):
    patients = [synthetic_patient(seed=i) for i in range(2)]
    keys = [*KEYS, *derived_inputs(input_set)]
    for p in patients:
        p["target_proximity"] = TargetProximity()(p["structures"], voxel_spacing=(4.0, 4.0, 2.5))
        p["beam_prior"] = BeamPrior()(p["structures"], p["possible_dose_mask"], voxel_spacing=(4.0, 4.0, 2.5))
    input_keys = [k for k in keys if k != "dose"]

    def sample(pack: bool) -> list[dict]:
        sampler = RandSliceSampled(keys, num_samples=3, neighbours=1, neighbour_keys=input_keys)
        chain = Compose([PackMasksd("structures"), sampler] if pack else [sampler])
        chain.set_random_state(7)
        return [s for p in patients for s in chain(dict(p))]

    packed, plain = sample(pack=True), sample(pack=False)
    image, label = PrepareDoseBatch(input_set, keys)(list_data_collate(packed), torch.device("cpu"))
    assert image.shape == (6, channels, 16, 16) and image.dtype == torch.float32
    for i, s in enumerate(plain):
        assert torch.equal(image[i], DoseInput(input_set)(*(s[k] for k in input_keys)))
        assert torch.equal(label[i], s["dose"])
    # bf16 assembly (for autocast training) holds exactly the values autocast would round the float32 input to
    image_bf16, label_bf16 = PrepareDoseBatch(input_set, keys, dtype=torch.bfloat16)(list_data_collate(packed), "cpu")
    assert image_bf16.dtype == torch.bfloat16 and torch.equal(image_bf16, image.to(torch.bfloat16))
    assert torch.equal(label_bf16, label)
    # for the DVH-aware loss, the label carries the central slice's structure masks after the dose
    _, label_masks = PrepareDoseBatch(input_set, keys, label_masks=True)(list_data_collate(packed), "cpu")
    assert label_masks.shape == (6, 11, 16, 16) and torch.equal(label_masks[:, :1], label)
    for i, s in enumerate(plain):
        assert torch.equal(label_masks[i, 1:], s["structures"][1::3])  # mask-major, the central of 3 slices


def test_prepare_dose_batch_augments_before_assembly():
    batch = sampled_batch(pack=True)
    augment = BatchRandAffined(KEYS, mode=MODES, prob=1.0)
    image, label = PrepareDoseBatch(transform=augment.set_random_state(4))(batch, torch.device("cpu"))
    moved = BatchRandAffined(KEYS, mode=MODES, prob=1.0).set_random_state(4)(batch)
    for i in range(6):
        expected = DoseInput()(moved["ct"][i], UnpackMasks(10)(moved["structures"][i]), moved["possible_dose_mask"][i])
        assert torch.equal(image[i], expected)
    central_mask = image[:, mask_channel("reference", 1)]
    assert label.sum() > 0 and (label[:, 0][central_mask == 0] == 0).all()  # no dose outside the moved mask


def test_prepare_dose_batch_needs_four_keys():
    with pytest.raises(ValueError, match="expected the CT"):
        PrepareDoseBatch(keys=("ct", "structures"))


def test_dlmi_sample_matches_openkbp_slice(openkbp_dir, dlmi_dir):
    """A DLMI sample and the OpenKBP slice it came from give the same 12-channel image."""
    import csv

    origin = {r["sample"]: r for r in csv.DictReader(open(dlmi_dir / "origin.csv")) if r["split"] == "train"}
    sample = load_dlmi_datalist(dlmi_dir, "train")[0]
    row = origin[sample["id"]]
    patient = next(d for d in load_openkbp_datalist(openkbp_dir, "training") if d["id"] == row["openkbp_patient"])
    k = int(row["slice_index_axis2"])
    volume = Compose([LoadImaged(KEYS, dtype=None, image_only=True, ensure_channel_first=True)])(patient)
    dlmi = dlmi_loader()(sample)
    to_image = DoseInputd()
    from_volume = to_image({key: volume[key][..., k] for key in KEYS})["image"]
    from_dlmi = to_image(dlmi)["image"]
    assert from_dlmi.shape == (12, 128, 128) == from_volume.shape
    assert torch.equal(from_dlmi, from_volume)
    assert torch.allclose(dlmi["dose"].float(), volume["dose"][..., k].float())
    assert len(STRUCTURES) == 10


@pytest.mark.parametrize(
    "first, last, size, length, window",
    [
        (10, 18, 16, 32, (6, 22)),  # centred on the foreground
        (0, 4, 16, 32, (0, 16)),  # at the grid's start: moved inside the grid
        (28, 32, 16, 32, (16, 32)),  # at its end
        (3, 24, 16, 32, (6, 22)),  # larger than the window: cut about its centre
        (10, 18, 40, 32, (-6, 34)),  # a grid smaller than the window: beyond it on both sides
        (0, 30, 40, 32, (-5, 35)),
        (40, 98, 128, 128, (0, 128)),  # an OpenKBP grid of the window's size: kept as it is
        (40, 98, 128, 192, (5, 133)),  # a larger field of view: centred on the foreground
    ],
)
def test_frame_window(first, last, size, length, window):
    assert frame_window(first, last, size, length) == window


def test_frame_crop_is_inverted():
    """FrameCropd crops every key to the frame around the source's foreground (its slices plus the margin), pads 0
    beyond the grid, and MONAI's inverse puts the values back on the original grid."""
    image = MetaTensor(torch.rand(2, 30, 40, 10), affine=torch.diag(torch.tensor([2.0, 3.0, 2.5, 1.0])))
    mask = MetaTensor(torch.zeros(1, 30, 40, 10), affine=image.affine)
    mask[0, 4:20, 30:38, 3:6] = 1
    crop = FrameCropd(["image", "mask"], source_key="mask", frame=(24, 16), margin=(0, 0, 1))
    out = crop({"image": image, "mask": mask})
    assert out["image"].shape == (2, 24, 16, 5) and out["mask"].sum() == mask.sum()
    # rows 4-19 centred in 24: 0-23; columns 30-37 centred in 16 (26-41), moved inside the 40 columns: 24-39
    torch.testing.assert_close(out["image"].as_tensor(), image.as_tensor()[:, 0:24, 24:40, 2:7])
    np.testing.assert_allclose(out["image"].affine[:3, 3], [0.0, 72.0, 5.0])  # the crop's origin, in mm
    restored = crop.inverse(out)["image"]
    assert restored.shape == image.shape
    torch.testing.assert_close(restored[:, 0:24, 24:40, 2:7].as_tensor(), image[:, 0:24, 24:40, 2:7].as_tensor())
    restored[:, 0:24, 24:40, 2:7] = 0
    assert not restored.any()

    small = FrameCropd(["image", "mask"], source_key="mask", frame=(40, 16), margin=(0, 0, 1))(
        {"image": image, "mask": mask}
    )
    # 30 rows in a 40-row frame: rows 4-19 centred, -8 to 31, the grid inside it: 0 padded on both sides
    torch.testing.assert_close(small["image"][:, 8:38].as_tensor(), image.as_tensor()[:, :, 24:40, 2:7])
    assert not small["image"][:, :8].any() and not small["image"][:, 38:].any()
