"""How a bundle's 2D network depends on the input's field of view, and where the OpenKBP grids place the patient.

Usage::

    python scripts/field_of_view.py --data ../shared/data/openkbp --patients 8 --size 192

prints (markdown):

1. where the in-plane bounding box of the possible-dose mask is centred in the OpenKBP grids (training and
   validation patients), against the grid's centre: the convention the bundle's ``frame`` follows;
2. the dose score of the first ``--patients`` validation patients (the bundle's weights, without test-time
   augmentation unless ``--tta``) on their own 128 x 128 grid and embedded in a ``--size`` x ``--size`` field of
   view (air around them) at its centre and at each of its edges, with the network run on the whole grid
   (``frame`` null) and in the bundle's frame.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import nibabel as nib
import numpy as np

from monai_dose.data.openkbp import IMAGE_KEYS, load_openkbp_datalist
from monai_dose.inference import DosePredictor
from monai_dose.metrics.openkbp import dose_error


def _load(item: dict) -> tuple[dict[str, np.ndarray], tuple[float, ...]]:
    arrays = {key: np.asanyarray(nib.load(item[key]).dataobj) for key in (*IMAGE_KEYS, "dose")}
    return arrays, tuple(float(z) for z in nib.load(item["ct"]).header.get_zooms()[:3])


def mask_centres(dataset_dir: Path) -> str:
    """Table of the mask's in-plane bounding-box centre over the training and validation patients."""
    centres = []
    for split in ("training", "validation"):
        for item in load_openkbp_datalist(dataset_dir, split):
            mask = np.asanyarray(nib.load(item["possible_dose_mask"]).dataobj) > 0
            grid = np.asarray(mask.shape[:2]) / 2
            box = [np.flatnonzero(mask.any(axis=(1 - axis, 2))) for axis in (0, 1)]
            centres.append([(b[0] + b[-1] + 1) / 2 - g for b, g in zip(box, grid, strict=True)])
    offset = np.asarray(centres)
    rows = ["| axis | mean offset (voxels) | SD | min | max |", "| --- | --- | --- | --- | --- |"]
    for name, column in zip(("anterior-posterior", "right-left"), offset.T, strict=True):
        rows.append(f"| {name} | {column.mean():.2f} | {column.std():.2f} | {column.min():.1f} | {column.max():.1f} |")
    return f"Mask bounding-box centre minus grid centre, {len(offset)} patients:\n\n" + "\n".join(rows)


def placements(size: int, shape: Sequence[int]) -> dict[str, tuple[int, int] | None]:
    """Where the patient's grid starts in the ``size`` x ``size`` field of view (``None``: its own grid)."""
    (rows, columns), mid = shape, ((size - shape[0]) // 2, (size - shape[1]) // 2)
    return {
        "own grid": None,
        "centre": mid,
        "anterior edge": (0, mid[1]),
        "posterior edge": (size - rows, mid[1]),
        "right edge": (mid[0], 0),
        "left edge": (mid[0], size - columns),
    }


def embedded_error(
    predictor: DosePredictor, arrays: dict[str, np.ndarray], spacing: Sequence[float], size: int, start
) -> float:
    """Dose error of ``predictor`` on the patient placed at ``start`` in a ``size`` x ``size`` field of view."""
    inputs = [arrays[key] for key in IMAGE_KEYS]
    height, width = arrays["ct"].shape[:2]
    if start is not None:
        pad = [(start[0], size - height - start[0]), (start[1], size - width - start[1]), (0, 0)]
        inputs = [np.pad(a, pad + [(0, 0)] * (a.ndim - 3)) for a in inputs]  # 0: air, no structure
    dose = predictor(*inputs, voxel_spacing=spacing)
    if start is not None:
        dose = dose[start[0] : start[0] + height, start[1] : start[1] + width]
    return dose_error(dose, arrays["dose"], arrays["possible_dose_mask"] > 0)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="OpenKBP NIfTI dataset (dataset.json)")
    parser.add_argument("--bundle", type=Path, default=Path(__file__).parents[1] / "bundles" / "openkbp_dose")
    parser.add_argument("--patients", type=int, default=8, help="first validation patients scored")
    parser.add_argument("--size", type=int, default=192, help="in-plane size of the larger field of view")
    parser.add_argument("--tta", action="store_true", help="with the flip test-time augmentation")
    args = parser.parse_args(argv)
    print(mask_centres(args.data), "\n")

    whole = DosePredictor.from_bundle(args.bundle, device="cpu", tta=args.tta, frame=None)
    framed = DosePredictor.from_bundle(args.bundle, device="cpu", tta=args.tta)
    errors: dict[str, list[list[float]]] = {}
    for item in load_openkbp_datalist(args.data, "validation")[: args.patients]:
        arrays, spacing = _load(item)
        for name, start in placements(args.size, arrays["ct"].shape[:2]).items():
            errors.setdefault(name, []).append(
                [embedded_error(p, arrays, spacing, args.size, start) for p in (whole, framed)]
            )
    print(
        f"Dose score (Gy) of {args.patients} validation patients in a {args.size} x {args.size} field of view "
        f"({'with' if args.tta else 'without'} TTA):\n"
    )
    print(f"| placement | whole grid (frame null) | frame {framed.network.network.frame} |\n| --- | --- | --- |")
    for name, values in errors.items():
        mean = np.mean(values, axis=0)
        print(f"| {name} | {mean[0]:.3f} | {mean[1]:.3f} |")


if __name__ == "__main__":
    main()
