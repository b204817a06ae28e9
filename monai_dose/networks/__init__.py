"""Dose prediction networks built from ``monai.networks.blocks``; MONAI's own nets work through config too."""

from .cascade import Cascade, MaskedDose
from .dcnn import DCNN, DilatedDenseBlock

__all__ = ["DCNN", "Cascade", "DilatedDenseBlock", "MaskedDose"]
