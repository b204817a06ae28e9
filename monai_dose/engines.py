"""Engines and engine helpers for dose prediction: training with MONAI's ``SupervisedTrainer``, weight averages,
checkpoints that resume, and the inference evaluator that isolates bad patients."""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint, EMAHandler, ProgressBar
from monai.data import Dataset
from monai.engines import PrepareBatch, SupervisedEvaluator, Workflow
from monai.handlers import CheckpointSaver
from torch.optim.swa_utils import AveragedModel

from .data.openkbp import STRUCTURES
from .networks import MaskedDose
from .transforms.array import DoseInput, MaskDose, UnpackMasks
from .transforms.io import patient_id
from .utils import check_writable

logger = logging.getLogger(__name__)

PATIENT_ERRORS = (ValueError, FileNotFoundError, OSError, RuntimeError)
"""What a bad patient input raises (a transform's error reaches the caller wrapped in MONAI's ``RuntimeError``)."""
ERROR_KEY = "error"
_MONAI_WRAPPERS = ("applying transform", "Failed to instantiate", "Failed to evaluate")


def root_cause(error: BaseException) -> BaseException:
    """The error a transform or a bundle config item raised, unwrapped from the ``RuntimeError`` chain MONAI wraps
    it in (``apply_transform``'s ``"applying transform ..."``, the config's ``"Failed to instantiate ..."`` and
    ``"Failed to evaluate ..."``)."""
    while isinstance(error, RuntimeError) and error.__cause__ is not None and str(error).startswith(_MONAI_WRAPPERS):
        error = error.__cause__
    return error


def report_errors() -> None:
    """End this process on an uncaught error with one line, the ``Type: message`` of its :func:`root_cause` (for a
    bad patient its file and problem, not MONAI's ``Failed to evaluate ConfigExpression``), and exit status 1.

    The traceback goes to the log, at DEBUG level for the errors of a bad input (:data:`PATIENT_ERRORS`) and at ERROR
    level for any other. The bundle's configs call this first in their ``initialize``: it sets ``sys.excepthook``.
    """
    previous = sys.excepthook

    def report(kind: type[BaseException], error: BaseException, trace: TracebackType | None) -> None:
        if not isinstance(error, Exception):  # KeyboardInterrupt
            previous(kind, error, trace)
            return
        cause = root_cause(error)
        level = logging.DEBUG if isinstance(cause, PATIENT_ERRORS) else logging.ERROR
        logger.log(level, "uncaught error", exc_info=(kind, error, trace))
        print(f"{type(cause).__name__}: {cause}", file=sys.stderr)

    sys.excepthook = report


class PrepareDoseBatch(PrepareBatch):
    """``prepare_batch`` that augments the batch and assembles the network input on the training device.

    The data loader delivers the compact batch (CT, structures packed by :class:`~monai_dose.transforms.PackMasks`,
    possible-dose mask and dose: 10 channels per 2.5D slice where the assembled input has 36). Here, on the GPU
    when training runs there, ``transform`` (e.g. :class:`~monai_dose.transforms.BatchRandAffined`) moves the
    whole batch, the dose is zeroed outside the moved possible-dose mask, the masks are unpacked and
    :class:`~monai_dose.transforms.DoseInput` builds the input.

    Args:
        input_set: see :data:`monai_dose.transforms.INPUT_SETS`.
        keys: the CT, packed structures, possible-dose mask and dose keys of the batch, in this order, then the
            keys of the input set's derived inputs (:func:`~monai_dose.transforms.derived_inputs`).
        transform: a dictionary transform of the batch tensors (random augmentation), or ``None``.
        dtype: of the assembled input; ``torch.bfloat16`` for a network under bf16 autocast (the values it would
            see anyway, at half the memory traffic).
        label_masks: append the structure masks of the central slice to the label, after the dose, for a loss
            that needs them (:class:`~monai_dose.losses.DoseDVHLoss`).
    """

    def __init__(
        self,
        input_set: str = "reference",
        keys: Sequence[str] = ("ct", "structures", "possible_dose_mask", "dose"),
        transform: Callable[[dict], dict] | None = None,
        dtype: torch.dtype = torch.float32,
        label_masks: bool = False,
    ) -> None:
        self.dose_input = DoseInput(input_set, channel_dim=1, dtype=dtype)
        if len(keys) != 4 + len(self.dose_input.derived):
            raise ValueError(
                f"expected the CT, structures, possible-dose-mask, dose and {self.dose_input.derived or 'no other'} "
                f"keys, got {keys}"
            )
        self.keys = tuple(keys)
        self.transform = transform
        self.unpack = UnpackMasks(len(STRUCTURES), channel_dim=1, dtype=dtype)
        self.mask_dose = MaskDose(channel_dim=1)
        self.label_masks = label_masks

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        batch = {k: batchdata[k].to(device=device, non_blocking=non_blocking).float() for k in self.keys}
        if self.transform is not None:
            batch = self.transform(batch)
        ct, structures, mask, dose, *derived = (batch[k] for k in self.keys)
        masks = self.unpack(structures)
        image = self.dose_input(ct, masks, mask, *derived)
        label = self.mask_dose(dose, mask)
        if self.label_masks:
            stack = ct.shape[1]  # slices per 2.5D stack: the masks are mask-major, the central slice at stack // 2
            label = torch.cat([label, masks[:, stack // 2 :: stack].to(label.dtype)], 1)
        return image, label


class StochasticWeightAveraging:
    """Uniform average of the weights and batch-norm statistics of ``model`` at the end of every epoch from
    ``start_epoch`` on (stochastic weight averaging, Izmailov et al. 2018), kept by PyTorch's ``AveragedModel``.

    :attr:`averaged_model` (a copy of ``model``, or of its ``module`` when ``model`` is a (Distributed)DataParallel
    wrapper) holds the average, for validation and saving; it holds the weights ``model`` had when this was built
    until the first epoch is averaged. The update runs after the last iteration of an epoch, so the epoch's
    validation already scores it.
    """

    def __init__(self, model: torch.nn.Module, start_epoch: int = 1) -> None:
        if start_epoch < 1:
            raise ValueError(f"start_epoch must be at least 1, got {start_epoch}")
        parallel = (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)
        self.model = model.module if isinstance(model, parallel) else model
        self.start_epoch = start_epoch
        self.average = AveragedModel(self.model, use_buffers=True)

    @property
    def averaged_model(self) -> torch.nn.Module:
        """The copy of ``model`` that holds the average."""
        return self.average.module

    def attach(self, engine: Engine) -> None:
        """Average at the end of each of ``engine``'s epochs from ``start_epoch`` on."""
        engine.add_event_handler(Events.ITERATION_COMPLETED(event_filter=self._epoch_end), self.update)

    def _epoch_end(self, engine: Engine, iteration: int) -> bool:
        return iteration % engine.state.epoch_length == 0 and engine.state.epoch >= self.start_epoch

    def update(self) -> None:
        """Add ``model``'s current weights to the average."""
        self.average.update_parameters(self.model)


class ResumableCheckpointSaver(CheckpointSaver):
    """MONAI's ``CheckpointSaver`` whose rules hold across a resumed training.

    :meth:`state_dict` (the counterpart of MONAI's ``load_state_dict``) is the key-metric checkpoint's saved list, the
    ignite ``Checkpoint`` state that a new key metric is compared with. When attached, the epoch (or iteration)
    checkpoints that an earlier run left in ``save_dir`` count towards ``n_saved``: they are removed, oldest first, as
    new ones are written.
    """

    def state_dict(self) -> dict:
        """The key-metric checkpoint's ``(priority, filename)`` list, for ``load_state_dict``."""
        if self._key_metric_checkpoint is None:
            raise ValueError("no key metric checkpoint to save the state of: use save_key_metric=True")
        return dict(self._key_metric_checkpoint.state_dict())

    def attach(self, engine: Engine) -> None:
        super().attach(engine)
        checkpoint = self._interval_checkpoint
        if checkpoint is None:
            return
        pattern = Checkpoint.setup_filename_pattern(bool(checkpoint.filename_prefix), with_global_step=False)
        name = next(iter(self.save_dict)) if len(self.save_dict) == 1 else "checkpoint"  # as ignite names them
        files = pattern.format(
            filename_prefix=checkpoint.filename_prefix,
            name=name,
            score_name=checkpoint.score_name,
            score="*",
            ext=checkpoint.ext,
        )
        saved = []
        for path in Path(self.save_dir).glob(files):
            score = path.name.removesuffix(f".{checkpoint.ext}").rpartition("=")[2]
            if score.isdigit():
                saved.append((int(score), path.name))
        checkpoint.load_state_dict({"_saved": sorted(saved)})


class ValidationState:
    """The best validation so far, as a state dict for training checkpoints: the ``evaluator``'s best key metric and
    its epoch, and the state of the ``saver`` that writes the best model. Restored on resume, so that a validation
    replaces the best model only when it beats the best score before the run stopped.
    """

    def __init__(self, evaluator: Workflow, saver: ResumableCheckpointSaver) -> None:
        self.evaluator = evaluator
        self.saver = saver

    def state_dict(self) -> dict:
        """Best key metric, its epoch and the saver's state."""
        state = self.evaluator.state
        return {
            "best_metric": state.best_metric,
            "best_metric_epoch": state.best_metric_epoch,
            "saver": self.saver.state_dict(),
        }

    def load_state_dict(self, state_dict: Mapping) -> None:
        """Restore what :meth:`state_dict` returned."""
        self.evaluator.state.best_metric = state_dict["best_metric"]
        self.evaluator.state.best_metric_epoch = state_dict["best_metric_epoch"]
        self.saver.load_state_dict(state_dict["saver"])


def validated_network(
    network: torch.nn.Module, ema: EMAHandler | None = None, swa: StochasticWeightAveraging | None = None
) -> torch.nn.Module:
    """The network that validation scores and ``model.pt`` keeps: the weight average of ``ema`` or ``swa`` where
    one is enabled, else ``network``."""
    if ema is not None:
        return ema.ema_model
    if swa is not None:
        return swa.averaged_model
    return network


def bare_network(model: torch.nn.Module) -> torch.nn.Module:
    """The dose network inside ``model``'s (Distributed)DataParallel and :class:`~monai_dose.networks.MaskedDose`
    wrappers: what ``model.pt`` holds."""
    if isinstance(model, (torch.nn.DataParallel, torch.nn.parallel.DistributedDataParallel)):
        model = model.module
    return model.network if isinstance(model, MaskedDose) else model


class ProgressBarHandler:
    """ignite's ``ProgressBar`` of the training loss, updated every ``every`` iterations, as a MONAI handler."""

    def __init__(self, every: int = 10) -> None:
        self.every = every

    def attach(self, engine: Engine) -> None:
        ProgressBar(persist=False).attach(
            engine,
            output_transform=lambda out: {"loss": out[0]["loss"]},
            event_name=Events.ITERATION_COMPLETED(every=self.every),
        )


class PatientDataset(Dataset):
    """MONAI ``Dataset`` of patients whose preprocessing may fail on a bad input: such a patient comes back as
    ``{"id": ..., "error": problem}`` (:func:`root_cause` of :data:`PATIENT_ERRORS`), for
    :class:`DoseInferenceEvaluator` to report while the others are predicted."""

    def _transform(self, index: int):  # noqa: ANN202
        item = self.data[index]
        try:
            return {"id": patient_id(item), **super()._transform(index)}
        except PATIENT_ERRORS as err:
            return {"id": patient_id(item), ERROR_KEY: str(root_cause(err))}


class DoseInferenceEvaluator(SupervisedEvaluator):
    """MONAI's ``SupervisedEvaluator`` for predicting new patients one by one (batch size 1): a patient whose input
    is bad (an ``error`` item of :class:`PatientDataset`, or :data:`PATIENT_ERRORS` from the network or the
    postprocessing, such as an id that is not a folder name) is logged with its id and problem and skipped; the
    others are still predicted. At the end, a ``RuntimeError`` lists the failed patients, if any.

    Args:
        output_dir: where the postprocessing writes; checked to be writable before the first patient, and named
            at the end.
        args, kwargs: those of ``SupervisedEvaluator``.
    """

    def __init__(self, *args, output_dir: str | os.PathLike | None = None, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.output_dir = output_dir
        self.failures: dict[str, str] = {}
        self.add_event_handler(Events.STARTED, self._start)
        self.add_event_handler(Events.COMPLETED, self._report)

    def _start(self, engine: Engine) -> None:
        self.failures.clear()
        if self.output_dir is not None:
            check_writable(self.output_dir)

    def _iteration(self, engine: Engine, batchdata: dict) -> dict:  # type: ignore[override]
        patient = str(batchdata["id"][0]) if "id" in batchdata else str(engine.state.iteration)
        try:
            if ERROR_KEY in batchdata:
                raise ValueError(batchdata[ERROR_KEY][0])
            return super()._iteration(engine, batchdata)
        except PATIENT_ERRORS as err:
            self.failures[patient] = str(root_cause(err))
            logger.error("patient %s: %s", patient, self.failures[patient])
            return {}

    def _report(self, engine: Engine) -> None:
        total = len(self.data_loader)  # type: ignore[arg-type]
        if self.output_dir is not None:
            print(f"predicted {total - len(self.failures)} of {total} patients into {self.output_dir}")
        if self.failures:
            details = "; ".join(f"{k}: {v}" for k, v in self.failures.items())
            raise RuntimeError(f"{len(self.failures)} of {total} patients failed ({details})")
