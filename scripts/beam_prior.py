"""Evidence and figure of ``docs/beam_prior.md``: which side gantry 0 enters from, and the beam prior of one
patient next to its reference dose.

Usage::

    python scripts/beam_prior.py orientation --data DATA [--num_patients 25]
    python scripts/beam_prior.py figure --data DATA [--patient pt_201] [--slice K] [--out docs/figures/beam_prior.png]
    python scripts/beam_prior.py timing --data DATA [--num_patients 20]

``orientation`` prints a markdown table: per training patient, the Pearson and Spearman correlation of the
prior with the reference dose outside the targets inside the possible-dose mask (slices with a target), for
gantry 0 entering from the anterior (angles 0, 40, ..., 320) and from the posterior (20, 60, ..., 340).
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from matplotlib.figure import Figure
from monai.transforms import LoadImaged
from scipy.stats import pearsonr, spearmanr

from monai_dose.data.openkbp import DOSE_KEY, IMAGE_KEYS, STRUCTURES, TARGET_DOSES_GY, TARGETS, load_openkbp_datalist
from monai_dose.transforms import BEAM_ANGLES_DEG, BeamPrior, TargetProximity

CONVENTIONS: dict[str, tuple[float, ...]] = {
    "anterior": tuple(range(0, 360, 40)),
    "posterior": tuple(range(20, 360, 40)),
}
"""Gantry angle sets of the two hypotheses on the side gantry 0 enters from."""
CT_HU_OFFSET = 1024.0


def _load(item: dict) -> dict:
    return LoadImaged([*IMAGE_KEYS, DOSE_KEY], image_only=True, ensure_channel_first=True)(item)


def _outside_targets(patient: dict) -> torch.Tensor:
    """Voxels in the possible-dose mask, outside every target, on slices with a target."""
    structures = patient["structures"].as_tensor() > 0
    targets = structures[[STRUCTURES.index(t) for t in TARGETS]].any(0)
    target_slices = targets.flatten(0, 1).any(0)
    return (patient["possible_dose_mask"][0].as_tensor() > 0) & ~targets & target_slices


def orientation(data: Path, num_patients: int) -> str:
    """The markdown table of the orientation evidence on the first ``num_patients`` training patients, with the
    prescription-weighted target proximity (:class:`TargetProximity`, the highest of ``dose / 70 Gy * proximity``)
    as a baseline."""
    priors = {name: BeamPrior(angles) for name, angles in CONVENTIONS.items()}
    weights = torch.tensor([TARGET_DOSES_GY[t] for t in TARGETS])[:, None, None, None] / max(TARGET_DOSES_GY.values())
    stats = {"Pearson": pearsonr, "Spearman": spearmanr}
    columns: dict[str, list[float]] = {}
    ids, sizes = [], []
    for item in load_openkbp_datalist(data, "training")[:num_patients]:
        patient = _load(item)
        voxels = _outside_targets(patient)
        dose = patient[DOSE_KEY][0].as_tensor()[voxels].numpy()
        values = {
            name: prior(patient["structures"], patient["possible_dose_mask"])[0] for name, prior in priors.items()
        }
        values["proximity"] = (TargetProximity()(patient["structures"]) * weights).amax(0)
        for name, value in values.items():
            for stat, fn in stats.items():
                columns.setdefault(f"{name} {stat}", []).append(float(fn(value[voxels].numpy(), dose)[0]))
        ids.append(item["id"])
        sizes.append(int(voxels.sum()))
    table = {k: np.array(v) for k, v in columns.items()}
    for stat in stats:
        table[f"anterior - posterior {stat}"] = table[f"anterior {stat}"] - table[f"posterior {stat}"]
    lines = [
        "| patient | voxels | " + " | ".join(table) + " |",
        "| --- | ---: |" + " ---: |" * len(table),
        *(
            f"| {i} | {n} | " + " | ".join(f"{v[row]:.3f}" for v in table.values()) + " |"
            for row, (i, n) in enumerate(zip(ids, sizes, strict=True))
        ),
        "| mean | | " + " | ".join(f"{np.mean(v):.3f}" for v in table.values()) + " |",
        "| sd | | " + " | ".join(f"{np.std(v, ddof=1):.3f}" for v in table.values()) + " |",
    ]
    wins = {stat: int(np.sum(table[f"anterior - posterior {stat}"] > 0)) for stat in stats}
    lines.append("\nanterior better than posterior in " + ", ".join(f"{n} / {len(ids)} ({s})" for s, n in wins.items()))
    return "\n".join(lines)


def figure(data: Path, patient_id: str, out: Path, slice_index: int | None = None) -> None:
    """An axial slice of validation patient ``patient_id``: CT with the target contours, the first beam's channel
    and the beam prior (:data:`BEAM_ANGLES_DEG`), and the reference dose. By default the slice is the one with
    the median fraction of the body covered by targets, among the slices with a target."""
    items = [i for i in load_openkbp_datalist(data, "validation") if i["id"] == patient_id]
    if not items:
        raise ValueError(f"{patient_id}: not a validation patient of {data}")
    patient = _load(items[0])
    structures = patient["structures"].as_tensor().numpy() > 0
    beams = BeamPrior(per_beam=True)(patient["structures"], patient["possible_dose_mask"]).numpy()
    body = patient["possible_dose_mask"][0].as_tensor().numpy() > 0
    if slice_index is None:
        target_area = structures[[STRUCTURES.index(t) for t in TARGETS]].any(0).sum((0, 1))
        candidates = np.nonzero(target_area)[0]
        fraction = target_area[candidates] / body.sum((0, 1))[candidates]
        slice_index = int(candidates[np.argsort(fraction)[len(candidates) // 2]])
    k = slice_index
    rows, cols = np.nonzero(body[..., k])
    crop = (slice(max(rows.min() - 4, 0), rows.max() + 5), slice(max(cols.min() - 4, 0), cols.max() + 5))
    s0, s1 = (float(v) for v in patient["ct"].pixdim[:2])
    ct = patient["ct"][0].as_tensor().numpy()[..., k][crop] - CT_HU_OFFSET
    extent = (0, ct.shape[1] * s1, ct.shape[0] * s0, 0)  # mm, axis 0 down, axis 1 to the right
    centres = np.meshgrid((np.arange(ct.shape[1]) + 0.5) * s1, (np.arange(ct.shape[0]) + 0.5) * s0)
    panels = {
        f"beam at gantry {BEAM_ANGLES_DEG[0]:g} deg": beams[0, ..., k][crop],
        "beam prior (mean of the 9 beams)": beams[..., k].mean(0)[crop],
        "reference dose (Gy)": patient[DOSE_KEY][0].as_tensor().numpy()[..., k][crop],
    }
    fig = Figure(figsize=(16, 3.3), layout="constrained")
    axes = fig.subplots(1, 1 + len(panels))
    axes[0].imshow(ct, cmap="gray", vmin=-400, vmax=600, extent=extent)
    for name, colour in zip(TARGETS, ("tab:cyan", "tab:orange", "tab:red"), strict=True):
        mask = structures[STRUCTURES.index(name)][..., k][crop]
        if mask.any():
            axes[0].contour(*centres, mask, levels=[0.5], colors=colour, linewidths=1)
            axes[0].plot([], [], color=colour, label=name)
    axes[0].legend(loc="lower right", fontsize=8)
    axes[0].set_title(f"{patient_id}, slice {k}: CT and targets")
    for ax, (title, values) in zip(axes[1:], panels.items(), strict=True):
        fig.colorbar(ax.imshow(values, cmap="jet", vmin=0, extent=extent), ax=ax, shrink=0.8)
        ax.set_title(title)
    for ax in axes:
        ax.set_xlabel("patient right -> left (mm)")
        ax.set_ylabel("anterior -> posterior (mm)")
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)


def timing(data: Path, num_patients: int, repeats: int = 3) -> str:
    """Seconds per patient of :class:`BeamPrior` on the first ``num_patients`` validation patients, wall-clock
    and CPU time of this process (the best of ``repeats`` calls each; loading excluded), with torch's current
    thread count."""
    prior = BeamPrior()
    seconds: dict[str, list[float]] = {"wall": [], "CPU": []}
    for item in load_openkbp_datalist(data, "validation")[:num_patients]:
        patient = LoadImaged(["structures", "possible_dose_mask"], image_only=True, ensure_channel_first=True)(item)
        calls = []
        for _ in range(repeats):
            wall, cpu = time.perf_counter(), time.process_time()
            prior(patient["structures"], patient["possible_dose_mask"])
            calls.append((time.perf_counter() - wall, time.process_time() - cpu))
        for clock, best in zip(seconds, np.min(calls, 0), strict=True):
            seconds[clock].append(float(best))
    return (
        f"BeamPrior, {len(seconds['wall'])} patients, {torch.get_num_threads()} threads, s per patient: "
        + "; ".join(
            f"{clock} median {np.median(v):.3f}, mean {np.mean(v):.3f}, max {np.max(v):.3f}"
            for clock, v in seconds.items()
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    orient = commands.add_parser("orientation", help="print the orientation evidence table")
    orient.add_argument("--data", type=Path, required=True, help="the OpenKBP NIfTI folder")
    orient.add_argument("--num_patients", type=int, default=25, help="first training patients to use")
    fig = commands.add_parser("figure", help="write the figure of the prior next to the reference dose")
    fig.add_argument("--data", type=Path, required=True, help="the OpenKBP NIfTI folder")
    fig.add_argument("--patient", default="pt_201", help="validation patient")
    fig.add_argument("--slice", type=int, default=None, help="axial slice (default: see figure())")
    fig.add_argument("--out", type=Path, default=Path("docs/figures/beam_prior.png"))
    times = commands.add_parser("timing", help="print the seconds per patient of BeamPrior")
    times.add_argument("--data", type=Path, required=True, help="the OpenKBP NIfTI folder")
    times.add_argument("--num_patients", type=int, default=20, help="first validation patients to use")
    args = parser.parse_args(argv)
    if args.command == "orientation":
        print(orientation(args.data, args.num_patients))
    elif args.command == "timing":
        print(timing(args.data, args.num_patients))
    else:
        figure(args.data, args.patient, args.out, args.slice)
    return 0


if __name__ == "__main__":
    sys.exit(main())
