"""Checkpoints of the bundle: reading network weights (bare or weight averages), loading them (into another input
set), averaging several, finding the newest complete one, and what a training checkpoint holds."""

from __future__ import annotations

import logging
import os
import pickle
from collections.abc import Sequence
from pathlib import Path

import torch

from .networks import DCNN
from .transforms import input_channel_names

logger = logging.getLogger(__name__)

# where a training checkpoint of the bundle keeps a weight average, and the prefix of the network's keys in it
# (the average of a ``MaskedDose``-wrapped network, in PyTorch's ``AveragedModel`` for ``swa_model``)
AVERAGES = {"ema_model": "network.", "swa_model": "module.network."}


def network_weights(checkpoint: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The network state dict of a checkpoint saved by the bundle: ``model.pt`` (the bare state dict) or a
    training checkpoint (its ``"model"``). ``FILE#ema_model`` or ``FILE#swa_model`` takes the weight average a
    training checkpoint holds (``--ema_momentum`` or ``--swa_start``) instead."""
    path, average = Path(checkpoint), ""
    if not path.is_file() and "#" in path.name:
        name, _, average = path.name.rpartition("#")
        path = path.with_name(name)
        if average not in AVERAGES:
            raise ValueError(f"{checkpoint}: '#{average}' is not one of {', '.join('#' + a for a in AVERAGES)}")
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no such checkpoint")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if average:
        if average not in state:
            raise ValueError(f"{path}: holds no '{average}' (it holds {', '.join(state)})")
        prefix = AVERAGES[average]
        return {k.removeprefix(prefix): v for k, v in state[average].items() if k.startswith(prefix)}
    if "model" in state and isinstance(state["model"], dict):
        state = state["model"]
    return state


def average_weights(checkpoints: Sequence[str | os.PathLike]) -> dict[str, torch.Tensor]:
    """Uniform average, in float32, of the weights and batch-norm statistics of several checkpoints of one network
    (a "model soup"; each read by :func:`network_weights`); integer buffers are taken from the first."""
    if not checkpoints:
        raise ValueError("no checkpoints to average")
    states = [network_weights(c) for c in checkpoints]
    first = states[0]
    for checkpoint, state in zip(checkpoints[1:], states[1:], strict=True):
        shapes = {k: tuple(v.shape) for k, v in state.items()}
        if shapes != {k: tuple(v.shape) for k, v in first.items()}:
            raise ValueError(f"{checkpoint}: not the network of {checkpoints[0]} (other weight names or shapes)")
    return {
        k: torch.stack([s[k].float() for s in states]).mean(0) if v.is_floating_point() else v for k, v in first.items()
    }


def load_weights(
    network: torch.nn.Module,
    checkpoint: str | os.PathLike,
    input_set: str | None = None,
    neighbours: int = 0,
    checkpoint_input_set: str | None = None,
) -> torch.nn.Module:
    """Load the weights of a checkpoint saved by the bundle (see :func:`network_weights`) into ``network``, in
    float32.

    A checkpoint trained on another input set (``checkpoint_input_set``, for ``network`` taking ``input_set``
    with ``neighbours``) keeps its first convolution's weights channel by channel, matched by name
    (:func:`~monai_dose.transforms.input_channel_names`); the weights of channels new to ``input_set`` start at
    zero, so that the network computes what the checkpoint did until it learns to use them. Likewise a checkpoint
    of a narrower :class:`~monai_dose.networks.DCNN` loads into a wider one (``DCNN.load_narrower``): capacity
    added to trained weights.
    """
    state = {k: v.float() if v.is_floating_point() else v for k, v in network_weights(checkpoint).items()}
    if checkpoint_input_set is not None and input_set is not None and checkpoint_input_set != input_set:
        old, new = (input_channel_names(s, neighbours) for s in (checkpoint_input_set, input_set))
        key = next(k for k, v in state.items() if v.ndim > 2)  # the first convolution
        weight = state[key]
        if weight.shape[1] != len(old):
            raise ValueError(
                f"{checkpoint}: its first layer ({key}) takes {weight.shape[1]} channels, not the {len(old)} of "
                f"input set '{checkpoint_input_set}' with {neighbours} neighbours"
            )
        state[key] = weight.new_zeros(weight.shape[0], len(new), *weight.shape[2:])
        for channel, name in enumerate(new):
            if name in old:
                state[key][:, channel] = weight[:, old.index(name)]
    shapes = {k: v.shape for k, v in network.state_dict().items()}
    if isinstance(network, DCNN) and any(shapes.get(k) != v.shape for k, v in state.items()):
        try:
            network.load_narrower(state)
        except ValueError as err:
            raise ValueError(f"{checkpoint}: {err}") from None
    else:
        network.load_state_dict(state)
    return network


def pretrained(
    network: torch.nn.Module,
    checkpoint: str | os.PathLike | None = None,
    input_set: str | None = None,
    neighbours: int = 0,
    checkpoint_input_set: str | None = None,
    resume: str | os.PathLike | None = None,
) -> torch.nn.Module:
    """``network`` with the weights of ``checkpoint`` (:func:`load_weights`), for fine-tuning; unchanged without a
    ``checkpoint`` or when training resumes from ``resume`` (whose weights are loaded later)."""
    if checkpoint and not resume:
        load_weights(network, checkpoint, input_set, neighbours, checkpoint_input_set)
    return network


def latest_checkpoint(directory: str | os.PathLike, pattern: str = "checkpoint_*.pt") -> str:
    """The newest checkpoint matching ``pattern`` in ``directory`` that loads completely, or ``""`` if none.

    MONAI's ``CheckpointSaver`` writes in place, so a run killed while saving leaves a truncated newest file: it
    is skipped with a warning, and training resumes from the one before.
    """
    for path in sorted(Path(directory).glob(pattern), key=os.path.getmtime, reverse=True):
        try:
            torch.load(path, map_location="cpu", weights_only=True)
        except (EOFError, OSError, RuntimeError, pickle.UnpicklingError) as error:
            logger.warning(f"{path}: incomplete or unreadable checkpoint, skipped ({error!r})")
            continue
        return str(path)
    return ""


def training_objects(ema: object | None = None, swa: object | None = None, **objects: object) -> dict[str, object]:
    """What a training checkpoint saves and resumes: ``objects`` (network, optimizer, trainer, ...) and the weight
    average of ``ema`` (an ignite ``EMAHandler``, as ``ema_model``) or ``swa`` (a
    :class:`~monai_dose.engines.StochasticWeightAveraging`, as ``swa_model``) where enabled."""
    if ema is not None:
        objects["ema_model"] = ema.ema_model  # type: ignore[attr-defined]
    if swa is not None:
        objects["swa_model"] = swa.average  # type: ignore[attr-defined]
    return objects
