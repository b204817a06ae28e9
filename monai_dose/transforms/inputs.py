"""Checks and normalisation of the inputs a user gives: binary masks, CT units, voxel spacing and targets.

Bundle inference, :class:`~monai_dose.inference.DosePredictor` and ``predict-dicom`` all pass through these (in
:func:`~monai_dose.transforms.patient_preprocessing`): an input in another convention becomes the model's, or
fails with an error naming the file (the ``filename_or_obj`` of a ``MetaTensor``, else the transform's ``name``) and
the problem.
"""

from __future__ import annotations

import logging
from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Transform
from monai.utils import convert_to_dst_type, convert_to_tensor

from ..data.openkbp import STRUCTURES, TARGETS

logger = logging.getLogger(__name__)

HU_OFFSET = 1024.0
"""OpenKBP CT values are Hounsfield units + ``HU_OFFSET`` (air 0, water 1024)."""
HU_AIR_THRESHOLD = -500.0
"""A CT with at least :data:`HU_AIR_FRACTION` of its voxels below this value holds air near -1000: it is in
Hounsfield units (OpenKBP CT values are never negative)."""
HU_AIR_FRACTION = 0.01


def source_name(img: object, name: str) -> str:
    """The file a ``MetaTensor`` was read from, else ``name``: what error messages call an input."""
    return str(img.meta.get("filename_or_obj") or name) if isinstance(img, MetaTensor) else name


def check_voxel_spacing(
    voxel_spacing: Sequence[float], spatial_dims: int = 3, name: str = "voxel_spacing"
) -> tuple[float, ...]:
    """``voxel_spacing`` as a tuple of floats (mm); ``ValueError`` naming ``name`` unless it holds
    ``spatial_dims`` positive finite values."""
    spacing = tuple(float(s) for s in np.ravel(voxel_spacing))
    if len(spacing) != spatial_dims or not all(np.isfinite(s) and s > 0 for s in spacing):
        values = ", ".join(f"{s:g}" for s in spacing)
        raise ValueError(f"{name}: voxel spacing ({values}) mm is not {spatial_dims} positive values")
    return spacing


class BinariseMask(Transform):
    """Binary mask (same type and dtype, values 0/1) of a mask given as a label map: any non-zero voxel is
    inside. Values other than 0 and 1 (a mask stored as 0/255) are binarised with a warning; non-integer values (a
    probability map) are refused unless a ``threshold`` is given.

    Args:
        threshold: voxels ``>= threshold`` are inside (for masks that are not integer label maps).
    """

    def __init__(self, threshold: float | None = None) -> None:
        self.threshold = threshold

    def __call__(self, img: NdarrayOrTensor, name: str = "mask") -> NdarrayOrTensor:
        """``name``: what messages call the mask when it is not a ``MetaTensor`` read from a file."""
        img_t = convert_to_tensor(img, track_meta=False)
        if self.threshold is not None:
            return convert_to_dst_type(img_t >= self.threshold, img, dtype=img_t.dtype)[0]
        if img_t.dtype == torch.bool:
            return img
        if img_t.is_floating_point() and not (img_t == img_t.round()).all():
            example = img_t[img_t != img_t.round()].flatten()[0].item()
            raise ValueError(
                f"{source_name(img, name)}: not a label map (non-integer values such as {example:g}, a "
                "probability map?); give a mask threshold (mask_threshold) to binarise it"
            )
        low, high = (v.item() for v in torch.aminmax(img_t))
        if low >= 0 and high <= 1:
            return img
        logger.warning(
            "%s: mask values from %g to %g, not 0/1: binarised (any non-zero voxel is inside)",
            source_name(img, name),
            low,
            high,
        )
        return convert_to_dst_type(img_t != 0, img, dtype=img_t.dtype)[0]


class EnsureOpenKBPCT(Transform):
    """A CT in OpenKBP's convention (Hounsfield units + :data:`HU_OFFSET`, air 0): a CT in Hounsfield units (at
    least :data:`HU_AIR_FRACTION` of its voxels below :data:`HU_AIR_THRESHOLD`, i.e. air near -1000) is shifted by
    :data:`HU_OFFSET`, with a warning; any other CT is returned as it is.
    """

    def __call__(self, img: NdarrayOrTensor, name: str = "ct") -> NdarrayOrTensor:
        """``name``: what messages call the CT when it is not a ``MetaTensor`` read from a file."""
        img_t = convert_to_tensor(img, track_meta=False)
        air = (img_t < HU_AIR_THRESHOLD).float().mean().item()
        if air < HU_AIR_FRACTION:
            return img
        logger.warning(
            "%s: %.0f%% of the CT below %g (air near -1000): read as Hounsfield units and converted to OpenKBP's "
            "HU + %g",
            source_name(img, name),
            100 * air,
            HU_AIR_THRESHOLD,
            HU_OFFSET,
        )
        return convert_to_dst_type(img_t.float() + HU_OFFSET, img, dtype=torch.float32)[0]


class RequireTargets(Transform):
    """Raise ``ValueError`` when the structures (:data:`~monai_dose.data.STRUCTURES` along ``channel_dim``) hold
    no voxel of any target: the model predicts the dose of a plan for its targets. Returns the input.

    Args:
        channel_dim: the structure axis (``-1`` for OpenKBP's channel-last ``structures.nii.gz``).
    """

    def __init__(self, channel_dim: int = 0) -> None:
        self.channel_dim = channel_dim

    def __call__(self, img: NdarrayOrTensor, name: str = "structures") -> NdarrayOrTensor:
        """``name``: what messages call the structures when they are not a ``MetaTensor`` read from a file."""
        img_t = convert_to_tensor(img, track_meta=False)
        if img_t.shape[self.channel_dim] != len(STRUCTURES):
            raise ValueError(f"{source_name(img, name)}: expected {len(STRUCTURES)} structure channels")
        targets = img_t.movedim(self.channel_dim, 0)[[STRUCTURES.index(t) for t in TARGETS]]
        if not targets.any():
            raise ValueError(
                f"{source_name(img, name)}: no target ({', '.join(TARGETS)} are all empty); the model "
                "predicts the dose of a plan for its targets"
            )
        return img


class _InputCheckd(MapTransform):
    """Dictionary wrapper base: ``self.transform`` applied to each key, named by it."""

    transform: BinariseMask | EnsureOpenKBPCT | RequireTargets | RequireFinite | RequireNonEmpty

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        for key in self.key_iterator(d):
            d[key] = self.transform(d[key], name=str(key))
        return d


class BinariseMaskd(_InputCheckd):
    """Dictionary wrapper of :class:`BinariseMask`."""

    def __init__(
        self,
        keys: KeysCollection = ("structures", "possible_dose_mask"),
        threshold: float | None = None,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = BinariseMask(threshold)


class EnsureOpenKBPCTd(_InputCheckd):
    """Dictionary wrapper of :class:`EnsureOpenKBPCT`."""

    def __init__(self, keys: KeysCollection = "ct", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = EnsureOpenKBPCT()


class RequireTargetsd(_InputCheckd):
    """Dictionary wrapper of :class:`RequireTargets`."""

    def __init__(
        self, keys: KeysCollection = "structures", channel_dim: int = 0, allow_missing_keys: bool = False
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = RequireTargets(channel_dim)


BinariseMaskD = BinariseMaskDict = BinariseMaskd
EnsureOpenKBPCTD = EnsureOpenKBPCTDict = EnsureOpenKBPCTd
RequireTargetsD = RequireTargetsDict = RequireTargetsd


class RequireFinite(Transform):
    """Raise ``ValueError`` naming the input when it holds NaN or infinite values; returns it."""

    def __call__(self, img: NdarrayOrTensor, name: str = "ct") -> NdarrayOrTensor:
        """``name``: what messages call the input when it is not a ``MetaTensor`` read from a file."""
        if not torch.isfinite(convert_to_tensor(img, track_meta=False)).all():
            raise ValueError(f"{source_name(img, name)}: contains NaN or infinite values")
        return img


class RequireNonEmpty(Transform):
    """Raise ``ValueError`` naming the mask when it has no voxel inside (the possible-dose mask: no dose to
    predict); returns it."""

    def __call__(self, img: NdarrayOrTensor, name: str = "possible_dose_mask") -> NdarrayOrTensor:
        """``name``: what messages call the mask when it is not a ``MetaTensor`` read from a file."""
        if not convert_to_tensor(img, track_meta=False).any():
            raise ValueError(f"{source_name(img, name)}: the possible-dose mask is empty")
        return img


class RequireFinited(_InputCheckd):
    """Dictionary wrapper of :class:`RequireFinite`."""

    def __init__(self, keys: KeysCollection = "ct", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = RequireFinite()


class RequireNonEmptyd(_InputCheckd):
    """Dictionary wrapper of :class:`RequireNonEmpty`."""

    def __init__(self, keys: KeysCollection = "possible_dose_mask", allow_missing_keys: bool = False) -> None:
        super().__init__(keys, allow_missing_keys)
        self.transform = RequireNonEmpty()


RequireFiniteD = RequireFiniteDict = RequireFinited
RequireNonEmptyD = RequireNonEmptyDict = RequireNonEmptyd
