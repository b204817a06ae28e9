"""Training losses: the L1 dose loss with an optional dose-volume histogram (DVH) term."""

from __future__ import annotations

import torch
from torch.nn.modules.loss import _Loss


def sorted_roi_doses(doses: torch.Tensor, masks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The doses of every (sample, ROI) pair, each sorted in ascending order: the inverse cumulative DVHs.

    Args:
        doses: ``(B, C, *spatial)`` doses (e.g. a prediction and a reference as ``C = 2`` channels).
        masks: ``(B, R, *spatial)`` ROI masks (non-zero inside).

    Returns:
        ``(P, C)``: the sorted doses of all pairs concatenated in (sample, ROI) order, each channel sorted on its
        own; and the ``(B, R)`` voxel counts of the pairs.
    """
    if doses.ndim != masks.ndim or doses.shape[0] != masks.shape[0] or doses.shape[2:] != masks.shape[2:]:
        raise ValueError(
            f"expected (B, C, ...) doses and (B, R, ...) masks on their grid: {doses.shape}, {masks.shape}"
        )
    batch, rois = masks.shape[:2]
    sample, roi, voxel = (masks.flatten(2) > 0).nonzero(as_tuple=True)  # grouped by (sample, ROI)
    pair = sample * rois + roi
    values = doses.flatten(2)[sample, :, voxel]  # (P, C)
    if len(values):  # one sort by pair, then dose: the pair index times the dose range, plus the dose
        low, high = values.detach().aminmax()
        key = pair[:, None].double() * (high - low + 1).double() + (values.detach() - low).double()
        values = values.gather(0, key.sort(0).indices)
    return values, torch.bincount(pair, minlength=batch * rois).reshape(batch, rois)


class DoseDVHLoss(_Loss):
    """L1 dose loss plus ``dvh_weight`` times a DVH loss: the area between the cumulative DVHs of the prediction
    and the reference in each ROI, in Gy, averaged over the (sample, ROI) pairs where the ROI is present.

    That area is the mean over all volume fractions ``x`` of ``|D_x(prediction) - D_x(reference)|`` (the
    Wasserstein-1 distance of the ROI's two dose distributions), of which the OpenKBP DVH score samples
    ``D_0.1cc``, ``D_99``, ``D_95`` and ``D_1``, and an upper bound of the error of the mean dose. It is computed
    exactly, from the sorted doses of each ROI (:func:`sorted_roi_doses`), and is differentiable like any L1 loss.
    The L1 term is the mean over every voxel, like ``torch.nn.L1Loss``: masked where the prediction is zeroed
    outside the possible-dose mask (``MaskedDose``), as the reference dose is. A sample is a patient for 3D input
    and a slice for 2D input.

    Args:
        dvh_weight: weight of the DVH term (0: the L1 loss alone).
    """

    def __init__(self, dvh_weight: float = 1.0) -> None:
        super().__init__()
        self.dvh_weight = dvh_weight

    @staticmethod
    def dvh_loss(input: torch.Tensor, target: torch.Tensor, masks: torch.Tensor) -> torch.Tensor:
        """The DVH term alone, in Gy (0 when no ROI is present)."""
        if input.shape != target.shape or input.shape[1] != 1:
            raise ValueError(f"expected (B, 1, ...) doses of one shape, got {input.shape} and {target.shape}")
        values, counts = sorted_roi_doses(torch.cat([input.float(), target.float()], 1), masks)
        present = counts.flatten()[counts.flatten() > 0]
        pair = torch.repeat_interleave(torch.arange(len(present), device=present.device), present)
        error = (values[:, 0] - values[:, 1]).abs()
        area = torch.zeros(len(present), device=values.device).index_add_(0, pair, error)
        return (area / present).sum() / max(len(present), 1)

    def forward(self, input: torch.Tensor, target: torch.Tensor, masks: torch.Tensor | None = None) -> torch.Tensor:
        """``input`` and ``target``: ``(B, 1, *spatial)`` doses in Gy; ``masks``: ``(B, R, *spatial)`` ROI masks.
        Without ``masks``, ``target`` holds the dose in channel 0 and the masks after it (one label tensor for
        engines that call ``loss_function(prediction, label)``)."""
        if masks is None:
            target, masks = target[:, :1], target[:, 1:]
        loss = torch.nn.functional.l1_loss(input.float(), target.float())
        if self.dvh_weight:
            loss = loss + self.dvh_weight * self.dvh_loss(input, target, masks)
        return loss
