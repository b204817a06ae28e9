"""Engine helpers for dose-prediction training with MONAI's ``SupervisedTrainer``."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from monai.engines import PrepareBatch

from .data.openkbp import STRUCTURES
from .transforms.array import DoseInput, UnpackMasks


class PrepareDoseBatch(PrepareBatch):
    """``prepare_batch`` that assembles the network input on the training device.

    The data loader delivers the compact batch (CT, structures packed by :class:`~monai_dose.transforms.PackMasks`,
    possible-dose mask and dose: 10 channels per 2.5D slice where the assembled input has 36), so the loader
    workers resample and move fewer channels; unpacking and :class:`~monai_dose.transforms.DoseInput` run here,
    on the GPU when training runs there.

    Args:
        input_set: see :data:`monai_dose.transforms.INPUT_SETS`.
        keys: the CT, packed structures, possible-dose mask and dose keys of the batch, in this order.
    """

    def __init__(
        self,
        input_set: str = "reference",
        keys: Sequence[str] = ("ct", "structures", "possible_dose_mask", "dose"),
    ) -> None:
        if len(keys) != 4:
            raise ValueError(f"expected the CT, structures, possible-dose-mask and dose keys, got {keys}")
        self.keys = tuple(keys)
        self.unpack = UnpackMasks(len(STRUCTURES))
        self.dose_input = DoseInput(input_set)

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        ct, structures, mask, dose = (batchdata[k].to(device=device, non_blocking=non_blocking) for k in self.keys)
        image = torch.stack(
            [self.dose_input(c, self.unpack(s), m) for c, s, m in zip(ct, structures, mask, strict=True)]
        )
        return image, dose
