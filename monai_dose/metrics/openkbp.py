"""The OpenKBP dose and DVH scores, computed as the challenge's official evaluator computes them.

Reference: ``provided_code/dose_evaluation_class.py`` of https://github.com/ababier/open-kbp, and
A. Babier et al., OpenKBP: The open-access knowledge-based planning grand challenge and dataset,
Medical Physics 48:5549-5561, 2021.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.metrics import CumulativeIterationMetric

from monai_dose.data.openkbp import OARS, STRUCTURES

OAR_METRICS: tuple[str, ...] = ("D_0.1_cc", "mean")
TARGET_METRICS: tuple[str, ...] = ("D_99", "D_95", "D_1")
DVH_METRICS: tuple[str, ...] = tuple(
    f"{roi}/{metric}" for roi in STRUCTURES for metric in (OAR_METRICS if roi in OARS else TARGET_METRICS)
)
"""Keys of :func:`dvh_metrics`, in the order of the official evaluator's output (``ROI/metric``)."""
_TARGET_VOLUMES: dict[str, float] = {"D_99": 99.0, "D_95": 95.0, "D_1": 1.0}

DVHMetrics = Mapping[str, float | None]


def dose_error(pred: np.ndarray, ref: np.ndarray, possible_dose_mask: np.ndarray) -> float:
    """Mean absolute dose error in Gy of one patient, as OpenKBP defines it.

    The absolute difference is summed over the whole grid, then divided by the number of voxels in the
    possible-dose mask.
    """
    n_voxels = np.count_nonzero(possible_dose_mask)
    if n_voxels == 0:
        raise ValueError("the possible-dose mask is empty")
    if np.shape(pred) != np.shape(ref):
        raise ValueError(f"prediction shape {np.shape(pred)} differs from reference shape {np.shape(ref)}")
    diff = np.asarray(ref, dtype=np.float64) - np.asarray(pred, dtype=np.float64)
    return float(np.sum(np.abs(diff)) / n_voxels)


def dvh_metrics(
    dose: np.ndarray, structures: np.ndarray, voxel_spacing: Sequence[float] | np.ndarray
) -> dict[str, float | None]:
    """OpenKBP DVH metrics of one dose distribution, keyed as :data:`DVH_METRICS` (``None``: absent ROI).

    OARs get ``D_0.1_cc`` (dose to the hottest 0.1 cc) and ``mean``; targets get ``D_99``, ``D_95`` and
    ``D_1``; all in Gy, from ``numpy.percentile`` (linear interpolation) of the voxel doses in the ROI.

    Args:
        dose: (H, W, D) dose in Gy.
        structures: (10, H, W, D) ROI masks in :data:`~monai_dose.data.openkbp.STRUCTURES` order; an empty
            channel is an absent ROI.
        voxel_spacing: voxel size in mm (3 values).
    """
    dose = np.asarray(dose, dtype=np.float64)
    structures = np.asarray(structures)
    if structures.shape != (len(STRUCTURES), *dose.shape):
        raise ValueError(f"structures shape {structures.shape} must be ({len(STRUCTURES)}, *{dose.shape})")
    voxel_volume = float(np.prod(np.asarray(voxel_spacing, dtype=np.float64)))
    metrics: dict[str, float | None] = dict.fromkeys(DVH_METRICS)
    for roi, mask in zip(STRUCTURES, structures, strict=True):
        roi_dose = dose[mask.astype(bool)]
        if roi_dose.size == 0:
            continue
        if roi in OARS:
            metrics[f"{roi}/D_0.1_cc"] = dose_to_volume(roi_dose, 0.1, voxel_volume)
            metrics[f"{roi}/mean"] = float(roi_dose.mean())
        else:
            for name, volume in _TARGET_VOLUMES.items():
                metrics[f"{roi}/{name}"] = dose_to_volume(roi_dose, volume)
    return metrics


def dose_to_volume(roi_dose: np.ndarray, volume: float, voxel_volume: float | None = None) -> float:
    """D_x: the dose (Gy) that the hottest ``volume`` of an ROI receives, from ``numpy.percentile`` (linear
    interpolation) of its voxel doses ``roi_dose``, as the official OpenKBP evaluator computes it.

    ``volume`` is in % of the ROI, or in cc when ``voxel_volume`` (mm^3) is given: then the hottest
    ``round(volume / voxel volume)`` voxels, at least one.
    """
    roi_dose = np.ravel(roi_dose)
    if voxel_volume is None:
        return float(np.percentile(roi_dose, 100 - volume))
    voxels = max(1.0, float(np.round(1000 * volume / voxel_volume)))
    # the official evaluator fails on ROIs under that volume (negative percentile); clip at 0 instead
    return float(np.percentile(roi_dose, max(0.0, 100 - voxels / roi_dose.size * 100)))


def cumulative_dvh(roi_dose: np.ndarray, levels: np.ndarray) -> np.ndarray:
    """Cumulative dose-volume histogram: the percentage of an ROI's voxels (``roi_dose``, Gy) receiving at least
    each dose of ``levels`` (Gy)."""
    roi_dose = np.sort(np.ravel(roi_dose))
    return 100.0 * (roi_dose.size - np.searchsorted(roi_dose, levels, side="left")) / roi_dose.size


def dvh_abs_differences(reference: DVHMetrics, prediction: DVHMetrics) -> np.ndarray:
    """|reference - prediction| of each of :data:`DVH_METRICS` (NaN where either is absent)."""

    def values(metrics: DVHMetrics) -> np.ndarray:
        return np.array([np.nan if metrics[k] is None else metrics[k] for k in DVH_METRICS], dtype=np.float64)

    return np.abs(values(reference) - values(prediction))


def dvh_score(reference: Sequence[DVHMetrics], prediction: Sequence[DVHMetrics]) -> float:
    """OpenKBP DVH score: mean absolute difference over every present (patient, metric) pair.

    Args:
        reference: per-patient :func:`dvh_metrics` of the reference doses.
        prediction: the same for the predicted doses, in the same patient order.
    """
    if len(reference) != len(prediction) or not reference:
        raise ValueError(f"need as many reference as predicted metrics: {len(reference)}, {len(prediction)}")
    differences = [dvh_abs_differences(r, p) for r, p in zip(reference, prediction, strict=True)]
    return float(np.nanmean(differences))


def _to_numpy(x: Any, dtype: type = np.float64) -> np.ndarray:
    """Any tensor (bfloat16 included) or array-like as a numpy array on the CPU."""
    if isinstance(x, MetaTensor):
        x = x.as_tensor()
    if isinstance(x, torch.Tensor):
        return x.detach().to("cpu", torch.bool if dtype is bool else torch.float64).numpy()
    return np.asarray(x, dtype=dtype)


def _check_doses(y_pred: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """``y_pred`` as numpy, once checked to be a (B, 1, H, W, D) dose on the grid of ``y``."""
    if y_pred.ndim != 5 or y_pred.shape[1] != 1 or y_pred.shape != y.shape:
        raise ValueError(f"y_pred and y must be (B, 1, H, W, D) doses on one grid: {y_pred.shape}, {y.shape}")
    return _to_numpy(y_pred)


def _batch_spacing(y: torch.Tensor, spacing: Any) -> np.ndarray:
    """(B, 3) voxel spacing: ``spacing`` broadcast to the batch, else from the affine of MetaTensor ``y``."""
    if spacing is None:
        if not isinstance(y, MetaTensor):
            raise ValueError("give `spacing` when the reference dose `y` is not a MetaTensor")
        affines = _to_numpy(y.affine).reshape(-1, 4, 4)
        spacing = np.stack([affine_to_spacing(a, r=3) for a in affines])
    return np.broadcast_to(_to_numpy(spacing), (y.shape[0], 3))


def _is_per_sample(value: Any) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(v, (torch.Tensor, np.ndarray)) for v in value)


class _PatientMetric(CumulativeIterationMetric):
    """A metric computed with numpy one patient at a time, one buffer row per patient.

    Keyword arguments of ``__call__`` are batch-first like ``y``; when ``y_pred`` and ``y`` are lists of
    channel-first tensors, a keyword argument given as a list of tensors or arrays holds one item per sample.
    """

    def _compute_list(self, y_pred: Any, y: Any = None, **kwargs: Any) -> torch.Tensor:
        if y is None:
            raise ValueError(f"{type(self).__name__} needs the reference dose `y`.")
        rows = []
        for i, (p, t) in enumerate(zip(y_pred, y, strict=True)):
            sample = {k: torch.as_tensor(v[i])[None] if _is_per_sample(v) else v for k, v in kwargs.items()}
            rows.append(self._compute_tensor(p[None], t[None], **sample))
        return torch.cat(rows)

    def _buffer(self) -> torch.Tensor:
        buffer = self.get_buffer()
        if not isinstance(buffer, torch.Tensor) or buffer.numel() == 0:
            raise ValueError(f"{type(self).__name__}: nothing to aggregate, call it on some data first.")
        return buffer


class DoseScoreMetric(_PatientMetric):
    """OpenKBP dose score: per-patient :func:`dose_error`, aggregated as the mean over patients.

    Call it as ``metric(y_pred, y, possible_dose_mask=mask)`` with (B, 1, H, W, D) predicted dose, reference
    dose and possible-dose mask; the buffer holds one (1,) row per patient.
    """

    def _compute_tensor(  # type: ignore[override]
        self, y_pred: torch.Tensor, y: torch.Tensor | None = None, possible_dose_mask: Any = None
    ) -> torch.Tensor:
        if y is None or possible_dose_mask is None:
            raise ValueError("DoseScoreMetric needs the reference dose `y` and `possible_dose_mask`.")
        pred, ref, mask = _check_doses(y_pred, y), _to_numpy(y), _to_numpy(possible_dose_mask, bool)
        errors = [[dose_error(p, r, m)] for p, r, m in zip(pred, ref, mask, strict=True)]
        return torch.tensor(errors, dtype=torch.float64, device=y_pred.device)

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        """The dose score in Gy: mean dose error over the patients seen since the last ``reset()``."""
        return self._buffer().mean()


class DVHScoreMetric(_PatientMetric):
    """OpenKBP DVH score: per-patient :func:`dvh_abs_differences`, aggregated as their NaN-mean.

    Call it as ``metric(y_pred, y, structures=masks, spacing=None)`` with (B, 1, H, W, D) predicted and
    reference doses, (B, 10, H, W, D) ROI masks and a (B, 3) or (3,) voxel spacing in mm (default: from the
    affine of ``y``, a MetaTensor). The buffer holds one row of ``len(DVH_METRICS)`` values per patient.
    """

    def _compute_tensor(  # type: ignore[override]
        self, y_pred: torch.Tensor, y: torch.Tensor | None = None, structures: Any = None, spacing: Any = None
    ) -> torch.Tensor:
        if y is None or structures is None:
            raise ValueError("DVHScoreMetric needs the reference dose `y` and `structures`.")
        spacings = _batch_spacing(y, spacing)
        pred, ref, masks = _check_doses(y_pred, y), _to_numpy(y), _to_numpy(structures, bool)
        rows = [
            dvh_abs_differences(dvh_metrics(r[0], m, s), dvh_metrics(p[0], m, s))
            for p, r, m, s in zip(pred, ref, masks, spacings, strict=True)
        ]
        return torch.tensor(np.stack(rows), dtype=torch.float64, device=y_pred.device)

    def aggregate(self) -> torch.Tensor:  # type: ignore[override]
        """The DVH score in Gy: mean absolute difference over every present (patient, metric) pair."""
        return torch.nanmean(self._buffer())
