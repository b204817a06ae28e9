"""Inferers for dose networks: 2D networks applied to volumes slice by slice, and flip test-time augmentation."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from monai.inferers import Inferer, SimpleInferer


class AxialSliceInferer(Inferer):
    """Run a 2D network on every axial slice (last axis) of a batch of volumes ``(B, C, H, W, D)``.

    The result equals MONAI's ``SliceInferer(spatial_dim=2, roi_size=(-1, -1), sw_batch_size=...)`` (same slices
    per network call) without its sliding-window machinery, which copies the volume slice by slice (timings in
    ``docs/performance.md``).

    Args:
        sw_batch_size: slices per network call.
        mask_channel: the input channel of the possible-dose mask, when given the network runs only on the slices
            from the first to the last where it is non-empty (in any volume of the batch); the others are 0.
    """

    def __init__(self, sw_batch_size: int = 32, mask_channel: int | None = None) -> None:
        super().__init__()
        self.sw_batch_size = sw_batch_size
        self.mask_channel = mask_channel

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
        """``(B, C, H, W, D)`` -> ``(B, C_out, H, W, D)``; ``args``/``kwargs`` go to ``network``."""
        depth = inputs.shape[-1]
        if self.mask_channel is None:
            return self._slices(inputs, network, *args, **kwargs)
        occupied = torch.nonzero(inputs[:, self.mask_channel].flatten(0, -2).any(0)).flatten()
        if not len(occupied):
            raise ValueError("the possible-dose mask is empty: no slice to predict")
        first, last = int(occupied[0]), int(occupied[-1]) + 1
        out = self._slices(inputs[..., first:last], network, *args, **kwargs)
        return F.pad(out, (first, depth - last))

    def _slices(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
        batch, depth = inputs.shape[0], inputs.shape[-1]
        slices = inputs.movedim(-1, 1).flatten(0, 1)  # (B * D, C, H, W): a view for slice-major volumes
        out = torch.cat([network(chunk, *args, **kwargs) for chunk in slices.split(self.sw_batch_size)])
        return out.unflatten(0, (batch, depth)).movedim(1, -1)


def flip_average(network: Callable[..., torch.Tensor], inputs: torch.Tensor, dim: int = 3) -> torch.Tensor:
    """Mean of ``network``'s prediction for ``inputs`` and, flipped back, for ``inputs`` flipped along ``dim``,
    computed in one batched call."""
    both = network(torch.cat([inputs, inputs.flip(dim)]))
    return (both[: len(inputs)] + both[len(inputs) :].flip(dim)) / 2


class FlipTTAInferer(Inferer):
    """Flip test-time augmentation around another inferer: every network call (a batch of slices of
    :class:`AxialSliceInferer`, or whole volumes) predicts its input and its mirror image together and averages them.

    Args:
        inferer: the inferer that calls the network.
        dim: the flipped dimension of each network input; 3 is the left-right axis ``W`` of OpenKBP slices
            ``(B, C, H, W)`` and volumes ``(B, C, H, W, D)`` alike (the flip that training augments with).
    """

    def __init__(self, inferer: Inferer, dim: int = 3) -> None:
        super().__init__()
        self.inferer = inferer
        self.dim = dim

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
        return self.inferer(inputs, partial(flip_average, partial(network, *args, **kwargs), dim=self.dim))


def dose_inferer(
    spatial_dims: int = 2, tta: bool = False, sw_batch_size: int = 32, mask_channel: int | None = None
) -> Inferer:
    """The inferer of a dose network: :class:`AxialSliceInferer` for 2D networks (``sw_batch_size``,
    ``mask_channel``), MONAI's ``SimpleInferer`` for 3D ones, inside :class:`FlipTTAInferer` with ``tta``."""
    inferer = AxialSliceInferer(sw_batch_size, mask_channel) if spatial_dims == 2 else SimpleInferer()
    return FlipTTAInferer(inferer) if tta else inferer
