"""Two-stage cascade (the OpenKBP winner's design) and the masked-output wrapper used by every dose model."""

from __future__ import annotations

import torch
from torch import nn

from ..transforms.array import MaskDose


class Cascade(nn.Module):
    """Two networks in series: the second sees the input and the first network's output.

    Any MONAI network can serve as either stage (e.g. two ``monai.networks.nets.UNet``); the second stage's
    ``in_channels`` must be the input channels plus the first stage's output channels.
    """

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.first = first
        self.second = second

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.cat([x, self.first(x)], dim=1))


class MaskedDose(nn.Module):
    """Wrap a dose network so that its output is >= 0 and zero outside the possible-dose mask
    (:class:`~monai_dose.transforms.MaskDose`).

    The mask is read from input channel ``mask_channel`` (see :func:`monai_dose.transforms.mask_channel`), as in
    the reference method whose output is multiplied by the possible-dose mask. Since the reference dose is 0
    outside that mask too, an L1 loss on the output only counts voxels inside it.

    Args:
        network: the dose network.
        mask_channel: input channel holding the possible-dose mask.
        amp: run ``network`` under bfloat16 autocast (mixed precision on CPU and GPU); the output is float32.
    """

    def __init__(self, network: nn.Module, mask_channel: int = -1, amp: bool = False) -> None:
        super().__init__()
        self.network = network
        self.mask_channel = mask_channel
        self.amp = amp

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.amp):
            dose = self.network(x)
        return MaskDose(channel_dim=1)(dose.float(), x[:, self.mask_channel : self.mask_channel + 1 or None])
