"""Clinical input and output: a DICOM CT series and RTSTRUCT in, an RT Dose (plus NIfTI and DVH) out."""

from .io import (
    CTSeries,
    StructureSet,
    read_ct_series,
    read_dicom,
    read_rtdose,
    read_rtplan,
    read_rtstruct,
    write_rtdose,
)
from .names import (
    BODY_PATTERN,
    HELPER_PATTERN,
    NAME_PATTERNS,
    RoiMapping,
    load_name_map,
    map_roi_names,
    match_roi_name,
    normalise_roi_name,
)
from .predict import (
    BODY_THRESHOLD_HU,
    body_mask,
    predict_dicom,
    resample,
)

__all__ = [
    "BODY_PATTERN",
    "BODY_THRESHOLD_HU",
    "CTSeries",
    "HELPER_PATTERN",
    "NAME_PATTERNS",
    "RoiMapping",
    "StructureSet",
    "body_mask",
    "load_name_map",
    "map_roi_names",
    "match_roi_name",
    "normalise_roi_name",
    "predict_dicom",
    "read_ct_series",
    "read_dicom",
    "read_rtdose",
    "read_rtplan",
    "read_rtstruct",
    "resample",
    "write_rtdose",
]
