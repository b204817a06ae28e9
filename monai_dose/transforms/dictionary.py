"""Dictionary wrappers of :mod:`monai_dose.transforms.array`."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence

import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable
from monai.utils import ensure_tuple_rep

from .array import (
    BEAM_ANGLES_DEG,
    BatchRandAffine,
    BeamPrior,
    DoseInput,
    MaskDose,
    PackMasks,
    RandSliceSample,
    SliceMajor,
    TargetProximity,
)


class DoseInputd(MapTransform):
    """Dictionary wrapper of :class:`DoseInput`: writes the network input to ``name``.

    Args:
        keys: the CT, structures and possible-dose-mask keys, in this order, then the keys of the input set's
            derived inputs (:func:`~monai_dose.transforms.array.derived_inputs`).
        name: key of the assembled input.
        input_set: see :data:`monai_dose.transforms.array.INPUT_SETS`.
    """

    def __init__(
        self,
        keys: KeysCollection = ("ct", "structures", "possible_dose_mask"),
        name: str = "image",
        input_set: str = "reference",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = DoseInput(input_set)
        if len(self.keys) != 3 + len(self.transform.derived):
            raise ValueError(
                f"expected the CT, structures, possible-dose-mask and {self.transform.derived or 'no other'} keys, "
                f"got {self.keys}"
            )
        self.name = name

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        d[self.name] = self.transform(*(d[k] for k in self.keys))
        return d


class TargetProximityd(MapTransform):
    """Dictionary wrapper of :class:`TargetProximity`: the proximity of the structures of ``keys`` (one key,
    a ``MetaTensor`` whose affine gives the voxel spacing) is written to ``name``."""

    def __init__(
        self,
        keys: KeysCollection = "structures",
        name: str = "target_proximity",
        length_mm: float = 50.0,
        dtype: torch.dtype = torch.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.name = name
        self.transform = TargetProximity(length_mm, dtype)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[self.name] = self.transform(d[key])
        return d


class BeamPriord(MapTransform):
    """Dictionary wrapper of :class:`BeamPrior`: the prior of the structures and body of ``keys`` (the structures,
    a ``MetaTensor`` whose affine gives the voxel spacing, then the body: possible-dose mask or CT) is written to
    ``name``. See :class:`BeamPrior` for the other arguments."""

    def __init__(
        self,
        keys: KeysCollection = ("structures", "possible_dose_mask"),
        name: str = "beam_prior",
        angles: Sequence[float] = BEAM_ANGLES_DEG,
        mu_per_mm: float = 0.005,
        per_beam: bool = False,
        body_threshold: float = 0.0,
        dtype: torch.dtype = torch.float32,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if len(self.keys) != 2:
            raise ValueError(f"expected the structures and body keys, got {self.keys}")
        self.name = name
        self.transform = BeamPrior(angles, mu_per_mm, per_beam, body_threshold, dtype)

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        d[self.name] = self.transform(*(d[k] for k in self.keys))
        return d


class _PerKeyd(MapTransform):
    """Dictionary wrapper base: ``self.transform`` applied to each key."""

    transform: Callable

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key])
        return d


class PackMasksd(_PerKeyd):
    """Dictionary wrapper of :class:`PackMasks`."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = PackMasks()


class SliceMajord(_PerKeyd):
    """Dictionary wrapper of :class:`SliceMajor`."""

    def __init__(self, keys: KeysCollection, allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = SliceMajor()


class RandSliceSampled(Randomizable, MapTransform):
    """Dictionary wrapper of :class:`RandSliceSample`: the same slices of every key, one dict per slice.

    Args:
        keys: volumes to slice (C, H, W, D).
        mask_key: slices are drawn where this mask is non-empty (the possible-dose mask).
        num_samples: slices drawn per volume.
        neighbours: neighbouring slices added on each side as channels, for ``neighbour_keys`` (2.5D).
        neighbour_keys: keys that get neighbours (default: all); the others get the central slice only.
    """

    def __init__(
        self,
        keys: KeysCollection,
        mask_key: str = "possible_dose_mask",
        num_samples: int = 8,
        neighbours: int = 0,
        neighbour_keys: Sequence[str] | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.neighbour_keys = set(self.keys if neighbour_keys is None else neighbour_keys)
        self.sampler = RandSliceSample(num_samples, neighbours)
        self.central = RandSliceSample(num_samples, 0)

    def set_random_state(self, seed: int | None = None, state=None) -> RandSliceSampled:  # noqa: ANN001
        super().set_random_state(seed, state)
        self.sampler.set_random_state(seed, state)
        return self

    def randomize(self, data: object = None) -> None:
        self.sampler.randomize(data)
        self.central._indices = self.sampler._indices

    def __call__(self, data: Mapping[Hashable, object]) -> list[dict[Hashable, object]]:
        d = dict(data)
        self.randomize(d[self.mask_key])
        samples: list[dict[Hashable, object]] = [dict(d) for _ in range(self.sampler.num_samples)]
        for key in self.key_iterator(d):
            sampler = self.sampler if key in self.neighbour_keys else self.central
            for sample, slice_ in zip(samples, sampler(d[key]), strict=True):
                sample[key] = slice_
        return samples


class BatchRandAffined(Randomizable, MapTransform):
    """Dictionary wrapper of :class:`BatchRandAffine`: the same per-sample draws for every key of a batch.

    Args:
        keys: batched arrays ``(B, C, H, W[, D])`` to move together.
        mode: interpolation per key (``"bilinear"``; ``"nearest"`` for masks and packed masks).
        other arguments: see :class:`BatchRandAffine`.
    """

    def __init__(
        self,
        keys: KeysCollection,
        mode: Sequence[str] | str = "bilinear",
        prob: float = 0.5,
        rotate_range: float = 0.2,
        scale_range: float = 0.1,
        translate_range: float = 8.0,
        flip_prob: float = 0.5,
        flip_axis: int = 1,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mode = ensure_tuple_rep(mode, len(self.keys))
        self.transform = BatchRandAffine(prob, rotate_range, scale_range, translate_range, flip_prob, flip_axis)

    def set_random_state(self, seed: int | None = None, state=None) -> BatchRandAffined:  # noqa: ANN001
        super().set_random_state(seed, state)
        self.transform.set_random_state(seed, state)
        return self

    def randomize(self, data: object = None) -> None:
        self.transform.randomize(data.shape[0], data.ndim - 2)  # type: ignore[attr-defined]

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        self.randomize(d[self.first_key(d)])
        for key, mode in self.key_iterator(d, self.mode):
            d[key] = self.transform(d[key], mode, randomize=False)
        return d


class MaskDosed(MapTransform):
    """Dictionary wrapper of :class:`MaskDose`: clip ``keys`` at 0 and zero them outside ``mask_key``."""

    def __init__(
        self, keys: KeysCollection, mask_key: str = "possible_dose_mask", allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.mask_key = mask_key
        self.transform = MaskDose()

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key], d[self.mask_key])
        return d


BatchRandAffineD = BatchRandAffineDict = BatchRandAffined
BeamPriorD = BeamPriorDict = BeamPriord
DoseInputD = DoseInputDict = DoseInputd
RandSliceSampleD = RandSliceSampleDict = RandSliceSampled
MaskDoseD = MaskDoseDict = MaskDosed
PackMasksD = PackMasksDict = PackMasksd
SliceMajorD = SliceMajorDict = SliceMajord
TargetProximityD = TargetProximityDict = TargetProximityd
