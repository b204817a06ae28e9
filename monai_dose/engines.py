"""Engine helpers for dose-prediction training with MONAI's ``SupervisedTrainer``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from monai.engines import PrepareBatch, Workflow
from monai.handlers import CheckpointSaver
from torch.optim.swa_utils import AveragedModel

from .data.openkbp import STRUCTURES
from .transforms.array import DoseInput, MaskDose, UnpackMasks


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
