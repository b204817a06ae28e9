"""MONAI transforms for dose prediction (array transforms and their ``...d`` dictionary wrappers)."""

from .array import (
    CT_RANGE,
    INPUT_SETS,
    DoseInput,
    MaskDose,
    RandSliceSample,
    SliceNeighbours,
    input_channels,
    mask_channel,
)
from .dictionary import (
    DoseInputD,
    DoseInputd,
    DoseInputDict,
    MaskDoseD,
    MaskDosed,
    MaskDoseDict,
    RandSliceSampleD,
    RandSliceSampled,
    RandSliceSampleDict,
    SliceNeighboursD,
    SliceNeighboursd,
    SliceNeighboursDict,
)

__all__ = [
    "CT_RANGE",
    "INPUT_SETS",
    "DoseInput",
    "DoseInputD",
    "DoseInputDict",
    "DoseInputd",
    "MaskDose",
    "MaskDoseD",
    "MaskDoseDict",
    "MaskDosed",
    "RandSliceSample",
    "RandSliceSampleD",
    "RandSliceSampleDict",
    "RandSliceSampled",
    "SliceNeighbours",
    "SliceNeighboursD",
    "SliceNeighboursDict",
    "SliceNeighboursd",
    "input_channels",
    "mask_channel",
]
