"""Transforms: model input assembly (also on the training device: PrepareDoseBatch), mask packing, slice sampling,
joint augmentation, masked-dose post-processing."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import list_data_collate
from monai.transforms import Compose, LoadImaged, RandAffined, RandFlipd

from monai_dose.data import STRUCTURES, dlmi_loader, load_dlmi_datalist, load_openkbp_datalist
from monai_dose.engines import PrepareDoseBatch
from monai_dose.transforms import (
    DoseInput,
    DoseInputd,
    MaskDose,
    MaskDosed,
    PackMasks,
    PackMasksd,
    RandSliceSampled,
    SliceNeighbours,
    UnpackMasks,
    input_channels,
    mask_channel,
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


def test_joint_augmentation_keeps_masks_binary_and_aligned():
    """The bundle's augmentation: nearest for masks, bilinear for CT and dose, then dose masked again."""
    p = synthetic_patient(shape=(32, 32, 12))
    p["ct"] = p["dose"].clone()  # identical content makes the alignment check exact
    augment = Compose(
        [
            RandSliceSampled(KEYS, num_samples=4),
            RandAffined(
                KEYS,
                mode=["bilinear", "nearest", "nearest", "bilinear"],
                prob=1.0,
                rotate_range=[0.3],
                scale_range=[0.15, 0.15],
                translate_range=[4, 4],
            ),
            RandFlipd(KEYS, spatial_axis=1, prob=1.0),
            MaskDosed("dose"),
        ]
    )
    augment.set_random_state(3)
    for s in augment(p):
        for key in ("structures", "possible_dose_mask"):
            assert set(torch.unique(s[key]).tolist()) <= {0.0, 1.0}, f"{key} is no longer binary"
        assert (s["dose"][s["possible_dose_mask"] == 0] == 0).all()  # no dose outside the mask
        inside = s["possible_dose_mask"] > 0
        # the CT copy of the dose moved exactly like the dose
        assert torch.allclose(s["ct"][inside], s["dose"][inside], atol=1e-4)


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


def test_packed_augmentation_equals_per_mask_augmentation():
    """Resampling the packed channel (nearest) gives exactly the masks that resampling each mask gives."""
    p = synthetic_patient(shape=(32, 32, 12))

    def augment(structures_transforms):
        chain = Compose(
            [
                *structures_transforms,
                RandSliceSampled(KEYS, num_samples=4, neighbours=1),
                RandAffined(
                    KEYS,
                    mode=["bilinear", "nearest", "nearest", "bilinear"],
                    prob=1.0,
                    rotate_range=[0.3],
                    scale_range=[0.15, 0.15],
                    translate_range=[4, 4],
                ),
                RandFlipd(KEYS, spatial_axis=1, prob=1.0),
            ]
        )
        chain.set_random_state(5)
        return chain(dict(p))

    for plain, packed in zip(augment([]), augment([PackMasksd("structures")]), strict=True):
        assert packed["structures"].shape[0] == 3 and plain["structures"].shape[0] == 30
        assert plain["structures"].sum() > 0
        assert torch.equal(UnpackMasks(10)(packed["structures"]), plain["structures"].float())


@pytest.mark.parametrize("input_set, channels", [("reference", 36), ("merged_targets", 30)])
def test_prepare_dose_batch_equals_per_sample_input_assembly(input_set, channels):
    patients = [synthetic_patient(seed=i) for i in range(2)]

    def sample(pack: bool) -> list[dict]:
        sampler = RandSliceSampled(KEYS, num_samples=3, neighbours=1, neighbour_keys=KEYS[:3])
        chain = Compose([PackMasksd("structures"), sampler] if pack else [sampler])
        chain.set_random_state(7)
        return [s for p in patients for s in chain(dict(p))]

    packed, plain = sample(pack=True), sample(pack=False)
    image, label = PrepareDoseBatch(input_set)(list_data_collate(packed), torch.device("cpu"))
    assert image.shape == (6, channels, 16, 16) and image.dtype == torch.float32
    for i, s in enumerate(plain):
        assert torch.equal(image[i], DoseInput(input_set)(s["ct"], s["structures"], s["possible_dose_mask"]))
        assert torch.equal(label[i], s["dose"])


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
