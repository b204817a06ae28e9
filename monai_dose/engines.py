"""Engine helpers for dose-prediction training with MONAI's ``SupervisedTrainer``."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from monai.engines import PrepareBatch

from .data.openkbp import STRUCTURES
from .transforms.array import DoseInput, MaskDose, UnpackMasks


class PrepareDoseBatch(PrepareBatch):
    """``prepare_batch`` that augments the batch and assembles the network input on the training device.

    The data loader delivers the compact batch (CT, structures packed by :class:`~monai_dose.transforms.PackMasks`,
    possible-dose mask and dose: 10 channels per 2.5D slice where the assembled input has 36). Here, on the GPU
    when training runs there, ``transform`` (e.g. :class:`~monai_dose.transforms.BatchRandAffined`) moves the
    whole batch, the dose is zeroed outside the moved possible-dose mask, the masks are unpacked and
    :class:`~monai_dose.transforms.DoseInput` builds the input.

    Args:
        input_set: see :data:`monai_dose.transforms.INPUT_SETS`.
        keys: the CT, packed structures, possible-dose mask and dose keys of the batch, in this order, then the
            target-proximity key for the ``target_proximity`` input set.
        transform: a dictionary transform of the batch tensors (random augmentation), or ``None``.
        dtype: of the assembled input; ``torch.bfloat16`` for a network under bf16 autocast (the values it would
            see anyway, at half the memory traffic).
    """

    def __init__(
        self,
        input_set: str = "reference",
        keys: Sequence[str] = ("ct", "structures", "possible_dose_mask", "dose"),
        transform: Callable[[dict], dict] | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        if len(keys) not in (4, 5):
            raise ValueError(
                f"expected the CT, structures, possible-dose-mask, dose (and target-proximity) keys, got {keys}"
            )
        self.keys = tuple(keys)
        self.transform = transform
        self.unpack = UnpackMasks(len(STRUCTURES), channel_dim=1, dtype=dtype)
        self.dose_input = DoseInput(input_set, channel_dim=1, dtype=dtype)
        self.mask_dose = MaskDose(channel_dim=1)

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch = {k: batchdata[k].to(device=device, non_blocking=non_blocking).float() for k in self.keys}
        if self.transform is not None:
            batch = self.transform(batch)
        ct, structures, mask, dose, *proximity = (batch[k] for k in self.keys)
        image = self.dose_input(ct, self.unpack(structures), mask, *proximity)
        return image, self.mask_dose(dose, mask)
