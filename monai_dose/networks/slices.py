"""2D and 2.5D dose networks applied to volumes, axial slice by slice."""

from __future__ import annotations

import copy
import logging
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..transforms.array import mask_channel as input_mask_channel
from ..transforms.geometry import frame_window
from .cascade import MaskedDose

logger = logging.getLogger(__name__)


def _first_conv2d(network: nn.Module) -> str:
    for name, module in network.named_modules():
        if isinstance(module, nn.Conv2d):
            return name
    raise ValueError(f"{type(network).__name__} has no Conv2d to take the neighbour slices")


def _replaced(module: nn.Module, path: list[str], new: nn.Module) -> nn.Module:
    """A shallow copy of ``module`` (parameters shared) whose submodule at ``path`` is ``new``."""
    if not path:
        return new
    clone = copy.copy(module)
    clone._modules = dict(module._modules)
    clone._modules[path[0]] = _replaced(module._modules[path[0]], path[1:], new)
    return clone


def _extent(occupied: torch.Tensor) -> tuple[int, int]:
    """First and one past the last index where the 1D ``occupied`` is true."""
    index = torch.nonzero(occupied).flatten()
    return int(index[0]), int(index[-1]) + 1


class AxialSliceNetwork(nn.Module):
    """A 2D network run on volumes ``(B, C, H, W, D)`` axial slice by slice (the last axis), ``sw_batch_size``
    slices per call: ``(B, C_out, H, W, D)``.

    A 2.5D network (``neighbours`` > 0) takes each slice with ``neighbours`` slices on each side as channels,
    ``C * (2n + 1)`` of them in the channel-major order of :class:`~monai_dose.transforms.RandSliceSample` (edges
    replicated). Its first layer, a ``Conv2d`` (``stem``), then runs as one 3D convolution over the volume whose
    kernel depth spans the neighbours: the values of the network on the stacked slices, without the stacked copy
    of the volume (``2n + 1`` times its size).

    Args:
        network: the 2D network (shared, not copied).
        neighbours: slices on each side the network takes as channels.
        sw_batch_size: slices per network call.
        mask_channel: with it, only the slices from the first to the last where this input channel is non-zero (in
            any volume of the batch) are computed; the others are 0.
        frame: with ``mask_channel``, the in-plane size ``(H, W)`` of the window the network runs in, around the
            mask's in-plane bounding box (:func:`~monai_dose.transforms.frame_window`, padded with 0 where it reaches
            beyond the grid), as the bundle's training crops (:class:`~monai_dose.transforms.FrameCropd`, ``frame``
            in ``train.json``); 0 outside it, where a mask larger than the window is cut (logged as a warning).
        stem: the name of the network's first convolution, which must take the input directly and be the only
            layer to see it (default: its first ``Conv2d``; a 2D :class:`~monai_dose.networks.Cascade`, whose second
            stage sees the input too, cannot run this way); only used with ``neighbours``.
    """

    def __init__(
        self,
        network: nn.Module,
        neighbours: int = 0,
        sw_batch_size: int = 32,
        mask_channel: int | None = None,
        stem: str | None = None,
        frame: Sequence[int] | None = None,
    ) -> None:
        super().__init__()
        if frame is not None and (mask_channel is None or len(frame) != 2):
            raise ValueError(f"frame {frame}: an in-plane (H, W) size, with a mask_channel to centre it on")
        self.frame = frame
        self.network = network
        self.neighbours = neighbours
        self.sw_batch_size = sw_batch_size
        self.mask_channel = mask_channel
        self.stem = stem or (_first_conv2d(network) if neighbours else "")
        if neighbours:
            conv = network.get_submodule(self.stem)
            if not isinstance(conv, nn.Conv2d) or conv.groups != 1 or conv.padding_mode != "zeros":
                raise ValueError(f"{self.stem}: the stem must be a Conv2d without groups, zero-padded")
            if conv.in_channels % (2 * neighbours + 1):
                raise ValueError(f"{self.stem}: {conv.in_channels} input channels are not {2 * neighbours + 1} slices")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width, depth = x.shape[-3:]
        (top, bottom), (left, right), (first, last) = (0, height), (0, width), (0, depth)
        if self.mask_channel is not None:
            mask = (x[:, self.mask_channel] != 0).any(0)  # (H, W, D), over the batch
            if not mask.any():
                raise ValueError("the possible-dose mask is empty: no slice to predict")
            first, last = _extent(mask.any(0).any(0))
            if self.frame is not None:
                top, bottom = frame_window(*_extent(mask.any(2).any(1)), self.frame[0], height)
                left, right = frame_window(*_extent(mask.any(2).any(0)), self.frame[1], width)
                outside = int(mask.sum()) - int(mask[max(top, 0) : bottom, max(left, 0) : right].sum())
                if outside:
                    logger.warning(
                        "%d voxels of the possible-dose mask lie outside the network's %d x %d in-plane frame around "
                        "it: no dose is predicted there",
                        outside,
                        *self.frame,
                    )
        # the window, padded with 0 (air, no structure) where it reaches beyond the grid, as the training crop pads
        beyond = (max(-left, 0), max(right - width, 0), max(-top, 0), max(bottom - height, 0))
        window = x[..., max(top, 0) : bottom, max(left, 0) : right, :]
        if any(beyond):  # F.pad copies even where it pads nothing
            window = F.pad(window, (0, 0, *beyond))
        out = self._slices(window, first, last)
        out = out[..., beyond[2] : out.shape[-3] - beyond[3], beyond[0] : out.shape[-2] - beyond[1], :]
        top, left = max(top, 0), max(left, 0)
        return F.pad(out, (first, depth - last, left, width - left - out.shape[-2], top, height - top - out.shape[-3]))

    def _slices(self, x: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """The network on slices ``first:last`` of ``x``: ``(B, C_out, H, W, last - first)``."""
        network = self.network
        if self.neighbours:
            slices = self._stem(x, first, last)  # (B * d, C_stem, H, W)
            network = _replaced(network, self.stem.split("."), nn.Identity())
        else:
            slices = x[..., first:last].movedim(-1, 1).flatten(0, 1)  # (B * d, C, H, W)
        out = torch.cat([network(chunk) for chunk in slices.split(self.sw_batch_size)])
        return out.unflatten(0, (len(x), last - first)).movedim(1, -1)

    def _stem(self, x: torch.Tensor, first: int, last: int) -> torch.Tensor:
        """The stem's output for slices ``first:last`` of ``x``, as ``(B * d, C_stem, H, W)`` channels-last."""
        n, conv = self.neighbours, self.network.get_submodule(self.stem)
        index = torch.arange(first - n, last + n, device=x.device).clamp(0, x.shape[-1] - 1)
        slab = x[..., first - n : last + n] if first >= n and last + n <= x.shape[-1] else x.index_select(-1, index)
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        # (B, C, d + 2n, H, W) stored slice by slice, channels last: oneDNN's fast layout, and one copy
        slab = slab.permute(0, 1, 4, 2, 3).to(dtype=dtype, memory_format=torch.channels_last_3d)
        weight = conv.weight.unflatten(1, (-1, 2 * n + 1))  # (O, C, 2n + 1, kh, kw): channel-major input
        out = F.conv3d(
            slab,
            weight.to(dtype=dtype, memory_format=torch.channels_last_3d),
            None if conv.bias is None else conv.bias.to(dtype),
            padding=(0, *conv.padding),
            dilation=(1, *conv.dilation),
            stride=(1, *conv.stride),
        )
        return out.movedim(2, 1).flatten(0, 1)  # a view: channels-last slices


def volume_model(
    model: nn.Module,
    input_set: str,
    spatial_dims: int = 2,
    neighbours: int = 0,
    sw_batch_size: int = 32,
    frame: Sequence[int] | None = None,
) -> nn.Module:
    """The dose model ``model`` (a :class:`MaskedDose`, as training runs it) as it predicts volumes
    ``(B, C, H, W, D)`` of the per-slice channels of ``input_set``: itself for 3D networks; for 2D and 2.5D ones
    its network run by :class:`AxialSliceNetwork` on the slices of the possible-dose mask (in the in-plane
    ``frame`` around it, if given), masked by it. Modules and weights are shared with ``model``."""
    if spatial_dims == 3:
        return model
    if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module  # validation runs the module itself
    if not isinstance(model, MaskedDose):
        raise TypeError(f"expected a MaskedDose model, got {type(model).__name__}")
    channel = input_mask_channel(input_set)
    slices = AxialSliceNetwork(model.network, neighbours, sw_batch_size, mask_channel=channel, frame=frame)
    return MaskedDose(slices, mask_channel=channel, amp=model.amp)
