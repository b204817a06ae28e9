"""Knowledge-based plan QA: a plan's dose beside the predicted achievable dose, with clinical goals and flags."""

from .plan_qa import (
    ROOM_TO_IMPROVE,
    UNDER_COVERED,
    PlanDoses,
    QAModel,
    compare,
    plan_qa_cohort,
    plan_qa_dicom,
    plan_qa_nifti,
    read_plan_nifti,
    read_plan_rtdose,
)
from .protocol import DEFAULT_PROTOCOL, Goal, Metric, Protocol, load_protocol, parse_metric

__all__ = [
    "DEFAULT_PROTOCOL",
    "Goal",
    "Metric",
    "PlanDoses",
    "Protocol",
    "QAModel",
    "ROOM_TO_IMPROVE",
    "UNDER_COVERED",
    "compare",
    "load_protocol",
    "parse_metric",
    "plan_qa_cohort",
    "plan_qa_dicom",
    "plan_qa_nifti",
    "read_plan_nifti",
    "read_plan_rtdose",
]
