"""OpenKBP scores on synthetic data with hand-checkable values, as numpy functions, metrics and handlers."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from monai.data import DataLoader, Dataset, MetaTensor
from monai.engines import SupervisedEvaluator

from monai_dose.data.openkbp import STRUCTURES
from monai_dose.metrics import (
    DVH_METRICS,
    DoseScoreHandler,
    DoseScoreMetric,
    DVHScoreHandler,
    DVHScoreMetric,
    cumulative_dvh,
    dose_error,
    dvh_abs_differences,
    dvh_metrics,
    dvh_score,
)

SHAPE = (4, 5, 6)  # 120 voxels
SPACING = (2.0, 2.0, 2.5)  # 10 mm^3: 0.1 cc is 10 voxels


def ramp() -> np.ndarray:
    """Dose 0, 1, ..., 119 Gy in C order."""
    return np.arange(np.prod(SHAPE), dtype=np.float64).reshape(SHAPE)


def structures(brainstem: int = 50, ptv70: bool = True) -> np.ndarray:
    """Brainstem on the first ``brainstem`` voxels (C order), PTV70 everywhere, every other ROI absent."""
    masks = np.zeros((len(STRUCTURES), *SHAPE), dtype=np.uint8)
    masks[STRUCTURES.index("Brainstem")].reshape(-1)[:brainstem] = 1
    masks[STRUCTURES.index("PTV70")] = ptv70
    return masks


def test_dose_error_sums_the_whole_grid_over_the_mask_size():
    ref = ramp()
    mask = np.zeros(SHAPE, dtype=np.uint8)
    mask[:2] = 1  # half the grid
    assert dose_error(ref + 2.0, ref, mask) == pytest.approx(4.0)
    assert dose_error(ref, ref, mask) == 0.0
    with pytest.raises(ValueError, match="empty"):
        dose_error(ref, ref, np.zeros(SHAPE))


def test_dvh_metrics_known_percentiles():
    metrics = dvh_metrics(ramp(), structures(), SPACING)
    assert list(metrics) == list(DVH_METRICS)
    # Brainstem doses 0..49: 10 voxels in 0.1 cc -> 80th percentile = 0.8 * 49
    assert metrics["Brainstem/D_0.1_cc"] == pytest.approx(39.2)
    assert metrics["Brainstem/mean"] == pytest.approx(24.5)
    # PTV70 doses 0..119: 1st, 5th and 99th percentiles
    assert metrics["PTV70/D_99"] == pytest.approx(1.19)
    assert metrics["PTV70/D_95"] == pytest.approx(5.95)
    assert metrics["PTV70/D_1"] == pytest.approx(117.81)
    present = {"Brainstem/D_0.1_cc", "Brainstem/mean", "PTV70/D_99", "PTV70/D_95", "PTV70/D_1"}
    assert all(metrics[k] is None for k in DVH_METRICS if k not in present)


def test_dvh_metrics_at_least_one_voxel_in_a_tenth_of_a_cc():
    # 1000 mm^3 voxels: round(0.1) = 0 voxels, clipped to 1 -> 98th percentile of 0..49
    metrics = dvh_metrics(ramp(), structures(), (10.0, 10.0, 10.0))
    assert metrics["Brainstem/D_0.1_cc"] == pytest.approx(0.98 * 49)


def test_dvh_metrics_rejects_wrong_structures():
    with pytest.raises(ValueError, match="structures shape"):
        dvh_metrics(ramp(), structures()[:9], SPACING)


def test_dvh_score_skips_absent_rois():
    ref = dvh_metrics(ramp(), structures(), SPACING)
    pred = dvh_metrics(ramp() + 1.0, structures(), SPACING)
    differences = dvh_abs_differences(ref, pred)
    assert np.count_nonzero(~np.isnan(differences)) == 5
    assert dvh_score([ref], [pred]) == pytest.approx(1.0)
    # a patient without PTV70: its 2 Brainstem metrics count, its absent PTV70 does not
    ref2 = dvh_metrics(ramp(), structures(ptv70=False), SPACING)
    pred2 = dvh_metrics(ramp() + 4.0, structures(ptv70=False), SPACING)
    assert dvh_score([ref, ref2], [pred, pred2]) == pytest.approx((5 * 1.0 + 2 * 4.0) / 7)


def batch(offsets: list[float], affine: bool = True) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(pred, ref, possible-dose mask, structures), batch-first, pred = ref + offset per sample."""
    ref = torch.as_tensor(np.stack([ramp()[None]] * len(offsets)))
    pred = ref + torch.tensor(offsets, dtype=torch.float64).view(-1, 1, 1, 1, 1)
    if affine:
        ref = MetaTensor(ref, affine=torch.diag(torch.tensor([*SPACING, 1.0], dtype=torch.float64)))
    mask = torch.ones_like(pred)
    masks = torch.as_tensor(np.stack([structures()] * len(offsets)))
    return pred, ref, mask, masks


def test_dose_score_metric_accumulates_and_resets():
    metric = DoseScoreMetric()
    pred, ref, mask, _ = batch([1.0, 3.0])
    values = metric(pred, ref, possible_dose_mask=mask)
    assert values.shape == (2, 1)
    pred, ref, mask, _ = batch([5.0])
    metric(pred, ref, possible_dose_mask=mask)
    assert metric.aggregate().item() == pytest.approx(3.0)
    metric.reset()
    with pytest.raises(ValueError, match="nothing to aggregate"):
        metric.aggregate()


def test_dose_score_metric_lists_of_channel_first_tensors():
    pred, ref, mask, _ = batch([1.0, 3.0])
    mask[1, :, :2] = 0  # half the grid: the second dose error doubles
    metric = DoseScoreMetric()
    metric(list(pred), list(ref), possible_dose_mask=list(mask))
    expected = [dose_error(p.numpy(), r.numpy(), m.numpy()) for p, r, m in zip(pred, ref, mask, strict=True)]
    assert expected == pytest.approx([1.0, 6.0])
    assert metric.get_buffer().flatten().tolist() == pytest.approx(expected)
    assert metric.aggregate().item() == pytest.approx(3.5)


def test_dvh_score_metric_matches_numpy():
    pred, ref, _, masks = batch([1.0, 2.0])
    masks[1, STRUCTURES.index("PTV70")] = 0  # absent in the second patient
    metric = DVHScoreMetric()
    rows = metric(pred, ref, structures=masks)  # spacing from the affine of ref
    assert rows.shape == (2, len(DVH_METRICS))
    numpy_metrics = [
        (dvh_metrics(r[0].numpy(), m.numpy(), SPACING), dvh_metrics(p[0].numpy(), m.numpy(), SPACING))
        for p, r, m in zip(pred, ref.as_tensor(), masks, strict=True)
    ]
    expected = dvh_score([r for r, _ in numpy_metrics], [p for _, p in numpy_metrics])
    assert expected == pytest.approx((5 * 1.0 + 2 * 2.0) / 7)
    assert metric.aggregate().item() == pytest.approx(expected)


def test_dvh_score_metric_spacing():
    pred, ref, _, masks = batch([1.0], affine=False)
    with pytest.raises(ValueError, match="spacing"):
        DVHScoreMetric()(pred, ref, structures=masks)
    # 1000 mm^3 voxels: Brainstem D_0.1_cc at the 98th percentile, still shifted by 1 Gy
    metric = DVHScoreMetric()
    metric(pred, ref, structures=masks, spacing=(10.0, 10.0, 10.0))
    assert metric.aggregate().item() == pytest.approx(1.0)


def test_handlers_in_a_supervised_evaluator():
    """Dose 0.9 * ref + 0.5 Gy from a real evaluator; the mask and structures stay in the batch."""
    offsets = [0.0, 1.0, 2.0]
    _, ref, _, masks = batch(offsets)
    data = []
    for i, offset in enumerate(offsets):
        label = MetaTensor(ref[i].as_tensor() + offset, affine=ref.affine)
        mask = torch.ones(1, *SHAPE)
        mask[:, : i + 1] = 0
        data.append({"image": label.clone(), "label": label, "possible_dose_mask": mask, "structures": masks[i]})

    class Network(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return 0.9 * x + 0.5

    evaluator = SupervisedEvaluator(
        device=torch.device("cpu"),
        val_data_loader=DataLoader(Dataset(data), batch_size=2),
        network=Network(),
        key_val_metric={"dose_score": DoseScoreHandler()},
        additional_metrics={"dvh_score": DVHScoreHandler()},
    )
    evaluator.run()

    errors, ref_metrics, pred_metrics = [], [], []
    for d in data:
        ref_dose = d["label"][0].numpy()
        pred_dose = 0.9 * ref_dose + 0.5
        errors.append(dose_error(pred_dose, ref_dose, d["possible_dose_mask"][0].numpy()))
        ref_metrics.append(dvh_metrics(ref_dose, d["structures"].numpy(), SPACING))
        pred_metrics.append(dvh_metrics(pred_dose, d["structures"].numpy(), SPACING))
    assert evaluator.state.metrics["dose_score"] == pytest.approx(np.mean(errors))
    assert evaluator.state.metrics["dvh_score"] == pytest.approx(dvh_score(ref_metrics, pred_metrics))
    assert evaluator.state.metric_details["dose_score"].flatten().tolist() == pytest.approx(errors)


def test_cumulative_dvh_counts_voxels_at_or_above_each_level():
    roi_dose = np.array([[3.0, 1.0], [4.0, 2.0]])  # any shape, any order
    volume = cumulative_dvh(roi_dose, np.array([0.0, 2.0, 2.5, 4.0, 4.5]))
    np.testing.assert_allclose(volume, [100, 75, 50, 25, 0])
