"""DoseDVHLoss: the DVH term against DVHs computed directly with monai_dose.metrics."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from monai_dose.losses import DoseDVHLoss, sorted_roi_doses
from monai_dose.metrics import cumulative_dvh


def doses_and_masks(batch: int = 2, shape=(12, 10, 6), seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Reference and predicted doses (Gy) and 3 ROI masks, the last absent from sample 0."""
    g = torch.Generator().manual_seed(seed)
    reference = torch.rand(batch, 1, *shape, generator=g) * 70
    prediction = reference + torch.randn(batch, 1, *shape, generator=g) * 4
    masks = (torch.rand(batch, 3, *shape, generator=g) > 0.6).float()
    masks[0, 2] = 0
    return prediction, reference, masks


def dvh_area(pred: np.ndarray, ref: np.ndarray, step: float = 0.001) -> float:
    """Area in Gy between the exact cumulative DVHs (``metrics.cumulative_dvh``, %) of two ROI doses."""
    levels = np.arange(min(pred.min(), ref.min()) - 1, max(pred.max(), ref.max()) + 1, step)
    return float(np.abs(cumulative_dvh(pred, levels) - cumulative_dvh(ref, levels)).sum() * step / 100)


def test_dvh_term_is_the_area_between_the_cumulative_dvhs():
    pred, ref, masks = doses_and_masks()
    areas = [
        dvh_area(pred[b, 0][masks[b, r] > 0].numpy(), ref[b, 0][masks[b, r] > 0].numpy())
        for b in range(2)
        for r in range(3)
        if masks[b, r].any()
    ]
    assert len(areas) == 5  # the absent ROI does not count
    np.testing.assert_allclose(DoseDVHLoss.dvh_loss(pred, ref, masks).item(), np.mean(areas), rtol=1e-3)


def test_dvh_term_is_the_mean_dose_at_volume_difference():
    pred, ref, masks = doses_and_masks(batch=1)
    mask = masks[0, 0] > 0
    fractions = np.linspace(0, 100, 100001)  # D_x for x of 0..100 % of the ROI volume
    d_pred, d_ref = (np.percentile(d[0, 0][mask].numpy(), fractions, method="inverted_cdf") for d in (pred, ref))
    expected = np.abs(d_pred - d_ref).mean()
    np.testing.assert_allclose(DoseDVHLoss.dvh_loss(pred, ref, masks[:, :1]).item(), expected, rtol=1e-3)


def test_sorted_roi_doses_are_the_inverse_cumulative_dvhs():
    pred, _, masks = doses_and_masks()
    doses = torch.cat([pred, -pred], 1)
    values, counts = sorted_roi_doses(doses, masks)
    assert counts.tolist() == [[int(m.sum()) for m in sample] for sample in masks]
    pairs = values.split(counts.flatten().tolist())
    for b, r in ((0, 0), (1, 2)):
        for c in range(2):
            roi = doses[b, c][masks[b, r] > 0]
            torch.testing.assert_close(pairs[b * 3 + r][:, c], roi.sort().values)


def test_dvh_term_sees_distributions_not_positions():
    pred, ref, masks = doses_and_masks(batch=1)
    masks = torch.ones_like(masks[:, :1])
    shuffled = ref.flatten()[torch.randperm(ref.numel())].reshape(ref.shape)
    assert DoseDVHLoss.dvh_loss(shuffled, ref, masks) == 0 < DoseDVHLoss(0.0)(shuffled, ref, masks)
    torch.testing.assert_close(DoseDVHLoss.dvh_loss(ref + 2.5, ref, masks), torch.tensor(2.5))


def test_loss_value_gradient_and_label_layout():
    pred, ref, masks = doses_and_masks()
    loss = DoseDVHLoss(dvh_weight=0.5)
    assert loss(ref, ref, masks) == 0
    torch.testing.assert_close(DoseDVHLoss(0.0)(pred, ref, masks), torch.nn.L1Loss()(pred, ref))
    expected = torch.nn.L1Loss()(pred, ref) + 0.5 * DoseDVHLoss.dvh_loss(pred, ref, masks)
    torch.testing.assert_close(loss(pred, ref, masks), expected)
    torch.testing.assert_close(loss(pred, torch.cat([ref, masks], 1)), expected)  # masks after the dose
    pred = pred.clone().requires_grad_()
    loss(pred, ref, masks).backward()
    assert torch.isfinite(pred.grad).all() and pred.grad.abs().sum() > 0
    bf16 = loss(pred.detach().bfloat16(), ref, masks)
    assert bf16.dtype == torch.float32 and torch.isclose(bf16, expected, rtol=1e-2)


def test_no_roi_and_shape_errors():
    pred, ref, masks = doses_and_masks()
    assert DoseDVHLoss.dvh_loss(pred, ref, torch.zeros_like(masks)) == 0
    with pytest.raises(ValueError, match="masks"):
        DoseDVHLoss()(pred, ref, masks[..., :3])
    with pytest.raises(ValueError, match="doses"):
        DoseDVHLoss.dvh_loss(pred, ref[:1], masks)
