"""RTSTRUCT ROI names -> the model's structures: a forgiving default rule set plus an editable JSON map."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from monai_dose.data.openkbp import STRUCTURES, TARGET_DOSES_GY

HELPER_PATTERN = re.compile(r"prv|opt(?!ic)|eval|ring|^z")
"""Helper structures (planning risk volumes, optimisation, evaluation, rings, ``z`` prefix): never mapped."""
BODY_PATTERN = re.compile(r"^(external|body|skin|outline|bodycontour)$")
"""ROIs taken as the possible-dose mask when none is named."""
NAME_PATTERNS: dict[str, str] = {
    "Brainstem": r"^brainstem$",
    "SpinalCord": r"^(spinal)?cord(cerv)?$",
    "Esophagus": r"^o?esophagus(s)?$",
    "Larynx": r"^larynx$",
    "Mandible": r"^(bone)?mandible$",
}
"""Default rules of the OARs without a side, as regular expressions on :func:`normalise_roi_name`."""
_PAROTID = re.compile(r"^(?P<pre>left|lt|l|right|rt|r)?parotid(gland)?(?P<post>left|lt|l|right|rt|r)?$")
_PTV_DOSE = re.compile(r"^ptv(?P<dose>\d+(\.\d+)?)(gy)?$")
_PTV_LEVEL = {"ptvhigh": "PTV70", "ptvmid": "PTV63", "ptvintermediate": "PTV63", "ptvlow": "PTV56"}
_DOSE_TOLERANCE_GY = 0.5


def normalise_roi_name(name: str) -> str:
    """Lower case without spaces, ``-`` and ``_`` (``"Parotid_L"`` -> ``"parotidl"``)."""
    return re.sub(r"[\s_\-]+", "", name).lower()


def _target_by_dose(dose: float) -> str | None:
    for structure, level in TARGET_DOSES_GY.items():
        if abs(dose - level) <= _DOSE_TOLERANCE_GY:
            return structure
    return None


def match_roi_name(name: str) -> tuple[str | None, str]:
    """The model structure that ROI ``name`` is by the default rules, or ``None`` with the reason.

    Rules (on :func:`normalise_roi_name`): helper structures (:data:`HELPER_PATTERN`) are excluded;
    :data:`NAME_PATTERNS` for Brainstem, SpinalCord, Esophagus, Larynx and Mandible; ``Parotid`` with one side
    (Left/Lt/L or Right/Rt/R) as prefix or suffix; targets by dose ``PTV[_ ]<dose>[Gy]`` (values above 100
    are cGy) within 0.5 Gy of 56, 63 or 70 Gy, or ``PTV_High`` / ``PTV_Mid`` / ``PTV_Low``.
    """
    key = normalise_roi_name(name)
    if HELPER_PATTERN.search(key):
        return None, "helper structure (PRV, opt, eval, ring or z-prefixed)"
    for structure, pattern in NAME_PATTERNS.items():
        if re.match(pattern, key):
            return structure, "default rule"
    if parotid := _PAROTID.match(key):
        sides = [s for s in (parotid["pre"], parotid["post"]) if s]
        if len(sides) == 1:
            return ("LeftParotid" if sides[0].startswith("l") else "RightParotid"), "default rule"
        return None, "parotid without exactly one side"
    if key in _PTV_LEVEL:
        return _PTV_LEVEL[key], "default rule"
    if ptv := _PTV_DOSE.match(key):
        dose = float(ptv["dose"])
        dose = dose / 100 if dose > 100 else dose
        if target := _target_by_dose(dose):
            return target, "default rule"
        return None, f"target of {dose:g} Gy is none of the model's 56/63/70 Gy (map it with a name map)"
    return None, "no rule matches"


def load_name_map(path: str | os.PathLike) -> dict[str, str | None]:
    """Read a JSON name map ``{"ROI name": "Structure" or null}``; null ignores that ROI."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such name map")
    try:
        name_map = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path}: not a JSON name map ({err})") from err
    if not isinstance(name_map, dict):
        raise ValueError(f'{path}: the name map must be a JSON object {{"ROI name": "Structure" or null}}')
    wrong = {k: v for k, v in name_map.items() if v is not None and v not in STRUCTURES}
    if wrong:
        raise ValueError(f"{path}: {wrong} map to no model structure (use one of {', '.join(STRUCTURES)} or null)")
    return name_map


@dataclass
class RoiMapping:
    """Which RTSTRUCT ROIs make each model structure, and why the others were left out."""

    found: dict[str, list[str]] = field(default_factory=dict)
    """Model structure -> ROI names (several are merged)."""
    ignored: dict[str, str] = field(default_factory=dict)
    """ROI name -> reason."""

    @property
    def missing(self) -> list[str]:
        """Model structures that no ROI maps to."""
        return [s for s in STRUCTURES if s not in self.found]


def map_roi_names(names: Iterable[str], name_map: Mapping[str, str | None] | None = None) -> RoiMapping:
    """Map ROI names to model structures: entries of ``name_map`` first (names compared normalised), then
    :func:`match_roi_name`."""
    overrides = {normalise_roi_name(k): v for k, v in (name_map or {}).items()}
    mapping = RoiMapping()
    for name in names:
        key = normalise_roi_name(name)
        if key in overrides:
            structure, reason = overrides[key], "set to null in the name map"
        else:
            structure, reason = match_roi_name(name)
        if structure is None:
            mapping.ignored[name] = reason
        else:
            mapping.found.setdefault(structure, []).append(name)
    mapping.found = {s: mapping.found[s] for s in STRUCTURES if s in mapping.found}
    return mapping
