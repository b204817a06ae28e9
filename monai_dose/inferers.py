"""Inferers for dose networks: flip test-time augmentation around MONAI's inferers."""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch
from monai.inferers import Inferer, SimpleInferer


def flip_average(network: Callable[..., torch.Tensor], inputs: torch.Tensor, dim: int = 3) -> torch.Tensor:
    """Mean of ``network``'s prediction for ``inputs`` and, flipped back, for ``inputs`` flipped along ``dim``,
    computed in one batched call."""
    both = network(torch.cat([inputs, inputs.flip(dim)]))
    return (both[: len(inputs)] + both[len(inputs) :].flip(dim)) / 2


class FlipTTAInferer(Inferer):
    """Flip test-time augmentation around another inferer: every network call predicts its input and its mirror
    image together and averages them.

    Args:
        inferer: the inferer that calls the network.
        dim: the flipped dimension of each network input; 3 is the left-right axis ``W`` of OpenKBP volumes
            ``(B, C, H, W, D)`` and slices ``(B, C, H, W)`` alike (the flip that training augments with).
    """

    def __init__(self, inferer: Inferer, dim: int = 3) -> None:
        super().__init__()
        self.inferer = inferer
        self.dim = dim

    def __call__(self, inputs: torch.Tensor, network: Callable[..., torch.Tensor], *args, **kwargs) -> torch.Tensor:
        return self.inferer(inputs, partial(flip_average, partial(network, *args, **kwargs), dim=self.dim))


def dose_inferer(tta: bool = False) -> Inferer:
    """The inferer of a dose model on volumes (:func:`~monai_dose.networks.volume_model`): MONAI's
    ``SimpleInferer``, inside :class:`FlipTTAInferer` with ``tta``."""
    return FlipTTAInferer(SimpleInferer()) if tta else SimpleInferer()
