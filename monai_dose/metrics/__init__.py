"""The OpenKBP dose and DVH scores: numpy functions, MONAI metrics and ignite handlers."""

from .handlers import DoseScoreHandler, DVHScoreHandler
from .openkbp import (
    DVH_METRICS,
    OAR_METRICS,
    TARGET_METRICS,
    DoseScoreMetric,
    DVHMetrics,
    DVHScoreMetric,
    cumulative_dvh,
    dose_error,
    dose_to_volume,
    dvh_abs_differences,
    dvh_metrics,
    dvh_score,
)

__all__ = [
    "DVH_METRICS",
    "DVHMetrics",
    "DVHScoreHandler",
    "DVHScoreMetric",
    "DoseScoreHandler",
    "DoseScoreMetric",
    "OAR_METRICS",
    "TARGET_METRICS",
    "cumulative_dvh",
    "dose_error",
    "dose_to_volume",
    "dvh_abs_differences",
    "dvh_metrics",
    "dvh_score",
]
