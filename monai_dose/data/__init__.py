"""Datasets: OpenKBP (NIfTI and the original CSV) and the DLMI 2D slice dataset."""

from .dlmi import DLMI_FILES, dlmi_loader, load_dlmi_datalist
from .openkbp import (
    AXES_RAS,
    DOSE_KEY,
    GRID_SHAPE,
    IMAGE_KEYS,
    OARS,
    STRUCTURES,
    TARGET_DOSES_GY,
    TARGETS,
    load_openkbp_datalist,
    openkbp_affine,
    patient_folder_datalist,
)

__all__ = [
    "AXES_RAS",
    "DOSE_KEY",
    "GRID_SHAPE",
    "IMAGE_KEYS",
    "OARS",
    "STRUCTURES",
    "TARGETS",
    "TARGET_DOSES_GY",
    "DLMI_FILES",
    "dlmi_loader",
    "load_dlmi_datalist",
    "load_openkbp_datalist",
    "openkbp_affine",
    "patient_folder_datalist",
]
