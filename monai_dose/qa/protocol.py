"""Clinical goals of a plan from an editable JSON protocol, evaluated with the project's DVH functions."""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from monai_dose.data.openkbp import STRUCTURES
from monai_dose.metrics import cumulative_dvh, dose_to_volume

DEFAULT_PROTOCOL = Path(__file__).parent / "protocols" / "head_and_neck.json"
"""Example head-and-neck protocol for the 10 OpenKBP structures (sources in ``docs/plan_qa.md``)."""
_METRIC = re.compile(
    r"^(?:(?P<stat>mean|max)|D_(?P<d>\d+(?:\.\d+)?)_?(?P<unit>%|cc)?|V_(?P<v>\d+(?:\.\d+)?)_?Gy)$", re.IGNORECASE
)
_LIMITS = {"max_gy": ("Gy", True), "min_gy": ("Gy", False), "max_percent": ("%", True), "min_percent": ("%", False)}


@dataclass(frozen=True)
class Metric:
    """A DVH metric: ``D_x`` (dose to the hottest x % or x cc), ``V_x`` (% volume receiving x Gy), mean or max."""

    kind: str
    """``"D"``, ``"V"``, ``"mean"`` or ``"max"``."""
    value: float = 0.0
    in_cc: bool = False

    @property
    def key(self) -> str:
        """Canonical name, as the OpenKBP keys write it (``D_0.1_cc``, ``D_95``, ``V_20_Gy``, ``mean``)."""
        if self.kind == "D":
            return f"D_{self.value:g}" + ("_cc" if self.in_cc else "")
        return f"V_{self.value:g}_Gy" if self.kind == "V" else self.kind

    @property
    def unit(self) -> str:
        return "%" if self.kind == "V" else "Gy"

    def __call__(self, roi_dose: np.ndarray, voxel_volume: float) -> float:
        """The metric of an ROI's voxel doses (Gy); ``voxel_volume`` in mm^3."""
        if self.kind == "D":
            return dose_to_volume(roi_dose, self.value, voxel_volume if self.in_cc else None)
        if self.kind == "V":
            return float(cumulative_dvh(roi_dose, np.array([self.value]))[0])
        return float(np.mean(roi_dose) if self.kind == "mean" else np.max(roi_dose))


def parse_metric(name: str) -> Metric:
    """``D_95`` / ``D_95%``, ``D_0.1cc`` / ``D_0.1_cc``, ``V_20Gy`` / ``V_20_Gy``, ``mean`` or ``max``."""
    match = _METRIC.match(str(name).strip())
    if match is None:
        raise ValueError(f"unknown metric '{name}' (use D_<x> or D_<x>% or D_<x>cc, V_<x>Gy, mean or max)")
    if match["stat"]:
        return Metric(match["stat"].lower())
    if match["v"]:
        return Metric("V", float(match["v"]))
    value, in_cc = float(match["d"]), (match["unit"] or "").lower() == "cc"
    if not in_cc and not 0 < value <= 100:
        raise ValueError(f"metric '{name}': D_x needs 0 < x <= 100 (% of the volume)")
    return Metric("D", value, in_cc)


@dataclass(frozen=True)
class Goal:
    """One clinical goal: ``metric`` of ``roi`` at most (``upper``) or at least ``limit``."""

    roi: str
    metric: Metric
    limit: float
    upper: bool
    source: str = ""

    @property
    def text(self) -> str:
        return f"{'≤' if self.upper else '≥'} {self.limit:g} {self.metric.unit}"

    def met(self, value: float) -> bool:
        return value <= self.limit if self.upper else value >= self.limit


@dataclass(frozen=True)
class Protocol:
    """Clinical goals read from a JSON file (see :func:`load_protocol`)."""

    path: Path
    name: str
    goals: tuple[Goal, ...]


def _goal(item: object, where: str) -> Goal:
    if not isinstance(item, dict):
        raise ValueError(f"{where}: a goal must be a JSON object, got {item!r}")
    unknown = set(item) - {"roi", "metric", "source", *_LIMITS}
    if unknown:
        raise ValueError(f"{where}: unknown keys {sorted(unknown)} (use roi, metric, source, {', '.join(_LIMITS)})")
    if item.get("roi") not in STRUCTURES:
        raise ValueError(f"{where}: unknown ROI {item.get('roi')!r} (use one of {', '.join(STRUCTURES)})")
    try:
        metric = parse_metric(item.get("metric", ""))
    except ValueError as err:
        raise ValueError(f"{where}: {err}") from err
    limits = [k for k in _LIMITS if k in item]
    allowed = [k for k, (unit, _) in _LIMITS.items() if unit == metric.unit]
    if len(limits) != 1 or limits[0] not in allowed or not isinstance(item[limits[0]], (int, float)):
        raise ValueError(f"{where}: give one number as {' or '.join(allowed)} for metric {metric.key}")
    return Goal(item["roi"], metric, float(item[limits[0]]), _LIMITS[limits[0]][1], str(item.get("source", "")))


def load_protocol(path: str | os.PathLike | None = None) -> Protocol:
    """Read a JSON protocol (default :data:`DEFAULT_PROTOCOL`): ``{"name": ..., "goals": [...]}`` or a list of goals,
    each ``{"roi": "SpinalCord", "metric": "D_0.1cc", "max_gy": 45, "source": "..."}`` with one of ``max_gy``,
    ``min_gy`` (D_x, mean, max) or ``max_percent``, ``min_percent`` (V_x).

    Raises:
        FileNotFoundError: no such file.
        ValueError: malformed JSON, an unknown ROI, metric or key, or a missing or misplaced limit, naming the file
            and the goal.
    """
    path = Path(path or DEFAULT_PROTOCOL)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such protocol file")
    try:
        content = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a JSON protocol ({err})") from err
    goals = content.get("goals") if isinstance(content, dict) else content
    if not isinstance(goals, list) or not goals:
        raise ValueError(f'{path}: a protocol is a non-empty list of goals, or {{"name": ..., "goals": [...]}}')
    name = content.get("name", path.stem) if isinstance(content, dict) else path.stem
    return Protocol(path, str(name), tuple(_goal(g, f"{path}: goal {i + 1}") for i, g in enumerate(goals)))
