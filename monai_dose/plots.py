"""PNG plots with matplotlib (Agg): dose-volume histograms (DVH, cumulative curves with numpy), per-patient and
per-DVH-metric errors, and dose slices on the CT."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from monai_dose.data.openkbp import STRUCTURES
from monai_dose.metrics import cumulative_dvh

DVHCurves = Mapping[str, tuple[np.ndarray, np.ndarray]]
"""ROI name -> (dose in Gy, percentage of the ROI volume receiving at least that dose)."""
_LINE_STYLES = ("-", "--", ":", "-.")


def dvh_curves(
    dose: np.ndarray, structures: np.ndarray, names: Sequence[str] = STRUCTURES, bin_width: float = 0.1
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Cumulative DVH of every non-empty ROI.

    Args:
        dose: (H, W, D) dose in Gy.
        structures: (len(names), H, W, D) ROI masks.
        names: ROI name of each ``structures`` channel.
        bin_width: dose step of the curves in Gy.
    """
    dose = np.asarray(dose, dtype=np.float64)
    if np.shape(structures) != (len(names), *dose.shape):
        raise ValueError(f"structures shape {np.shape(structures)} must be ({len(names)}, *{dose.shape})")
    curves = {}
    for name, mask in zip(names, np.asarray(structures, dtype=bool), strict=True):
        roi_dose = dose[mask]
        if roi_dose.size == 0:
            continue
        bins = np.arange(0.0, roi_dose.max() + 2 * bin_width, bin_width)
        curves[name] = (bins, cumulative_dvh(roi_dose, bins))
    return curves


def plot_dvh(dvhs: Mapping[str, DVHCurves], path: str | Path, title: str | None = None) -> None:
    """Plot the DVHs of one or more doses of one patient to a PNG file.

    Args:
        dvhs: label (e.g. ``"reference"``, ``"prediction"``) -> :func:`dvh_curves`; each label gets its own
            line style (solid, dashed, ...), each ROI its own colour.
        path: PNG file to write.
        title: figure title.
    """
    if len(dvhs) > len(_LINE_STYLES):
        raise ValueError(f"at most {len(_LINE_STYLES)} doses per plot, got {len(dvhs)}")
    rois = list(dict.fromkeys(roi for curves in dvhs.values() for roi in curves))
    colours = {roi: f"C{STRUCTURES.index(roi) if roi in STRUCTURES else i}" for i, roi in enumerate(rois)}
    fig = Figure(figsize=(9, 5), layout="constrained")
    ax = fig.add_subplot()
    handles = [Line2D([], [], color=colours[roi], label=roi) for roi in rois]
    for style, (label, curves) in zip(_LINE_STYLES, dvhs.items(), strict=False):
        for roi, (dose, volume) in curves.items():
            ax.plot(dose, volume, linestyle=style, color=colours[roi], linewidth=1.2)
        handles.append(Line2D([], [], color="k", linestyle=style, label=label))
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.set(xlabel="Dose (Gy)", ylabel="Volume (%)", ylim=(0, 101), title=title)
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    fig.savefig(path, format="png", dpi=100)


def plot_patient_errors(
    errors: Mapping[str, float],
    path: str | Path,
    quantity: str = "Dose error",
    unit: str = "Gy",
    title: str | None = None,
) -> None:
    """Bar chart of one error per patient, sorted in increasing order, with a dashed line at the mean.

    Args:
        errors: patient id -> error.
        path: PNG file to write.
        quantity: what the errors are (y-axis label).
        unit: unit of the errors.
        title: figure title.
    """
    if not errors:
        raise ValueError("no patient errors to plot")
    ids, values = zip(*sorted(errors.items(), key=lambda item: item[1]), strict=True)
    mean = float(np.mean(values))
    fig = Figure(figsize=(max(6.0, 0.35 * len(ids) + 2.0), 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(ids, values, color="C0")
    ax.axhline(mean, color="C3", linestyle="--", label=f"mean {mean:.2f} {unit}")
    ax.set(xlabel="Patient", ylabel=f"{quantity} ({unit})", title=title)
    ax.tick_params(axis="x", labelrotation=90)
    ax.legend(frameon=False)
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, format="png", dpi=100)


def plot_metric_errors(errors: Mapping[str, Sequence[float]], path: str | Path, title: str | None = None) -> None:
    """Horizontal box plot of the absolute DVH metric errors over patients, one box per ``ROI/metric``.

    Each box (quartiles, median line, whiskers to 1.5 IQR) also shows the patients' values as points and their
    mean as a diamond; boxes are coloured per ROI as in :func:`plot_dvh`.

    Args:
        errors: ``"ROI/metric"`` -> absolute errors in Gy over patients (NaN where the ROI is absent).
        path: PNG file to write.
        title: figure title.
    """
    values = {key: np.asarray(v, dtype=np.float64) for key, v in errors.items()}
    values = {key: v[np.isfinite(v)] for key, v in values.items() if np.isfinite(v).any()}
    if not values:
        raise ValueError("no DVH metric errors to plot")
    keys = list(values)[::-1]  # first key on top
    rois = [key.split("/", 1)[0] for key in keys]
    colours = [f"C{STRUCTURES.index(roi) if roi in STRUCTURES else 0}" for roi in rois]
    positions = np.arange(len(keys))
    fig = Figure(figsize=(8, 1.5 + 0.3 * len(keys)), layout="constrained")
    ax = fig.add_subplot()
    boxes = ax.boxplot(
        [values[key] for key in keys],
        positions=positions,
        vert=False,
        widths=0.6,
        showfliers=False,
        patch_artist=True,
        medianprops={"color": "k"},
    )
    for box, colour in zip(boxes["boxes"], colours, strict=True):
        box.set(facecolor=colour, alpha=0.35, edgecolor=colour)
    for position, key, colour in zip(positions, keys, colours, strict=True):
        ax.plot(values[key], np.full(values[key].size, position), "o", color=colour, markersize=3)
    ax.plot([values[key].mean() for key in keys], positions, "D", color="k", markersize=4)
    ax.set_yticks(positions, [f"{key.replace('/', ' ')} (n={values[key].size})" for key in keys])
    ax.set(xlabel="|predicted - reference| (Gy)", title=title)
    ax.set_xlim(left=0)
    handles = [
        Line2D([], [], color="0.4", marker="o", linestyle="", markersize=3, label="patient"),
        Line2D([], [], color="k", label="median"),
        Line2D([], [], color="k", marker="D", linestyle="", markersize=4, label="mean"),
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    ax.grid(axis="x", alpha=0.3)
    fig.savefig(path, format="png", dpi=100)


def plot_dose_slice(
    ct: np.ndarray,
    reference: np.ndarray,
    prediction: np.ndarray,
    path: str | Path,
    pixel_spacing: Sequence[float] = (1.0, 1.0),
    contours: Mapping[str, np.ndarray] | None = None,
    ct_window: tuple[float, float] = (-160.0, 240.0),
    min_dose: float | None = None,
    title: str | None = None,
) -> None:
    """Plot one 2D slice: CT, reference and predicted dose on the CT (one colour scale), and their difference.

    Arrays are shown as ``imshow`` shows them (axis 0 down the rows, axis 1 across the columns).

    Args:
        ct: (H, W) CT in Hounsfield units.
        reference: (H, W) reference dose in Gy.
        prediction: (H, W) predicted dose in Gy.
        path: PNG file to write.
        pixel_spacing: pixel size in mm along axis 0 and axis 1.
        contours: ROI name -> (H, W) mask, outlined on every panel.
        ct_window: CT grey scale range in HU (default: soft tissue, W 400 / L 40).
        min_dose: doses below this (Gy) are not coloured; default: 10% of the colour scale's maximum.
        title: figure title.
    """
    if not np.shape(ct) == np.shape(reference) == np.shape(prediction) or np.ndim(ct) != 2:
        raise ValueError(
            f"need three 2D arrays of one shape, got {np.shape(ct)}, {np.shape(reference)}, {np.shape(prediction)}"
        )
    vmax = max(float(np.max(reference)), float(np.max(prediction)), 1.0)
    min_dose = 0.1 * vmax if min_dose is None else min_dose
    difference = np.asarray(prediction, dtype=np.float64) - np.asarray(reference, dtype=np.float64)
    limit = max(float(np.max(np.abs(difference))), 1.0)
    aspect = pixel_spacing[0] / pixel_spacing[1]
    contour_colours = ("white", "magenta", "cyan", "lime", "orange")

    fig = Figure(figsize=(10, 9), layout="constrained")
    axes = fig.subplots(2, 2)
    (ax_ref, ax_pred), (ax_ct, ax_diff) = axes
    for ax in (ax_ref, ax_pred, ax_ct):
        ax.imshow(ct, cmap="gray", vmin=ct_window[0], vmax=ct_window[1], aspect=aspect)
    for ax in axes.flat:
        ax.set(xticks=[], yticks=[])
    for ax, dose, label in ((ax_ref, reference, "Reference dose"), (ax_pred, prediction, "Predicted dose")):
        shown = ax.imshow(
            np.ma.masked_less(dose, min_dose), cmap="turbo", vmin=0.0, vmax=vmax, alpha=0.6, aspect=aspect
        )
        ax.set_title(f"{label} (colour wash ≥ {min_dose:.1f} Gy)")
    fig.colorbar(shown, ax=[ax_ref, ax_pred], label="Dose (Gy)", shrink=0.9)
    ax_ct.set_title(f"CT (window {ct_window[0]:g} to {ct_window[1]:g} HU)")
    diff = ax_diff.imshow(difference, cmap="RdBu_r", vmin=-limit, vmax=limit, aspect=aspect)
    ax_diff.set_title("Predicted - reference dose")
    fig.colorbar(diff, ax=[ax_ct, ax_diff], label="Dose difference (Gy)", shrink=0.9)
    handles = []
    for (name, mask), colour in zip((contours or {}).items(), contour_colours, strict=False):
        if np.any(mask):
            for ax in axes.flat:
                ax.contour(np.asarray(mask, dtype=float), levels=[0.5], colors=colour, linewidths=1.0)
            handles.append(Line2D([], [], color=colour, label=name))
    if handles:
        fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), facecolor="0.85")
    if title:
        fig.suptitle(title)
    fig.savefig(path, format="png", dpi=100)
