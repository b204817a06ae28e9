"""Dose prediction for new patients: :class:`DosePredictor` (arrays in, dose out) and batch prediction of files."""

from __future__ import annotations

import logging
import os
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.data.utils import affine_to_spacing
from monai.inferers import Inferer, SimpleInferer
from monai.utils import convert_to_numpy
from tqdm import tqdm

from .data.openkbp import IMAGE_KEYS, STRUCTURES
from .inferers import AxialSliceInferer, FlipTTAInferer
from .precision import resolve_precision
from .transforms import (
    BeamPrior,
    BinariseMask,
    DoseInput,
    EnsureOpenKBPCT,
    MaskDose,
    RequireTargets,
    SliceNeighbours,
    TargetProximity,
    check_voxel_spacing,
    input_channel_names,
    source_name,
)
from .utils import as_device, check_writable, patient_path, write_atomic

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
    zero, so that the network computes what the checkpoint did until it learns to use them.
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
    network.load_state_dict(state)
    return network


class DosePredictor:
    """Predict a dose volume from CT, structures and possible-dose mask held as arrays.

    Example::

        predictor = monai_dose.DosePredictor.from_bundle("bundles/openkbp_dose")
        dose = predictor(ct, structures, possible_dose_mask, voxel_spacing=(3.906, 3.906, 2.5))  # float32 Gy

    Args:
        network: the dose network (not wrapped in :class:`~monai_dose.networks.MaskedDose`).
        spatial_dims: 2 runs the network slice by slice along the last axis
            (:class:`~monai_dose.inferers.AxialSliceInferer`), 3 on the volume.
        input_set: input channels the network was trained with (see ``monai_dose.transforms.INPUT_SETS``).
        neighbours: slices on each side stacked as channels (2.5D networks).
        tta: average with the left-right flipped prediction (test-time augmentation).
        device: where the network runs (default: CUDA when available).
        amp: ``"auto"`` runs the network under bfloat16 autocast where the device computes bf16 natively and in
            float32 elsewhere; ``True``/``False`` force it (see :mod:`monai_dose.precision`).
        sw_batch_size: slices per network call for 2D networks.
    """

    def __init__(
        self,
        network: torch.nn.Module,
        spatial_dims: int = 2,
        input_set: str = "reference",
        neighbours: int = 0,
        tta: bool = False,
        device: str | torch.device | None = None,
        amp: bool | str = "auto",
        sw_batch_size: int = 32,
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = resolve_precision(self.device, amp)
        # channels-last weights: oneDNN's fastest convolutions on CPUs (1.7x in float32 here, docs/performance.md)
        layout = torch.channels_last if spatial_dims == 2 else torch.channels_last_3d
        self.network = network.to(self.device, memory_format=layout).eval()
        self.spatial_dims = spatial_dims
        self.input = DoseInput(input_set)
        self.neighbours = SliceNeighbours(neighbours) if neighbours else None
        self.inferer: Inferer = AxialSliceInferer(sw_batch_size) if spatial_dims == 2 else SimpleInferer()
        if tta:
            self.inferer = FlipTTAInferer(self.inferer)

    @classmethod
    def from_bundle(
        cls,
        bundle_dir: str | os.PathLike,
        checkpoint: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        **overrides,
    ) -> DosePredictor:
        """Build the predictor of a bundle's ``configs/inference.json`` with the weights of ``models/model.pt``.

        ``overrides`` replace config values (e.g. ``tta=True``, ``amp=False``); like the config files, they are
        code where they are strings starting with ``$`` (MONAI evaluates those), so pass values.
        """
        bundle_dir = Path(bundle_dir).resolve()  # absolute: never read as a config expression or reference
        config_file = bundle_dir / "configs" / "inference.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"{config_file}: not a bundle (no configs/inference.json)")
        parser = ConfigParser()
        parser.read_config(config_file)
        parser.update({"bundle_root": str(bundle_dir), **overrides})
        if device is not None:
            parser["device"] = as_device(device)
        checkpoint = Path(checkpoint or bundle_dir / "models" / "model.pt")
        if not checkpoint.is_file():
            raise FileNotFoundError(f"{checkpoint}: no trained weights (train the bundle or pass checkpoint=)")
        network = load_weights(parser.get_parsed_content("network_def"), checkpoint)
        return cls(
            network,
            spatial_dims=parser.get_parsed_content("spatial_dims"),
            input_set=parser.get_parsed_content("input_set"),
            neighbours=parser.get_parsed_content("neighbours"),
            tta=parser.get_parsed_content("tta"),
            device=parser.get_parsed_content("device"),
            amp=parser.get_parsed_content("amp", default="auto"),
        )

    def _network(self, image: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode(), torch.autocast(self.device.type, torch.bfloat16, self.precision.autocast):
            return self.inferer(image, self.network).float()

    def prepare(
        self,
        ct,
        structures,
        possible_dose_mask,
        voxel_spacing: Sequence[float] | None = None,
        mask_threshold: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Check and normalise the inputs (see :meth:`__call__` and :mod:`monai_dose.transforms.inputs`) and
        assemble the network input on the predictor's device; returns ``(image, mask)``."""
        if np.ndim(structures) != 4 or np.shape(structures)[-1] != len(STRUCTURES):
            raise ValueError(
                f"structures must be (H, W, D, {len(STRUCTURES)}) in the order {', '.join(STRUCTURES)}; "
                f"got shape {tuple(np.shape(structures))}"
            )
        if np.ndim(ct) != 3:
            raise ValueError(f"ct must be a 3D volume (H, W, D), got shape {tuple(np.shape(ct))}")
        if voxel_spacing is not None:
            voxel_spacing = check_voxel_spacing(voxel_spacing)
        elif isinstance(structures, MetaTensor):
            spacing = affine_to_spacing(structures.affine, r=3, suppress_zeros=False)  # pixdim shows a 0 as 1
            voxel_spacing = check_voxel_spacing(spacing, name=source_name(structures, "structures"))
        binarise = BinariseMask(mask_threshold)
        structures = RequireTargets(channel_dim=-1)(binarise(structures, "structures"))
        possible_dose_mask = binarise(possible_dose_mask, "possible_dose_mask")
        ct_t, struct_t, mask_t = (
            torch.as_tensor(np.asarray(a)).to(self.device).float()
            for a in (EnsureOpenKBPCT()(ct), structures, possible_dose_mask)
        )
        mask_t = mask_t[None]
        if not torch.isfinite(ct_t).all():
            raise ValueError("the CT contains NaN or infinite values")
        if not (mask_t > 0).any():
            raise ValueError("the possible-dose mask is empty")
        struct_t = struct_t.movedim(-1, 0)
        if self.input.derived and voxel_spacing is None:
            raise ValueError(f"input set '{self.input.input_set}' needs the voxel spacing: pass voxel_spacing")
        derived = {
            "target_proximity": lambda: TargetProximity()(struct_t, voxel_spacing),
            "beam_prior": lambda: BeamPrior()(struct_t, mask_t, voxel_spacing),
        }
        image = self.input(ct_t[None], struct_t, mask_t, *(derived[k]().to(self.device) for k in self.input.derived))
        if self.neighbours is not None:
            image = self.neighbours(image)
        return image, mask_t

    def predict(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Raw network output ``(1, H, W, D)`` for a prepared ``image``; 2D networks skip slices without mask."""
        if self.spatial_dims == 3:
            return self._network(image[None].to(self.device))[0]
        pred = torch.zeros(mask.shape, device=self.device)
        slices = torch.nonzero(mask.flatten(0, 2).any(0)).flatten()
        first, last = int(slices[0]), int(slices[-1]) + 1
        pred[..., first:last] = self._network(image[None, ..., first:last].to(self.device))[0]
        return pred

    @staticmethod
    def postprocess(pred: torch.Tensor, mask: torch.Tensor) -> np.ndarray:
        """Masked-dose post-processing: ``(H, W, D)`` float32, >= 0, zero outside ``mask``."""
        return convert_to_numpy(MaskDose()(pred, mask)[0], dtype=np.float32)

    def __call__(
        self,
        ct: np.ndarray | torch.Tensor,
        structures: np.ndarray | torch.Tensor,
        possible_dose_mask,
        voxel_spacing: Sequence[float] | None = None,
        mask_threshold: float | None = None,
    ) -> np.ndarray:
        """Predict the dose in Gy (float32, ``H, W, D``), >= 0 and zero outside the possible-dose mask.

        Args:
            ct: ``(H, W, D)`` OpenKBP CT values (Hounsfield units + 1024); a CT in Hounsfield units (air near
                -1000) is converted, with a warning.
            structures: ``(H, W, D, 10)`` masks in :data:`monai_dose.data.STRUCTURES` order, with at least one
                target; any non-zero voxel is inside (values other than 0/1 are warned about).
            possible_dose_mask: ``(H, W, D)`` mask of where dose may be non-zero, read as ``structures``.
            voxel_spacing: in mm, needed by the input sets with derived inputs unless ``structures`` is a
                ``MetaTensor`` (whose affine gives it).
            mask_threshold: voxels ``>= mask_threshold`` are inside the masks; needed for masks that are not
                integer label maps (a probability map is refused without it).
        """
        image, mask = self.prepare(ct, structures, possible_dose_mask, voxel_spacing, mask_threshold)
        return self.postprocess(self.predict(image, mask), mask)


def load_patient(item: dict) -> dict:
    """Load a patient's input files (``ct``, ``structures``, ``possible_dose_mask`` keys) as ``MetaTensor`` with
    their affines, in the files' types and memory layout.

    MONAI's ``LoadImage`` copies each NIfTI array into C order (a 4D transpose of the 20 MB structure masks, three
    quarters of its loading time); NIfTI's own column-major layout keeps every axial slice contiguous, which is
    what the slice-wise network reads, so the arrays are wrapped as they are read.
    """
    patient = {}
    for key in IMAGE_KEYS:
        try:
            image = nib.load(item[key])
            array = np.asanyarray(image.dataobj)
        except (nib.filebasedimages.ImageFileError, EOFError, OSError, zlib.error) as err:
            raise ValueError(f"{item[key]}: not a readable NIfTI file ({err})") from err
        data = torch.from_numpy(array.astype(array.dtype.newbyteorder("="), copy=False))  # native byte order
        patient[key] = MetaTensor(data, affine=torch.as_tensor(image.affine), meta={"filename_or_obj": item[key]})
    return patient


def _check_grids(patient: dict) -> None:
    """Raise when the loaded CT and masks differ in shape or affine."""
    reference = patient["ct"]
    for key in IMAGE_KEYS[1:]:
        other = patient[key]
        if tuple(other.shape[:3]) != tuple(reference.shape[:3]):
            raise ValueError(f"{key} grid {tuple(other.shape[:3])} differs from the CT grid {tuple(reference.shape)}")
        if not torch.allclose(other.affine.double(), reference.affine.double(), atol=1e-3):
            raise ValueError(f"{key} affine differs from the CT affine")


def save_dose(dose: np.ndarray, reference_file: str | os.PathLike, out_file: str | os.PathLike) -> Path:
    """Write ``dose`` as float32 NIfTI with the header and affine of ``reference_file``, atomically."""
    reference = nib.load(str(reference_file))
    image = nib.Nifti1Image(dose.astype(np.float32), reference.affine, reference.header)
    image.set_data_dtype(np.float32)
    image.header.set_slope_inter(1, 0)
    return write_atomic(out_file, lambda path: nib.save(image, path))


def predict_patients(
    predictor: DosePredictor | Callable,
    datalist: Sequence[dict],
    output_dir: str | os.PathLike,
    loader: Callable | None = None,
    mask_threshold: float | None = None,
) -> dict[str, Path]:
    """Predict every patient of ``datalist`` and write ``output_dir/<id>/dose.nii.gz`` on the CT's grid.

    ``output_dir`` is checked to be writable before the first prediction (``PermissionError`` otherwise). A
    patient whose input is bad, or whose id is not a single folder name, is reported (logged with its id and the
    problem) and skipped; the others are still predicted. Raises ``RuntimeError`` listing the failed patients at
    the end, if any.

    Args:
        predictor: a :class:`DosePredictor`, or any callable ``(ct, structures, possible_dose_mask,
            mask_threshold=...) -> dose``.
        mask_threshold: see :meth:`DosePredictor.__call__`.

    Returns:
        patient id -> written dose file.
    """
    loader = loader or load_patient
    check_writable(output_dir)
    written: dict[str, Path] = {}
    failures: dict[str, str] = {}
    for item in tqdm(datalist, desc="predicting", unit="patient"):
        patient_id = str(item.get("id", Path(item["ct"]).parent.name))
        try:
            out_file = patient_path(output_dir, patient_id, "dose.nii.gz")
            missing = [k for k in IMAGE_KEYS if k not in item or not Path(item[k]).is_file()]
            if missing:
                raise FileNotFoundError(f"missing {', '.join(f'{k}.nii.gz' for k in missing)}")
            patient = loader(item)
            _check_grids(patient)
            dose = predictor(
                patient["ct"], patient["structures"], patient["possible_dose_mask"], mask_threshold=mask_threshold
            )
            written[patient_id] = save_dose(dose, item["ct"], out_file)
        except (ValueError, FileNotFoundError, RuntimeError, OSError) as err:
            failures[patient_id] = str(err)
            logger.error("patient %s: %s", patient_id, err)
    if failures:
        details = "; ".join(f"{k}: {v}" for k, v in failures.items())
        raise RuntimeError(f"{len(failures)} of {len(datalist)} patients failed ({details})")
    return written
