"""The input geometry: checks (one grid for all the inputs of a patient, axis-aligned with the patient) and the
in-plane frame a 2D network runs in."""

from __future__ import annotations

from collections.abc import Callable, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import IndexSelection, KeysCollection
from monai.data import MetaTensor
from monai.transforms import CropForeground, CropForegroundd, MapTransform
from monai.transforms.utils import is_positive

from .inputs import source_name

OBLIQUE_TOLERANCE = 1e-3
"""Largest off-axis component of a voxel axis's unit direction still read as axis-aligned."""
AFFINE_TOLERANCE_MM = 1e-3


def check_axis_aligned(affine: np.ndarray | torch.Tensor, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` unless every voxel axis of ``affine`` runs along a world axis (an
    oblique grid would need resampling, which the pipeline does not do)."""
    rotation = np.asarray(affine, dtype=np.float64)[:3, :3]
    lengths = np.linalg.norm(rotation, axis=0)
    if not np.all(lengths > 0):
        raise ValueError(f"{name}: degenerate affine (a voxel axis of length 0)")
    directions = np.abs(rotation / lengths)
    off_axis = float((directions.sum(axis=0) - directions.max(axis=0)).max())
    if off_axis > OBLIQUE_TOLERANCE:
        raise ValueError(
            f"{name}: oblique orientation (voxel axes off the patient axes by up to {off_axis:.3g}); resample it to "
            "an axis-aligned grid first"
        )


class CheckGridsd(MapTransform):
    """Raise ``ValueError`` naming the file unless every key (channel-first ``MetaTensor``) lies on the grid of
    ``reference_key`` (same spatial shape and affine) and that grid is axis-aligned (not oblique)."""

    def __init__(
        self,
        keys: KeysCollection = ("ct", "structures", "possible_dose_mask"),
        reference_key: str = "ct",
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.reference_key = reference_key

    def __call__(self, data: Mapping[Hashable, object]) -> dict[Hashable, object]:
        d = dict(data)
        reference = d[self.reference_key]
        if not isinstance(reference, MetaTensor):
            raise ValueError(f"{self.reference_key}: no affine (expected a MetaTensor)")
        check_axis_aligned(reference.affine, source_name(reference, self.reference_key))
        shape, affine = tuple(reference.shape[1:]), reference.affine.double()
        for key in self.key_iterator(d):
            image = d[key]
            name = source_name(image, str(key))
            if tuple(image.shape[1:]) != shape:  # type: ignore[attr-defined]
                raise ValueError(f"{name}: grid {tuple(image.shape[1:])} differs from the CT grid {shape}")  # type: ignore[attr-defined]
            if isinstance(image, MetaTensor) and not torch.allclose(
                image.affine.double(), affine, atol=AFFINE_TOLERANCE_MM
            ):
                raise ValueError(f"{name}: affine differs from the CT affine")
        return d


CheckGridsD = CheckGridsDict = CheckGridsd


def frame_window(first: int, last: int, size: int, length: int) -> tuple[int, int]:
    """The window of ``size`` voxels, along an axis of ``length``, that a 2D network sees of the foreground
    ``first:last`` (the possible-dose mask): centred on it (cutting it about its centre where it is larger), then
    moved back inside ``0:length`` as far as it goes. So a grid of the window's size holding the foreground is
    kept as it is (the OpenKBP grids, 128 x 128, in a 128 x 128 frame), a larger field of view is cut around the
    foreground, and the window reaches beyond the grid (padding) only where the grid is smaller than it."""
    start = first - (size - (last - first)) // 2
    start = min(max(start, min(0, length - size)), max(0, length - size))
    return start, start + size


class FrameCrop(CropForeground):
    """Crop (and pad with 0 where the window reaches beyond the grid) to the in-plane ``frame`` ``(H, W)`` around
    the foreground (:func:`frame_window`), and along the last axis to the foreground's slices plus ``margin``
    (within the grid): MONAI's ``CropForeground`` with that window, invertible as it is."""

    def __init__(
        self,
        frame: Sequence[int],
        select_fn: Callable = is_positive,
        channel_indices: IndexSelection | None = None,
        margin: Sequence[int] | int = 0,
        **pad_kwargs,
    ) -> None:
        if len(frame) != 2:
            raise ValueError(f"frame {frame}: an in-plane (H, W) size")
        super().__init__(select_fn, channel_indices, margin, allow_smaller=True, **pad_kwargs)
        self.frame = tuple(frame)

    def compute_bounding_box(self, img: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        start, end = (np.asarray(b, dtype=np.int64) for b in super().compute_bounding_box(img))
        shape = img.peek_pending_shape() if isinstance(img, MetaTensor) else img.shape[1:]
        for axis, size in enumerate(self.frame):
            start[axis], end[axis] = frame_window(int(start[axis]), int(end[axis]), size, shape[axis])
        return start, end


class FrameCropd(CropForegroundd):
    """Dictionary wrapper of :class:`FrameCrop`: every key cropped to the frame around ``source_key``."""

    def __init__(
        self,
        keys: KeysCollection,
        source_key: str,
        frame: Sequence[int],
        select_fn: Callable = is_positive,
        channel_indices: IndexSelection | None = None,
        margin: Sequence[int] | int = 0,
        allow_missing_keys: bool = False,
        **pad_kwargs,
    ) -> None:
        coords = {"start_coord_key": None, "end_coord_key": None}
        super().__init__(keys, source_key, allow_missing_keys=allow_missing_keys, **coords)
        self.cropper = FrameCrop(frame, select_fn, channel_indices, margin, **pad_kwargs)


FrameCropD = FrameCropDict = FrameCropd
