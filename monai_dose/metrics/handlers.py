"""Ignite handlers of the OpenKBP scores, for validation in MONAI engines."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from ignite.engine import Engine
from ignite.metrics.metric import reinit__is_reduced
from monai.handlers import IgniteMetricHandler, from_engine

from .openkbp import DoseScoreMetric, DVHScoreMetric


def _merge_batch(batch: Any, output: Any) -> Any:
    """``output`` items over ``batch`` items, as MONAI postprocessing sees them; ``output`` if not dicts."""
    if isinstance(batch, dict) and isinstance(output, dict):
        return {**batch, **output}
    pairs = isinstance(batch, list) and isinstance(output, list)
    if pairs and all(isinstance(x, dict) for x in batch + output):
        return [{**b, **o} for b, o in zip(batch, output, strict=True)]
    return output


class _OpenKBPScoreHandler(IgniteMetricHandler):
    """An OpenKBP score as an ignite metric, fed ``(y_pred, y, *extras)`` by ``output_transform``.

    ``extras`` reach the metric as the keyword arguments ``kwarg_names``. The transform sees
    ``engine.state.output`` merged over ``engine.state.batch`` (the output wins), so that inputs that stay in
    the batch, like the possible-dose mask and the structures, are found by key; the default transform reads
    ``default_keys`` with :func:`monai.handlers.from_engine`.

    Args:
        output_transform: engine output (merged over the batch) -> ``(y_pred, y, *extras)``, batch-first
            tensors or lists of channel-first tensors.
        save_details: save the per-patient values in ``engine.state.metric_details``.
    """

    metric_class: type
    default_keys: tuple[str, ...]
    kwarg_names: tuple[str, ...]

    def __init__(self, output_transform: Callable | None = None, save_details: bool = True) -> None:
        super().__init__(
            self.metric_class(),
            output_transform=output_transform or from_engine(self.default_keys),
            save_details=save_details,
        )

    @torch.no_grad()
    def iteration_completed(self, engine: Engine) -> None:
        self.update(self._output_transform(_merge_batch(engine.state.batch, engine.state.output)))

    @reinit__is_reduced
    def update(self, output: Sequence[Any]) -> None:
        y_pred, y, *extras = output
        if len(extras) > len(self.kwarg_names):
            raise ValueError(f"{type(self).__name__} expects (y_pred, y, {', '.join(self.kwarg_names)}).")
        self.metric_fn(y_pred, y, **dict(zip(self.kwarg_names[: len(extras)], extras, strict=True)))


class DoseScoreHandler(_OpenKBPScoreHandler):
    """:class:`~monai_dose.metrics.DoseScoreMetric` as an ignite metric.

    ``output_transform`` gives ``(y_pred, y, possible_dose_mask)``; by default from the keys ``pred``,
    ``label`` and ``possible_dose_mask``. See :class:`_OpenKBPScoreHandler` for the arguments.
    """

    metric_class = DoseScoreMetric
    default_keys = ("pred", "label", "possible_dose_mask")
    kwarg_names = ("possible_dose_mask",)


class DVHScoreHandler(_OpenKBPScoreHandler):
    """:class:`~monai_dose.metrics.DVHScoreMetric` as an ignite metric.

    ``output_transform`` gives ``(y_pred, y, structures)`` or ``(y_pred, y, structures, spacing)``; by
    default from the keys ``pred``, ``label`` and ``structures``, with the voxel spacing from the affine of
    ``label``. See :class:`_OpenKBPScoreHandler` for the arguments.
    """

    metric_class = DVHScoreMetric
    default_keys = ("pred", "label", "structures")
    kwarg_names = ("structures", "spacing")
