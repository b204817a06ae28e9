"""Dose prediction for new patients: :class:`DosePredictor` (arrays in, dose out) and batch prediction of files,
both made of the pipeline's pieces (:mod:`monai_dose.transforms.pipeline`, :func:`~monai_dose.inferers.dose_inferer`,
:class:`~monai_dose.engines.DoseInferenceEvaluator`), as the bundle's ``configs/inference.json`` is."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigParser
from monai.data import DataLoader, MetaTensor
from monai.transforms import Compose
from monai.utils import convert_to_numpy

from .checkpoints import load_weights
from .data.openkbp import IMAGE_KEYS, STRUCTURES, openkbp_affine, patient_files
from .engines import DoseInferenceEvaluator, PatientDataset, root_cause
from .inferers import dose_inferer
from .networks import MaskedDose, volume_model
from .precision import resolve_precision
from .transforms import (
    MODEL_PIXDIM,
    BinariseMask,
    BinariseMaskd,
    LoadNiftid,
    SaveDosed,
    check_voxel_spacing,
    derived_inputs,
    dose_postprocessing,
    input_assembly,
    mask_channel,
    patient_id,
    patient_preprocessing,
)
from .utils import as_device, patient_path

logger = logging.getLogger(__name__)


def on_device(network: torch.nn.Module, device: str | torch.device) -> torch.nn.Module:
    """``network`` on ``device`` for inference, in evaluation mode, its weights channels-last: oneDNN's fastest
    convolutions on CPUs (1.7x in float32 here, ``docs/performance.md``)."""
    layout = torch.channels_last_3d if any(p.ndim == 5 for p in network.parameters()) else torch.channels_last
    return network.to(device, memory_format=layout).eval()


class DosePredictor:
    """Predict a dose volume from CT, structures and possible-dose mask held as arrays, with the pipeline of the
    bundle's inference: preprocessing (checks, geometry, derived inputs, input assembly), inferer and
    postprocessing (geometry inverted, masked dose).

    Example::

        predictor = monai_dose.DosePredictor.from_bundle("bundles/openkbp_dose")
        dose = predictor(ct, structures, possible_dose_mask, voxel_spacing=(3.906, 3.906, 2.5))  # float32 Gy

    Args:
        network: the dose network (not wrapped in :class:`~monai_dose.networks.MaskedDose`).
        spatial_dims: 2 runs the network slice by slice along the last axis
            (:class:`~monai_dose.networks.AxialSliceNetwork`), 3 on the volume.
        input_set: input channels the network was trained with (see ``monai_dose.transforms.INPUT_SETS``).
        neighbours: slices on each side the network takes as channels (2.5D networks).
        tta: average with the left-right flipped prediction (test-time augmentation).
        device: where the network runs (default: CUDA when available).
        amp: ``"auto"`` runs the network under bfloat16 autocast where the device computes bf16 natively and in
            float32 elsewhere; ``True``/``False`` force it (see :mod:`monai_dose.precision`).
        sw_batch_size: slices per network call for 2D networks.
        frame: in-plane size of the window around the possible-dose mask a 2D network runs in (the training crop,
            ``train.json``'s ``frame``; see :class:`~monai_dose.networks.AxialSliceNetwork`); ``None``: the whole grid.
        pixdim, min_pixdim, max_pixdim, divisor: the geometry (see
            :func:`~monai_dose.transforms.patient_preprocessing`).
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
        frame: Sequence[int] | None = None,
        pixdim: Sequence[float] = MODEL_PIXDIM,
        min_pixdim: Sequence[float] | None = None,
        max_pixdim: Sequence[float] | None = None,
        divisor: Sequence[int] = (8, 8, 1),
    ) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = resolve_precision(self.device, amp)
        model = MaskedDose(network, mask_channel(input_set, neighbours), self.precision.autocast)
        network = volume_model(model, input_set, spatial_dims, neighbours, sw_batch_size, frame)
        self.network = on_device(network, self.device)
        self.input_set = input_set
        self.pixdim = tuple(pixdim)
        self.preprocessing = Compose(
            [
                patient_preprocessing(
                    IMAGE_KEYS,
                    input_set,
                    load=False,
                    pixdim=pixdim,
                    min_pixdim=min_pixdim,
                    max_pixdim=max_pixdim,
                    divisor=divisor,
                    device=None if self.device.type == "cpu" else self.device,  # derived inputs on the GPU
                ),
                input_assembly(input_set),
            ]
        )
        self.inferer = dose_inferer(tta)
        self.postprocessing = dose_postprocessing(self.preprocessing)

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
        keys = ("spatial_dims", "input_set", "neighbours", "tta", "device", "amp", "sw_batch_size", "frame")
        keys += ("pixdim", "min_pixdim", "max_pixdim", "divisor")
        return cls(network, **{k: parser.get_parsed_content(k) for k in keys})

    def prepare(
        self,
        ct,
        structures,
        possible_dose_mask,
        voxel_spacing: Sequence[float] | None = None,
        mask_threshold: float | None = None,
    ) -> dict:
        """Check the inputs and run the preprocessing (see :meth:`__call__`); the prepared volumes, the network
        input ``image`` among them."""
        if np.ndim(structures) != 4 or np.shape(structures)[-1] != len(STRUCTURES):
            raise ValueError(
                f"structures must be (H, W, D, {len(STRUCTURES)}) in the order {', '.join(STRUCTURES)}; "
                f"got shape {tuple(np.shape(structures))}"
            )
        if np.ndim(ct) != 3:
            raise ValueError(f"ct must be a 3D volume (H, W, D), got shape {tuple(np.shape(ct))}")
        inputs = {"ct": ct, "structures": structures, "possible_dose_mask": possible_dose_mask}
        affine = None
        if voxel_spacing is not None:
            affine = openkbp_affine(check_voxel_spacing(voxel_spacing))
        elif not isinstance(structures, MetaTensor):
            if derived_inputs(self.input_set):
                raise ValueError(f"input set '{self.input_set}' needs the voxel spacing: pass voxel_spacing")
            affine = openkbp_affine(self.pixdim)  # arrays taken to be on the model's grid
        data = {}
        for key, value in inputs.items():
            if mask_threshold is not None and key != "ct":
                value = BinariseMask(mask_threshold)(value, key)
            array = value.as_tensor() if isinstance(value, MetaTensor) else torch.as_tensor(np.asarray(value))
            array = array.movedim(-1, 0) if key == "structures" else array[None]
            meta = {k: v for k, v in getattr(value, "meta", {}).items() if k == "filename_or_obj"}
            own = value.affine if isinstance(value, MetaTensor) and affine is None else affine
            data[key] = MetaTensor(array, affine=torch.as_tensor(own, dtype=torch.float64), meta=meta)
        try:
            return self.preprocessing(data)
        except RuntimeError as err:
            raise root_cause(err) from None

    def predict(self, data: dict) -> torch.Tensor:
        """Raw network output ``(1, H, W, D)`` on the network's grid for :meth:`prepare`'s ``data``."""
        with torch.no_grad():
            return self.inferer(data["image"][None].to(self.device), self.network)[0]

    def postprocess(self, pred: torch.Tensor, data: dict) -> np.ndarray:
        """The dose on the input grid: ``(H, W, D)`` float32, >= 0, zero outside the possible-dose mask."""
        try:
            dose = self.postprocessing({**data, "pred": pred.cpu()})["pred"]
        except RuntimeError as err:
            raise root_cause(err) from None
        return convert_to_numpy(dose[0], dtype=np.float32)

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
            voxel_spacing: in mm, of arrays in OpenKBP's orientation (:data:`~monai_dose.data.AXES_RAS`). Without
                it, ``MetaTensor`` inputs (:func:`load_patient`) are read with their affines, in any axis-aligned
                orientation, and plain arrays are taken to be in OpenKBP's orientation at the model's spacing
                (refused for input sets with derived inputs, which need the spacing).
            mask_threshold: voxels ``>= mask_threshold`` are inside the masks; needed for masks that are not
                integer label maps (a probability map is refused without it).
        """
        data = self.prepare(ct, structures, possible_dose_mask, voxel_spacing, mask_threshold)
        return self.postprocess(self.predict(data), data)


def load_patient(item: str | os.PathLike | Mapping) -> dict:
    """Load a patient's input files as ``MetaTensor`` with their affines, in the files' shapes (structures
    channel-last) and types: those of a patient folder (``ct.nii.gz``, ``structures.nii.gz``,
    ``possible_dose_mask.nii.gz``), or of a datalist item's ``ct``, ``structures`` and ``possible_dose_mask`` keys. A
    missing or unreadable file raises an error naming it.

    Returns:
        ``item`` with those keys loaded (for a folder: just them, the arguments of :class:`DosePredictor`).
    """
    if not isinstance(item, Mapping):
        item = patient_files(item)
    try:
        loaded = LoadNiftid(IMAGE_KEYS, ensure_channel_first=False)(item)
    except RuntimeError as err:
        raise root_cause(err) from None
    # NiftiReader lays the structures out channel first; the file's shape is a view of that (no copy), which
    # DosePredictor moves back
    return {**loaded, "structures": loaded["structures"].movedim(0, -1)}


def predict_patients(
    predictor: DosePredictor,
    datalist: Sequence[dict],
    output_dir: str | os.PathLike,
    mask_threshold: float | None = None,
) -> dict[str, Path]:
    """Predict every patient of ``datalist`` and write ``output_dir/<id>/dose.nii.gz`` on the CT's grid, with the
    predictor's pieces in a :class:`~monai_dose.engines.DoseInferenceEvaluator`.

    ``output_dir`` is checked to be writable before the first prediction (``PermissionError`` otherwise). A
    patient whose input is bad, or whose id is not a single folder name, is reported (logged with its id and the
    problem) and skipped; the others are still predicted. Raises ``RuntimeError`` listing the failed patients at
    the end, if any.

    Args:
        mask_threshold: see :meth:`DosePredictor.__call__`.

    Returns:
        patient id -> written dose file.
    """
    loading = [LoadNiftid(IMAGE_KEYS)]
    if mask_threshold is not None:
        loading.append(BinariseMaskd(IMAGE_KEYS[1:], threshold=mask_threshold))
    dataset = PatientDataset(list(datalist), Compose([*loading, predictor.preprocessing]))
    evaluator = DoseInferenceEvaluator(
        device=predictor.device,
        val_data_loader=DataLoader(dataset, batch_size=1, num_workers=0),
        network=predictor.network,
        inferer=predictor.inferer,
        postprocessing=Compose([predictor.postprocessing, SaveDosed("pred", output_dir)]),
        output_dir=output_dir,
    )
    evaluator.run()
    ids = [patient_id(item) for item in datalist]
    return {i: patient_path(output_dir, i, "dose.nii.gz") for i in ids if i not in evaluator.failures}
