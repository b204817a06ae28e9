"""Inferers for 2D dose networks applied to volumes."""

from __future__ import annotations

from collections.abc import Callable

import torch
from monai.inferers import Inferer


class AxialSliceInferer(Inferer):
    """Run a 2D network on every axial slice (last axis) of a batch of volumes ``(B, C, H, W, D)``.

    The result equals MONAI's ``SliceInferer(spatial_dim=2, roi_size=(-1, -1), sw_batch_size=...)`` (same slices
    per network call) without its sliding-window machinery, which copies the volume slice by slice (timings in
    ``docs/performance.md``).

    Args:
        sw_batch_size: slices per network call.
    """

    def __init__(self, sw_batch_size: int = 32) -> None:
        super().__init__()
        self.sw_batch_size = sw_batch_size

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
        """``(B, C, H, W, D)`` -> ``(B, C_out, H, W, D)``; ``args``/``kwargs`` go to ``network``."""
        batch, depth = inputs.shape[0], inputs.shape[-1]
        slices = inputs.movedim(-1, 1).flatten(0, 1)  # (B * D, C, H, W): a view for slice-major volumes
        out = torch.cat([network(chunk, *args, **kwargs) for chunk in slices.split(self.sw_batch_size)])
        return out.unflatten(0, (batch, depth)).movedim(1, -1)
