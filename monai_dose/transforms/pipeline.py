"""The dose pipeline's transforms, defined once for training-time validation, bundle evaluation and inference,
:class:`~monai_dose.inference.DosePredictor` and ``predict-dicom``.

- :func:`patient_preprocessing`: loading, input checks, geometry (training orientation, spacing within the
  training range, padding for the network) and derived inputs: deterministic, so validation caches it;
- :func:`input_assembly`: the network input ``image``;
- :func:`dose_postprocessing`: the geometry inverted (``Invertd``), masked dose, and optionally atomic writing.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import nibabel as nib
import torch
from monai.transforms import (
    CastToTyped,
    Compose,
    CopyItemsd,
    DivisiblePadd,
    EnsureTyped,
    Invertd,
    Orientationd,
    Spacingd,
)

from ..data.openkbp import IMAGE_KEYS, openkbp_affine
from .array import derived_inputs
from .dictionary import BeamPriord, DoseInputd, MaskDosed, TargetProximityd
from .geometry import CheckGridsd
from .inputs import BinariseMaskd, EnsureOpenKBPCTd, RequireFinited, RequireNonEmptyd, RequireTargetsd
from .io import LoadNiftid, SaveDosed

AXCODES = "".join(nib.orientations.aff2axcodes(openkbp_affine((1.0, 1.0, 1.0))))
"""Axis codes of the training orientation (OpenKBP's array axes, :data:`~monai_dose.data.AXES_RAS`): ``"PLI"``."""
MODEL_PIXDIM: tuple[float, float, float] = (3.906, 3.906, 2.5)
"""Voxel size (mm) an input is resampled to along an axis whose spacing lies outside the training range, and that
plain arrays without a spacing are taken to have: the most common OpenKBP voxel size."""
MASK_KEYS = ("structures", "possible_dose_mask")
INPUT_MASK = "input_mask"
"""Key of the possible-dose mask as given (on the input grid), which the output dose is masked with."""


def patient_preprocessing(
    keys: Sequence[str] = IMAGE_KEYS,
    input_set: str = "reference",
    load: bool = True,
    mask_threshold: float | None = None,
    pixdim: Sequence[float] = MODEL_PIXDIM,
    min_pixdim: Sequence[float] | None = None,
    max_pixdim: Sequence[float] | None = None,
    divisor: Sequence[int] = (8, 8, 1),
    derived_dtype: torch.dtype = torch.float32,
    device: str | torch.device | None = None,
) -> Compose:
    """The deterministic part of the preprocessing of a patient's volumes (channel-first, ``keys``: the CT,
    structures, possible-dose mask and any other volume on their grid, such as the plan dose):

    1. loading (:class:`~monai_dose.transforms.LoadNiftid`, when ``load``);
    2. input checks (:mod:`monai_dose.transforms.inputs`, :class:`~monai_dose.transforms.CheckGridsd`): one
       axis-aligned grid, binary masks (``mask_threshold``), CT units, finite CT, a target, a non-empty
       possible-dose mask; the mask as given is kept as :data:`INPUT_MASK`;
    3. geometry: ``Orientationd`` to the training orientation (:data:`AXCODES`), ``Spacingd`` to ``pixdim``
       along the axes whose spacing lies outside ``min_pixdim`` .. ``max_pixdim``, the range trained on (the others
       keep their grid: no resampling for an input inside it; a bound not given: none), ``DivisiblePadd`` to
       multiples of ``divisor`` (what the network's poolings need);
    4. the derived inputs of ``input_set`` (:func:`~monai_dose.transforms.derived_inputs`), in ``derived_dtype``,
       computed on ``device`` when given (the volumes are moved there first; :data:`INPUT_MASK` stays where it was):
       on the network's GPU, no host pass.

    Every geometric step is recorded on the ``MetaTensor``, so that :func:`dose_postprocessing` inverts it.
    """
    keys = list(keys)
    masks = [k for k in MASK_KEYS if k in keys]
    derived = derived_inputs(input_set)
    transforms = [LoadNiftid(keys)] if load else []
    transforms += [
        CheckGridsd(keys),
        BinariseMaskd(masks, threshold=mask_threshold),
        EnsureOpenKBPCTd("ct"),
        RequireFinited("ct"),
        RequireTargetsd("structures"),
        RequireNonEmptyd("possible_dose_mask"),
        CopyItemsd("possible_dose_mask", names=INPUT_MASK),
        Orientationd(keys, axcodes=AXCODES),
        Spacingd(
            keys,
            pixdim=pixdim,
            mode=["nearest" if k in masks else "bilinear" for k in keys],
            min_pixdim=(0.0,) * len(pixdim) if min_pixdim is None else min_pixdim,
            max_pixdim=(float("inf"),) * len(pixdim) if max_pixdim is None else max_pixdim,
        ),
        CastToTyped(masks, dtype=torch.uint8),  # Spacingd returns float32 even where it resamples nothing
        DivisiblePadd(keys, k=divisor),
    ]
    if device is not None:
        transforms.append(EnsureTyped(keys, device=device, track_meta=True))
    if "target_proximity" in derived:
        transforms.append(TargetProximityd("structures", dtype=derived_dtype))
    if "beam_prior" in derived:
        transforms.append(BeamPriord(["structures", "possible_dose_mask"], dtype=derived_dtype))
    return Compose(transforms)


def input_assembly(input_set: str = "reference") -> Compose:
    """The network input ``image`` (:class:`~monai_dose.transforms.DoseInputd`: the channels of each slice) from
    the volumes :func:`patient_preprocessing` gives. A 2.5D network takes the neighbour slices from it itself
    (:class:`~monai_dose.networks.AxialSliceNetwork`)."""
    return Compose(
        [DoseInputd(["ct", "structures", "possible_dose_mask", *derived_inputs(input_set)], input_set=input_set)]
    )


def dose_postprocessing(preprocessing: Compose, output_dir: str | os.PathLike | None = None) -> Compose:
    """The prediction ``pred`` (``(1, H, W, D)`` on the network's grid) on the input grid: the geometry of
    ``preprocessing`` inverted (``Invertd``, linear), then the masked dose with the possible-dose mask as given
    (:class:`~monai_dose.transforms.MaskDosed`: >= 0, zero outside it), and, with an ``output_dir``, written to
    ``output_dir/<id>/dose.nii.gz`` (:class:`~monai_dose.transforms.SaveDosed`)."""
    transforms = [
        EnsureTyped("pred", track_meta=True),  # a MetaTensor, to which Invertd gives the geometry of the mask
        Invertd("pred", transform=preprocessing, orig_keys="possible_dose_mask", nearest_interp=False),
        MaskDosed("pred", mask_key=INPUT_MASK),
    ]
    if output_dir is not None:
        transforms.append(SaveDosed("pred", output_dir=output_dir))
    return Compose(transforms)
