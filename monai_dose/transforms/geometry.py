"""Checks of the input geometry: one grid for all the inputs of a patient, axis-aligned with the patient."""

from __future__ import annotations

from collections.abc import Hashable, Mapping

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform

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
