"""Dose prediction networks built from ``monai.networks.blocks``; MONAI's own nets work through config too."""

from .cascade import Cascade, MaskedDose
from .dcnn import DCNN, DilatedDenseBlock
from .slices import AxialSliceNetwork, volume_model

__all__ = ["DCNN", "AxialSliceNetwork", "Cascade", "DilatedDenseBlock", "MaskedDose", "volume_model"]
