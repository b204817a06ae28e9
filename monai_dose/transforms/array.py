"""Array transforms for dose prediction: model input assembly, mask packing, slice sampling and masked-dose
post-processing.

Arrays are channel-first (``C, H, W[, D]``) as in MONAI; OpenKBP volumes are ``128^3`` with axis ``D`` (the last)
the cranio-caudal slice axis.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.config import NdarrayOrTensor
from monai.data import MetaTensor
from monai.networks.layers import AffineTransform
from monai.networks.utils import to_norm_affine
from monai.transforms import Randomizable, Transform
from monai.transforms.utils import distance_transform_edt
from monai.utils import convert_to_numpy, convert_to_tensor, optional_import

from ..data.openkbp import OARS, STRUCTURES, TARGET_DOSES_GY, TARGETS

_, HAS_CUCIM = optional_import("cucim.core.operations.morphology", name="distance_transform_edt")
edt, HAS_EDT = optional_import("edt", name="edt")

CT_RANGE = (0.0, 4095.0)
"""OpenKBP CT values (HU + 1024) are clipped to this range, then scaled to 0..1."""


def scale_ct(ct: torch.Tensor) -> torch.Tensor:
    """OpenKBP CT values clipped to :data:`CT_RANGE` and scaled to 0..1: the CT channel of the network input."""
    return (ct.clamp(*CT_RANGE) - CT_RANGE[0]) / (CT_RANGE[1] - CT_RANGE[0])


PROXIMITY_SET = "target_proximity"
BEAM_SET = "beam_prior"
DERIVED_INPUTS: dict[str, tuple[str, ...]] = {
    "target_proximity": tuple(f"{t}_proximity" for t in TARGETS),
    "beam_prior": ("beam_prior",),
}
"""Inputs computed from the structures (and body) for some input sets: key -> its channel names, in the order
:class:`DoseInput` takes them (:class:`TargetProximity`, :class:`BeamPrior`)."""
INPUT_SETS: dict[str, tuple[str, ...]] = {
    "reference": ("ct", *STRUCTURES, "possible_dose_mask"),
    "merged_targets": ("ct", *OARS, "targets", "possible_dose_mask"),
    PROXIMITY_SET: ("ct", *STRUCTURES, *DERIVED_INPUTS["target_proximity"], "possible_dose_mask"),
    BEAM_SET: ("ct", *STRUCTURES, *DERIVED_INPUTS["target_proximity"], "beam_prior", "possible_dose_mask"),
}
"""Input channel sets: the names of their channels per slice.

- ``reference``: CT, the 10 structures, possible-dose mask (the reference method's 12 channels).
- ``merged_targets``: CT, the 7 OARs, one target channel holding the highest prescription covering each voxel
  divided by 70 Gy, possible-dose mask (10 channels).
- ``target_proximity``: the reference channels and, before the mask, the proximity of each voxel to each target
  in 3D (:class:`TargetProximity`; 15 channels): a slice-wise network then knows how far the targets are even
  where they lie beyond its slices.
- ``beam_prior``: the ``target_proximity`` channels and, before the mask, the prior of the dose the 9 OpenKBP
  fields can deliver (:class:`BeamPrior`; 16 channels).
"""


def derived_inputs(input_set: str) -> list[str]:
    """The keys of :data:`DERIVED_INPUTS` that ``input_set`` takes, in :class:`DoseInput`'s order."""
    names = set(input_channel_names(input_set))
    return [key for key, channels in DERIVED_INPUTS.items() if set(channels) <= names]


def input_channel_names(input_set: str = "reference", neighbours: int = 0) -> list[str]:
    """Names of the network input channels, channel-major: ``"ct[-1]", "ct[0]", "ct[1]", ...`` for 2.5D input."""
    if input_set not in INPUT_SETS:
        raise ValueError(f"unknown input_set '{input_set}', expected one of {sorted(INPUT_SETS)}")
    if neighbours == 0:
        return list(INPUT_SETS[input_set])
    return [f"{name}[{k}]" for name in INPUT_SETS[input_set] for k in range(-neighbours, neighbours + 1)]


def input_channels(input_set: str = "reference", neighbours: int = 0) -> int:
    """Number of network input channels for ``input_set`` with ``neighbours`` slices on each side (2.5D)."""
    return len(input_channel_names(input_set, neighbours))


def mask_channel(input_set: str = "reference", neighbours: int = 0) -> int:
    """Index of the central slice's possible-dose mask among the network input channels."""
    return input_channel_names(input_set, neighbours).index("possible_dose_mask" + ("[0]" if neighbours else ""))


def torch_distance_transform_edt(img: torch.Tensor, sampling: Sequence[float] | None = None) -> torch.Tensor:
    """Exact Euclidean distance transform in torch, on ``img``'s device: per channel of ``(C, *spatial)``, the
    distance of each non-zero voxel to the nearest zero voxel (0 on zero voxels; ``inf`` in a channel without any),
    in the units of ``sampling`` (the voxel size per spatial axis; default 1), as float32.

    The squared distance is the lower envelope of parabolas taken one axis at a time, each as a min-plus product
    with the ``(n, n)`` matrix of squared offsets, in chunks of bounded memory: ``O(n)`` work per voxel and axis,
    for GPUs without cuCIM, where MONAI's ``distance_transform_edt`` would copy to the host for scipy.
    """
    spatial = img.ndim - 1
    sampling = [1.0] * spatial if sampling is None else [float(v) for v in sampling]
    if len(sampling) != spatial:
        raise ValueError(f"sampling needs {spatial} values, got {len(sampling)}")
    squared = torch.where(img != 0, torch.inf, 0.0).to(device=img.device, dtype=torch.float32)
    for axis, step in enumerate(sampling, start=1):
        lines = squared.movedim(axis, -1)
        n = lines.shape[-1]
        offsets = torch.arange(n, device=img.device, dtype=torch.float32)
        parabola = (step * (offsets[:, None] - offsets[None, :])) ** 2  # [i, j]: from voxel j to voxel i
        flat = lines.reshape(-1, n)
        rows = max(1, 2**24 // (n * n))  # 64 MB of float32 per chunk
        out = torch.cat([(chunk[:, None, :] + parabola).amin(-1) for chunk in flat.split(rows)])
        squared = out.reshape(lines.shape).movedim(-1, axis)
    return squared.sqrt()


def _edt(img: torch.Tensor, sampling: Sequence[float]) -> torch.Tensor:
    """The exact Euclidean distance transform of each channel (distance of the non-zero voxels to the nearest zero
    one, in the units of ``sampling``) where ``img`` is: on the CPU the ``edt`` package where installed (the
    ``fast`` extra; multithreaded, about 4x scipy here), else MONAI's ``distance_transform_edt`` (scipy on the
    host, cuCIM on a GPU where installed), else on a GPU :func:`torch_distance_transform_edt`: no host round trip.
    """
    if img.device.type == "cpu" and HAS_EDT:
        volumes = convert_to_numpy(img, dtype=np.uint8)
        threads = torch.get_num_threads()
        return torch.stack([torch.from_numpy(edt(v, anisotropy=tuple(sampling), parallel=threads)) for v in volumes])
    if img.device.type == "cpu" or HAS_CUCIM:
        return convert_to_tensor(distance_transform_edt(img, sampling=list(sampling)), device=img.device)
    return torch_distance_transform_edt(img, sampling)


class TargetProximity(Transform):
    """Proximity of every voxel to each planning target: ``exp(-d / length_mm)`` with ``d`` the 3D Euclidean
    distance in mm to the target (1 inside it, 0 everywhere for a target the patient lacks).

    ``(10, H, W, D)`` structures in :data:`~monai_dose.data.STRUCTURES` order -> ``(3, H, W, D)``, one
    channel per target of :data:`~monai_dose.data.TARGETS`. The exact distance is computed where the structures
    are: on the CPU by the ``edt`` package where installed (the ``fast`` extra), else by scipy; on a GPU by cuCIM
    where installed, else by :func:`torch_distance_transform_edt`.

    Args:
        length_mm: distance at which the proximity falls to ``1/e``.
        dtype: of the output (``torch.float16`` halves the memory of cached volumes).
    """

    def __init__(self, length_mm: float = 50.0, dtype: torch.dtype = torch.float32) -> None:
        self.length_mm = length_mm
        self.dtype = dtype

    def __call__(self, structures: NdarrayOrTensor, voxel_spacing: tuple[float, ...] | None = None) -> torch.Tensor:
        """``voxel_spacing`` in mm; by default that of a ``MetaTensor``'s affine."""
        if voxel_spacing is None:
            if not isinstance(structures, MetaTensor):
                raise ValueError("the voxel spacing is needed for target distances: pass voxel_spacing")
            voxel_spacing = tuple(float(v) for v in structures.pixdim[: structures.ndim - 1])
        if structures.ndim != 4 or structures.shape[0] != len(STRUCTURES):
            raise ValueError(f"expected structures ({len(STRUCTURES)}, H, W, D), got {tuple(structures.shape)}")
        targets = convert_to_tensor(structures, track_meta=False)[[STRUCTURES.index(t) for t in TARGETS]] > 0
        distance = _edt(~targets, voxel_spacing)  # on the structures' device
        present = targets.flatten(1).any(1)[:, None, None, None]
        return (torch.exp(-distance / self.length_mm) * present).to(self.dtype)


BEAM_ANGLES_DEG: tuple[float, ...] = tuple(float(a) for a in range(0, 360, 40))
"""Gantry angles of the 9 coplanar OpenKBP fields, in degrees: 0 enters from the anterior, 90 from the patient's
left (IEC 61217, head first supine). Chosen over the set 20, 60, ..., 340 (0 from the posterior) by the
reference doses: see ``docs/beam_prior.md``."""


class BeamPrior(Transform):
    """Physics prior of the dose that coplanar beams can deliver: per voxel, the mean over the beams of the beam's
    target aperture attenuated by the depth travelled inside the body, ``aperture * exp(-mu * depth)``.

    Each beam runs inside an axial slice (gantry about the last axis ``D``, divergence and scatter ignored). The
    aperture of a ray is the highest prescription (divided by 70 Gy) of the targets it crosses; the depth is the
    path length in mm inside the body from the beam's entrance. Slices are resampled (in mm, so anisotropic
    voxels are handled) onto beam-aligned grids with ``grid_sample``, integrated along the beam with cumulative
    sums and resampled back, all slices and beams in one call each, on the input's device. Slices without a
    target get 0.

    ``(10, H, W, D)`` structures in :data:`~monai_dose.data.STRUCTURES` order and a ``(1, H, W, D)`` body
    (possible-dose mask, or CT: body where ``> body_threshold``) -> ``(1, H, W, D)``, or one channel per beam.

    Args:
        angles: gantry angles in degrees (see :data:`BEAM_ANGLES_DEG`).
        mu_per_mm: linear attenuation coefficient (water, 6 MV: about 0.005 / mm).
        per_beam: return one channel per beam instead of their mean.
        body_threshold: the body is where the body input exceeds it.
        dtype: of the output.
    """

    def __init__(
        self,
        angles: Sequence[float] = BEAM_ANGLES_DEG,
        mu_per_mm: float = 0.005,
        per_beam: bool = False,
        body_threshold: float = 0.0,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.angles = tuple(float(a) for a in angles)
        self.mu_per_mm = mu_per_mm
        self.per_beam = per_beam
        self.body_threshold = body_threshold
        self.dtype = dtype

    def _grids(
        self, size: tuple[int, int], spacing: tuple[float, float], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, float]:
        """``grid_sample`` grids from the slice to the beam-aligned square grids (beams stacked along the first
        axis, which runs along the beam) and back, and the beam grid's step in mm."""
        half = [(n - 1) / 2 * s for n, s in zip(size, spacing, strict=True)]  # mm from the centre to the edge
        radius = float(np.hypot(*half))
        n = int(np.ceil(2 * radius / min(spacing))) + 1
        theta = torch.deg2rad(torch.tensor(self.angles, dtype=torch.float64))
        cos, sin = torch.cos(theta), torch.sin(theta)
        # beam direction d = (cos, -sin) and across it p = (sin, cos), in (axis 0, axis 1) mm
        d, p = torch.stack([cos, -sin], -1), torch.stack([sin, cos], -1)
        zero = torch.zeros_like(cos)
        # affine_grid's (x, y) are (across, along) the beam in the beam grid, (axis 1, axis 0) in the slice
        to_slice = torch.stack(
            [
                torch.stack([p[:, 1] * radius / half[1], d[:, 1] * radius / half[1], zero], -1),
                torch.stack([p[:, 0] * radius / half[0], d[:, 0] * radius / half[0], zero], -1),
            ],
            1,
        )
        to_beam = torch.stack(
            [
                torch.stack([p[:, 1] * half[1] / radius, p[:, 0] * half[0] / radius, zero], -1),
                torch.stack([d[:, 1] * half[1] / radius, d[:, 0] * half[0] / radius, zero], -1),
            ],
            1,
        )
        beams = len(self.angles)
        forward = F.affine_grid(to_slice.float(), [beams, 1, n, n], align_corners=True)
        back = F.affine_grid(to_beam.float(), [beams, 1, *size], align_corners=True)
        return forward.flatten(0, 1)[None].to(device), back.to(device), 2 * radius / (n - 1)

    def __call__(
        self, structures: NdarrayOrTensor, body: NdarrayOrTensor, voxel_spacing: Sequence[float] | None = None
    ) -> torch.Tensor:
        """``voxel_spacing`` in mm (axes 0 and 1 are used); by default that of a ``MetaTensor``'s affine."""
        if voxel_spacing is None:
            if not isinstance(structures, MetaTensor):
                raise ValueError("the voxel spacing is needed for depths in mm: pass voxel_spacing")
            voxel_spacing = tuple(float(v) for v in structures.pixdim[:2])
        if structures.ndim != 4 or structures.shape[0] != len(STRUCTURES):
            raise ValueError(f"expected structures ({len(STRUCTURES)}, H, W, D), got {tuple(structures.shape)}")
        if tuple(body.shape) != (1, *structures.shape[1:]):
            raise ValueError(
                f"expected a body (1, {', '.join(map(str, structures.shape[1:]))}), got {tuple(body.shape)}"
            )
        struct_t = convert_to_tensor(structures, track_meta=False)
        device, beams = struct_t.device, len(self.angles)
        out = torch.zeros(beams if self.per_beam else 1, *struct_t.shape[1:], dtype=self.dtype, device=device)
        targets = struct_t[[STRUCTURES.index(t) for t in TARGETS]] > 0
        slices = targets.flatten(1, 2).any(1).any(0).nonzero()[:, 0]
        body_k = convert_to_tensor(body, track_meta=False, device=device)[0, ..., slices] > self.body_threshold
        footprint = body_k.any(-1)  # the in-plane bounding box of the body: the prior is 0 outside it
        if not footprint.any():
            return out
        (lo0, hi0), (lo1, hi1) = _extent(footprint.any(1)), _extent(footprint.any(0))
        box = (slice(None), slice(lo0, hi0 + 1), slice(lo1, hi1 + 1), slices)  # channels, box, slices
        k, body_k = len(slices), body_k[box[1:3]].movedim(-1, 0).float()  # (K, h, w)
        doses = torch.tensor([TARGET_DOSES_GY[t] for t in TARGETS], device=device) / max(TARGET_DOSES_GY.values())
        weights = (targets[box] * doses[:, None, None, None]).amax(0)  # the highest prescription
        planes = torch.cat([weights.movedim(-1, 0), body_k])[None]  # (1, 2K, h, w)
        forward, back, step = self._grids(tuple(body_k.shape[1:]), tuple(float(s) for s in voxel_spacing[:2]), device)
        beam_eye = F.grid_sample(planes, forward, align_corners=True)[0].unflatten(1, (beams, -1))  # (2K, B, N, N)
        aperture = beam_eye[:k].amax(2, keepdim=True)
        inside = beam_eye[k:]
        depth = (inside.cumsum(2) - inside / 2) * step
        fluence = aperture * torch.exp(-self.mu_per_mm * depth)  # (K, B, N, N)
        prior = F.grid_sample(fluence.movedim(1, 0), back, align_corners=True) * body_k  # (B, K, h, w)
        if not self.per_beam:
            prior = prior.mean(0, keepdim=True)
        out[box] = prior.movedim(1, -1).to(self.dtype)
        return out


def _extent(profile: torch.Tensor) -> tuple[int, int]:
    """First and last index where ``profile`` is non-zero."""
    index = profile.nonzero()[:, 0]
    return int(index[0]), int(index[-1])


class DoseInput(Transform):
    """Assemble the network input from CT, structure masks, the derived inputs of the input set (target proximity,
    beam prior: :func:`derived_inputs`) and possible-dose mask.

    The CT is clipped to 0..4095 and scaled to 0..1; masks become float {0, 1}. For 2.5D input (``S`` stacked
    slices per channel, see :class:`RandSliceSample`) the CT has ``S`` channels, the structures ``10 * S``, the
    proximity ``3 * S``, the beam prior ``S`` and the mask ``S``; the output then has
    ``input_channels(input_set) * S`` channels in the same channel-major order.

    Args:
        input_set: a key of :data:`INPUT_SETS`.
        channel_dim: the channel dimension (1 for a batch ``(B, C, ...)``).
        dtype: of the output. ``torch.bfloat16`` for a network under bf16 autocast gives the same values the
            autocast would (the CT is scaled in float32, then rounded) at half the memory traffic.
    """

    def __init__(self, input_set: str = "reference", channel_dim: int = 0, dtype: torch.dtype = torch.float32) -> None:
        self.derived = derived_inputs(input_set)
        self.input_set = input_set
        self.channel_dim = channel_dim
        self.dtype = dtype

    def __call__(
        self,
        ct: NdarrayOrTensor,
        structures: NdarrayOrTensor,
        possible_dose_mask: NdarrayOrTensor,
        *derived: NdarrayOrTensor,
    ) -> torch.Tensor:
        """``derived``: the derived inputs of the input set, in :func:`derived_inputs` order."""
        dim = self.channel_dim
        ct_t = convert_to_tensor(ct, track_meta=False, dtype=torch.float32)
        struct_t = convert_to_tensor(structures, track_meta=False, dtype=self.dtype)
        mask_t = convert_to_tensor(possible_dose_mask, track_meta=False, dtype=self.dtype)
        stack = ct_t.shape[dim]
        if struct_t.shape[dim] != len(STRUCTURES) * stack:
            raise ValueError(f"expected {len(STRUCTURES)} structure channels, got {struct_t.shape[dim] // stack}")
        if len(derived) != len(self.derived):
            raise ValueError(f"input set '{self.input_set}' needs {self.derived or 'no derived inputs'}")
        extra = [convert_to_tensor(t, track_meta=False, dtype=self.dtype) for t in derived]
        for key, tensor in zip(self.derived, extra, strict=True):
            if tensor.shape[dim] != len(DERIVED_INPUTS[key]) * stack:
                expected = len(DERIVED_INPUTS[key])
                raise ValueError(f"expected {expected} {key} channels, got {tensor.shape[dim] // stack}")
        grids = [tuple(t.shape[:dim] + t.shape[dim + 1 :]) for t in (ct_t, struct_t, mask_t, *extra)]
        if len(set(grids)) > 1:
            names = ["CT", "structures", "possible-dose mask", *self.derived]
            raise ValueError(
                ", ".join(f"{n} {g[dim:]}" for n, g in zip(names, grids, strict=True)) + ": not on the same grid"
            )
        ct_t = scale_ct(ct_t).to(self.dtype)
        if self.input_set == "merged_targets":
            struct_t = struct_t.unflatten(dim, (len(STRUCTURES), stack))
            n_oars = len(OARS)
            doses = torch.tensor(list(TARGET_DOSES_GY.values()), device=struct_t.device) / max(TARGET_DOSES_GY.values())
            doses = doses.to(self.dtype).reshape(-1, *([1] * (struct_t.ndim - dim - 1)))
            targets = (struct_t.narrow(dim, n_oars, len(doses)) * doses).amax(dim, keepdim=True)
            struct_t = torch.cat([struct_t.narrow(dim, 0, n_oars), targets], dim).flatten(dim, dim + 1)
        return torch.cat([ct_t, struct_t, *extra, mask_t], dim)


class PackMasks(Transform):
    """Pack binary mask channels into one integer channel: bit ``c`` holds channel ``c`` (non-zero voxels).

    ``(C, *spatial) -> (1, *spatial)``, int16 for up to 15 masks, int32 up to 31. The training pipeline slices,
    resamples (nearest neighbour keeps the bits exact) and moves one packed channel instead of ``C`` masks;
    :class:`UnpackMasks` restores them.
    """

    def __call__(self, masks: NdarrayOrTensor) -> torch.Tensor:
        m = convert_to_tensor(masks, track_meta=False)
        if m.shape[0] > 31:
            raise ValueError(f"at most 31 masks can be packed into one channel, got {m.shape[0]}")
        packed = torch.zeros(1, *m.shape[1:], dtype=torch.int32, device=m.device)
        for bit, channel in enumerate(m):
            packed |= (channel > 0).to(torch.int32) << bit
        return packed.to(torch.int16 if m.shape[0] <= 15 else torch.int32)


class UnpackMasks(Transform):
    """Inverse of :class:`PackMasks`: ``(S, *spatial)`` packed channels -> ``(num_masks * S, *spatial)`` float
    {0, 1}, mask-major (channel ``c * S + s`` is mask ``c`` of packed channel ``s``), the channel order that
    :class:`DoseInput` expects of a 2.5D stack of ``S`` slices.

    Args:
        num_masks: masks packed in each channel.
        channel_dim: the channel dimension (1 for a batch ``(B, S, ...)``).
        dtype: of the output masks.
    """

    def __init__(
        self, num_masks: int = len(STRUCTURES), channel_dim: int = 0, dtype: torch.dtype = torch.float32
    ) -> None:
        self.num_masks = num_masks
        self.channel_dim = channel_dim
        self.dtype = dtype

    def __call__(self, packed: NdarrayOrTensor) -> torch.Tensor:
        p = convert_to_tensor(packed, track_meta=False)
        int_type = torch.int16 if self.num_masks <= 15 else torch.int32  # the narrowest is the fastest
        bits = (p.round() if p.is_floating_point() else p).to(int_type)
        dim = self.channel_dim
        masks = torch.empty(*bits.shape[:dim], self.num_masks, *bits.shape[dim:], dtype=self.dtype, device=p.device)
        for bit in range(self.num_masks):  # written in place: no per-mask tensors to stack
            masks.select(dim, bit).copy_((bits >> bit) & 1)
        return masks.flatten(dim, dim + 1)


def _with_neighbours(volume: torch.Tensor, indices: torch.Tensor, neighbours: int) -> torch.Tensor:
    """Slices ``indices`` of ``volume`` (C, H, W, D) with ``neighbours`` slices each side as channels.

    Returns ``(C * (2n + 1), H, W, len(indices))``, channel ``c * (2n + 1) + n + offset``; edges are replicated.
    """
    offsets = torch.arange(-neighbours, neighbours + 1, device=volume.device)
    idx = (indices.to(volume.device)[:, None] + offsets).clamp(0, volume.shape[-1] - 1)  # (K, 2n+1)
    # (D * C, H, W) rows, a view of a slice-major volume (SliceMajor), else a copy
    rows = volume.movedim(-1, 0).contiguous().flatten(0, 1)
    channels = torch.arange(volume.shape[0], device=volume.device)
    rows_wanted = idx[:, None, :] * volume.shape[0] + channels[None, :, None]  # (K, C, 2n+1)
    stacks = rows.index_select(0, rows_wanted.flatten())  # whole slices, in the output's channel order
    return stacks.unflatten(0, (len(idx), -1)).movedim(0, -1)


class SliceNeighbours(Transform):
    """Stack ``neighbours`` slices on each side of every slice as extra channels (2.5D input of a volume).

    ``(C, H, W, D) -> (C * (2n + 1), H, W, D)`` with the same channel order as :class:`RandSliceSample`: the input
    a 2.5D network trains on, which :class:`~monai_dose.networks.AxialSliceNetwork` gives it from the volume without
    building this copy.
    """

    def __init__(self, neighbours: int = 1) -> None:
        self.neighbours = neighbours

    def __call__(self, volume: NdarrayOrTensor) -> torch.Tensor:
        vol = convert_to_tensor(volume, track_meta=False)
        return _with_neighbours(vol, torch.arange(vol.shape[-1]), self.neighbours)


class SliceMajor(Transform):
    """Store a volume ``(C, H, W, D)`` with each axial slice (last axis) contiguous in memory.

    Shape and values are unchanged; only the memory layout is (strides ``(H*W, W, 1, C*H*W)``), so that
    :class:`RandSliceSample` reads whole slices instead of one voxel per slice from every cache line. Apply it to
    cached volumes (e.g. before a ``CacheDataset`` caches them).
    """

    def __call__(self, volume: NdarrayOrTensor) -> torch.Tensor:
        return convert_to_tensor(volume, track_meta=False).movedim(-1, 0).contiguous().movedim(0, -1)


class RandSliceSample(Randomizable, Transform):
    """Draw axial slices (last axis) where a mask is non-empty, for 2D or 2.5D training.

    Args:
        num_samples: slices drawn per call.
        neighbours: slices added on each side as channels (0 for 2D).
    """

    def __init__(self, num_samples: int = 8, neighbours: int = 0) -> None:
        self.num_samples = num_samples
        self.neighbours = neighbours
        self._indices = torch.zeros(0, dtype=torch.long)

    def randomize(self, mask: NdarrayOrTensor) -> None:
        mask_t = convert_to_tensor(mask, track_meta=False)
        candidates = torch.nonzero(mask_t.any(dim=tuple(range(mask_t.ndim - 1)))).flatten()
        if len(candidates) == 0:
            raise ValueError("the possible-dose mask is empty: no slice to sample")
        self._indices = candidates[torch.from_numpy(self.R.randint(0, len(candidates), self.num_samples))]

    def __call__(self, volume: NdarrayOrTensor, mask: NdarrayOrTensor | None = None) -> list[torch.Tensor]:
        """Slices of ``volume``, re-drawn from ``mask`` when it is given (else the last draw is reused)."""
        if mask is not None:
            self.randomize(mask)
        vol = convert_to_tensor(volume, track_meta=False)
        stack = _with_neighbours(vol, self._indices, self.neighbours)
        return list(stack.unbind(-1))


class BatchRandAffine(Randomizable, Transform):
    """Random in-plane affine (rotation, scale, shift) and flip of a batch ``(B, C, H, W[, D])``, drawn per sample
    and applied on the batch's device by MONAI's ``AffineTransform`` (one call for the whole batch).

    The draws follow ``RandAffine(prob, rotate_range, scale_range, translate_range)`` then
    ``RandFlip(flip_prob, spatial_axis=flip_axis)``, in the plane of the first two spatial axes (about the slice
    axis ``D`` of a volume). Call :meth:`randomize` once and then with ``randomize=False`` to move several
    arrays of one batch alike.

    Args:
        prob: probability of the affine, per sample.
        rotate_range: rotation angle drawn from ``(-rotate_range, rotate_range)`` radians.
        scale_range: scale factor ``1 + (-scale_range, scale_range)``, per in-plane axis.
        translate_range: shift in voxels drawn from ``(-translate_range, translate_range)``, per in-plane axis.
        flip_prob: probability of the flip, per sample.
        flip_axis: spatial axis flipped (1: ``W``, left-right in OpenKBP volumes).
    """

    def __init__(
        self,
        prob: float = 0.5,
        rotate_range: float = 0.2,
        scale_range: float = 0.1,
        translate_range: float = 8.0,
        flip_prob: float = 0.5,
        flip_axis: int = 1,
    ) -> None:
        self.prob, self.flip_prob, self.flip_axis = prob, flip_prob, flip_axis
        self.rotate_range, self.scale_range, self.translate_range = rotate_range, scale_range, translate_range
        self._theta = torch.eye(3)[None]
        self._affine = self._flip = torch.zeros(1, dtype=torch.bool)
        self._on_device: tuple = ()

    def randomize(self, batch_size: int, spatial_dims: int = 2) -> None:
        """Draw one affine matrix (voxel units, centred on the image) per sample."""
        n = batch_size
        apply = (self.R.random(n) < self.prob).astype(float)
        angle = self.R.uniform(-self.rotate_range, self.rotate_range, n) * apply
        scale = 1 + self.R.uniform(-self.scale_range, self.scale_range, (n, 2)) * apply[:, None]
        shift = self.R.uniform(-self.translate_range, self.translate_range, (n, 2)) * apply[:, None]
        flip = np.where(self.R.random(n) < self.flip_prob, -1.0, 1.0)
        theta = np.tile(np.eye(spatial_dims + 1), (n, 1, 1))
        cos, sin = np.cos(angle), np.sin(angle)
        theta[:, 0, :2] = np.stack([cos * scale[:, 0], -sin * scale[:, 1]], -1)
        theta[:, 1, :2] = np.stack([sin * scale[:, 0], cos * scale[:, 1]], -1)
        theta[:, :2, -1] = shift
        theta[:, :, self.flip_axis] *= flip[:, None]
        self._theta = torch.as_tensor(theta, dtype=torch.float32)
        self._affine = torch.as_tensor(apply > 0)
        self._flip = torch.as_tensor(flip < 0)
        self._on_device = ()

    def _draw_on(self, batch: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Indices of the affine and flip-only samples, and the affine matrices in the normalised grid coordinates
        of ``AffineTransform(normalized=True, reverse_indexing=False)``, on ``batch``'s device; once per draw.

        All of it is computed on the host and copied through pinned memory without blocking, so that on a GPU the
        host never waits for the device (MONAI's ``AffineTransform`` builds the normalisation on the device,
        with several synchronising steps per call).
        """
        key = (batch.device, tuple(batch.shape[2:]))
        if not self._on_device or self._on_device[0] != key:
            size = key[1]
            affine = self._affine.nonzero()[:, 0]
            theta = to_norm_affine(self._theta[affine], size, size, align_corners=True, zero_centered=True)
            reverse = list(range(len(size) - 1, -1, -1))  # grid_sample's (x, y[, z]) order
            theta[:, : len(size)] = theta[:, reverse]
            theta[:, :, : len(size)] = theta[:, :, reverse]
            host = (affine, (self._flip & ~self._affine).nonzero()[:, 0], theta)
            if batch.device.type == "cuda":
                host = tuple(t.pin_memory() for t in host)
            self._on_device = (key, *(t.to(batch.device, non_blocking=True) for t in host))
        return self._on_device[1:]

    def __call__(self, batch: torch.Tensor, mode: str = "bilinear", randomize: bool = True) -> torch.Tensor:
        """Resample ``batch`` (float) with ``mode`` (``"bilinear"``, or ``"nearest"`` for masks); zeros outside.

        Only the samples drawn for the affine are resampled; the others are flipped (or kept) exactly.
        """
        if randomize:
            self.randomize(batch.shape[0], batch.ndim - 2)
        if self._theta.shape[0] != batch.shape[0]:
            raise ValueError(f"drawn for a batch of {self._theta.shape[0]}, got a batch of {batch.shape[0]}")
        affine, flip_only, theta = self._draw_on(batch)
        moved = batch.clone()
        if len(flip_only):
            moved[flip_only] = batch[flip_only].flip(self.flip_axis + 2)
        if len(affine):
            resample = AffineTransform(normalized=True, reverse_indexing=False, mode=mode, padding_mode="zeros")
            moved[affine] = resample(batch[affine], theta)
        return moved


class MaskDose(Transform):
    """Masked-dose post-processing: clip negative dose to 0 and zero it outside the possible-dose mask.

    A mask with more channels than the dose (a 2.5D slice stack) is read at its central channel.

    Args:
        channel_dim: the channel dimension (1 for a batch ``(B, C, ...)``).
    """

    def __init__(self, channel_dim: int = 0) -> None:
        self.channel_dim = channel_dim

    def __call__(self, dose: NdarrayOrTensor, possible_dose_mask: NdarrayOrTensor) -> NdarrayOrTensor:
        dim = self.channel_dim
        channels = possible_dose_mask.shape[dim]
        if dose.shape[dim] == 1:
            index = (slice(None),) * dim + (slice(channels // 2, channels // 2 + 1),)
            possible_dose_mask = possible_dose_mask[index]
        mask = possible_dose_mask > 0
        if isinstance(dose, np.ndarray):
            return np.clip(dose, 0, None) * np.asarray(mask, dtype=dose.dtype)
        return dose.clamp_min(0) * convert_to_tensor(mask, device=dose.device, dtype=dose.dtype)
