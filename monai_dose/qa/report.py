"""The plan-QA report: figures (matplotlib, embedded as PNG) and self-contained HTML pages."""

from __future__ import annotations

import base64
import html
import io
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from nibabel.orientations import apply_orientation, axcodes2ornt, io_orientation, ornt_transform

from monai_dose.data.openkbp import STRUCTURES, TARGET_DOSES_GY, TARGETS
from monai_dose.plots import plot_dvh

DISCLAIMER = (
    "Research use only. monai_dose is not a medical device: the predicted dose is an estimate by a network trained "
    "on public head-and-neck data (OpenKBP), not a calculated or deliverable plan. Do not base treatment decisions "
    "on this report."
)
DISPLAY_AXES = ("P", "L", "I")
"""Array axes of the figures (as the OpenKBP arrays): anterior -> posterior, right -> left, superior -> inferior."""
ISODOSE_FRACTION = 0.95
_MARGIN_VOXELS = 8
_ISODOSE_COLOURS = {"PTV56": "cyan", "PTV63": "yellow", "PTV70": "white"}
_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1180px; margin: 1em auto; padding: 0 1em; color: #222; }
h1 { font-size: 1.5em; margin-bottom: 0.2em; } h2 { font-size: 1.2em; margin-top: 1.4em; }
.disclaimer { background: #fff3cd; border: 1px solid #e0c36c; padding: 0.5em 0.8em; }
table { border-collapse: collapse; font-size: 0.85em; width: 100%; }
th, td { border: 1px solid #ccc; padding: 0.2em 0.45em; text-align: left; }
th { background: #eee; } td.num { text-align: right; font-variant-numeric: tabular-nums; white-space: nowrap; }
tr.fail td.status, td.fail { color: #b00020; font-weight: 600; } td.pass { color: #176b2c; }
tr.flagged { background: #fde8e8; } tr.uncertain { background: #fdf5e0; }
.counts span { display: inline-block; margin-right: 1.2em; font-weight: 600; }
img { max-width: 100%; height: auto; display: block; margin: 0.5em 0; }
.small { font-size: 0.85em; color: #555; }
@media print { body { max-width: none; margin: 0; font-size: 10pt; } section, img, tr { break-inside: avoid; } }
"""


def png_data_uri(fig: Figure) -> str:
    """``fig`` as a PNG ``data:`` URI, for a self-contained page."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def dvh_figure(plan_table: Sequence[Sequence], predicted_table: Sequence[Sequence], title: str) -> str:
    """Cumulative DVHs from two DVH tables (:func:`~monai_dose.dicom.predict.dvh_tables`): plan solid, prediction
    dashed, one colour per ROI (:func:`~monai_dose.plots.plot_dvh`); a PNG ``data:`` URI."""

    def curves(table: Sequence[Sequence]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
        values = np.asarray(table[1:], dtype=np.float64)
        return {str(h).removesuffix(" (% volume)"): (values[:, 0], values[:, i]) for i, h in enumerate(table[0]) if i}

    buffer = io.BytesIO()
    plot_dvh({"plan": curves(plan_table), "prediction": curves(predicted_table)}, buffer, title=title)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def to_display(volume: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """``volume`` (voxel-to-RAS ``affine``) reoriented to :data:`DISPLAY_AXES` (flips and transposes only)."""
    return apply_orientation(volume, ornt_transform(io_orientation(affine), axcodes2ornt(DISPLAY_AXES)))


def display_spacing(affine: np.ndarray) -> list[float]:
    """Voxel size (mm) along the :data:`DISPLAY_AXES` of a volume with voxel-to-RAS ``affine``."""
    transform = ornt_transform(io_orientation(affine), axcodes2ornt(DISPLAY_AXES))
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    shown = [0.0] * 3
    for axis, (target, _) in enumerate(transform):
        shown[int(target)] = float(spacing[axis])
    return shown


def _views(volume: np.ndarray, centre: Sequence[int]) -> list[np.ndarray]:
    """Axial, coronal and sagittal slices through ``centre`` of a :data:`DISPLAY_AXES` volume, as shown (rows,
    columns): axial (A->P, R->L), coronal (S->I, R->L), sagittal (S->I, A->P)."""
    i, j, k = centre
    return [volume[:, :, k], volume[i, :, :].T, volume[:, j, :].T]


def _aspects(spacing: Sequence[float]) -> list[float]:
    s0, s1, s2 = spacing
    return [s0 / s1, s2 / s1, s2 / s0]


def slice_figures(
    ct_hu: np.ndarray,
    plan: np.ndarray,
    predicted: np.ndarray,
    labels: np.ndarray,
    spacing: Sequence[float],
    present: Sequence[str],
) -> tuple[str, str]:
    """Axial, coronal and sagittal slices through the centre of the highest-dose target present: plan and predicted
    dose (colour wash over the CT, isodose lines at :data:`ISODOSE_FRACTION` of each prescription, contours), and
    plan minus prediction (diverging colour map). Arrays in :data:`DISPLAY_AXES`; ``labels`` holds structure ``c``
    of :data:`~monai_dose.data.openkbp.STRUCTURES` as bit ``c``. Returns two PNG ``data:`` URIs."""
    region = np.nonzero((plan > 0) | (predicted > 0) | (labels > 0))  # the views show this box, and a margin
    box = tuple(slice(max(int(a.min()) - _MARGIN_VOXELS, 0), int(a.max()) + _MARGIN_VOXELS + 1) for a in region)
    ct_hu, plan, predicted, labels = (v[box] for v in (ct_hu, plan, predicted, labels))
    targets = [t for t in TARGETS if t in present]
    focus = STRUCTURES.index(targets[-1]) if targets else None
    region = (labels >> focus) & 1 if focus is not None else plan >= 0.5 * plan.max()
    centre = [int(round(float(np.mean(a)))) for a in np.nonzero(region)]
    aspects = _aspects(spacing)
    ct_views, plan_views, predicted_views = (_views(v, centre) for v in (ct_hu, plan, predicted))
    label_views = _views(labels, centre)
    vmax = max(float(plan.max()), float(predicted.max()), 1.0)
    names = ("Axial", "Coronal", "Sagittal")

    def outline(ax, view: int) -> None:
        for name in present:
            c = STRUCTURES.index(name)
            mask = (label_views[view] >> c) & 1
            if mask.any():
                ax.contour(mask, levels=[0.5], colors=f"C{c}", linewidths=0.8)

    fig = Figure(figsize=(13, 8.4), layout="constrained")
    axes = fig.subplots(2, 3)
    for row, (label, doses) in enumerate((("Plan", plan_views), ("Predicted", predicted_views))):
        for view, ax in enumerate(axes[row]):
            ax.imshow(ct_views[view], cmap="gray", vmin=-160, vmax=240, aspect=aspects[view])
            wash = ax.imshow(
                np.ma.masked_less(doses[view], 0.1 * vmax),
                cmap="turbo",
                vmin=0,
                vmax=vmax,
                alpha=0.45,
                aspect=aspects[view],
            )
            outline(ax, view)
            for target in targets:
                level = ISODOSE_FRACTION * TARGET_DOSES_GY[target]
                if doses[view].max() > level:
                    ax.contour(
                        doses[view], levels=[level], colors=_ISODOSE_COLOURS[target], linewidths=1.3, linestyles="--"
                    )
            ax.set(xticks=[], yticks=[], title=f"{label} dose, {names[view].lower()}")
    fig.colorbar(wash, ax=axes, label="Dose (Gy)", shrink=0.8)
    handles = [Line2D([], [], color=f"C{STRUCTURES.index(s)}", label=s) for s in present]
    handles += [
        Line2D([], [], color=_ISODOSE_COLOURS[t], linestyle="--", label=f"{ISODOSE_FRACTION * TARGET_DOSES_GY[t]:g} Gy")
        for t in targets
    ]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 7), facecolor="0.85")
    slices = png_data_uri(fig)

    differences = [p - q for p, q in zip(plan_views, predicted_views, strict=True)]
    limit = max(1.0, *(float(np.abs(d).max()) for d in differences))
    fig = Figure(figsize=(13, 4.6), layout="constrained")
    axes = fig.subplots(1, 3)
    for view, ax in enumerate(axes):
        ax.imshow(ct_views[view], cmap="gray", vmin=-160, vmax=240, aspect=aspects[view])
        shown = ax.imshow(
            np.ma.masked_equal(differences[view], 0), cmap="RdBu_r", vmin=-limit, vmax=limit, aspect=aspects[view]
        )
        outline(ax, view)
        ax.set(xticks=[], yticks=[], title=f"Plan - predicted, {names[view].lower()}")
    fig.colorbar(shown, ax=axes, label="Plan - predicted dose (Gy)", shrink=0.9)
    return slices, png_data_uri(fig)


def _number(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def _yes_no(value: bool | None) -> tuple[str, str]:
    return ("–", "") if value is None else (("yes", "pass") if value else ("no", "fail"))


def _flag(row: Mapping) -> str:
    if row.get("flag") is None:
        return row.get("note", "")
    note = " (within the model's typical error)" if row.get("within_model_error") else ""
    return row["flag"] + note


def _rows(rows: Sequence[Mapping], goals: bool) -> str:
    lines = []
    for row in rows:
        classes = "flagged" if row.get("flag") and not row.get("within_model_error") else ""
        classes = "uncertain" if row.get("flag") and row.get("within_model_error") else classes
        cells = [html.escape(row["roi"]), html.escape(row["metric"])]
        if goals:
            cells.append(html.escape(row["goal"]))
        unit = row["unit"]
        cells += [f"{_number(row['plan'])} {unit}", f"{_number(row['predicted'])} {unit}"]
        cells.append(f"{_number(row['plan_minus_predicted'])} {unit}")
        status = [_yes_no(row.get("plan_meets_goal")), _yes_no(row.get("predicted_meets_goal"))] if goals else []
        tds = "".join(f'<td class="num">{c}</td>' if i >= 2 else f"<td>{c}</td>" for i, c in enumerate(cells))
        tds += "".join(f'<td class="{css}">{text}</td>' for text, css in status)
        tds += f"<td>{html.escape(_flag(row))}</td><td class='num'>{_number(row.get('model_error_gy'))}</td>"
        if goals:
            tds += f"<td class='small'>{html.escape(row['source'])}</td>"
        lines.append(f'<tr class="{classes}">{tds}</tr>')
    return "\n".join(lines)


def render_report(report: Mapping, figures: Mapping[str, str]) -> str:
    """The self-contained HTML page of one patient's :func:`~monai_dose.qa.plan_qa.compare` report."""
    counts, margin, protocol = report["summary"], report["margin_gy"], report["protocol"]
    goal_head = (
        "<tr><th>ROI</th><th>Metric</th><th>Goal</th><th>Plan</th><th>Predicted</th><th>Plan − predicted</th>"
        "<th>Plan meets goal</th><th>Prediction meets goal</th><th>Flag</th><th>Model error (Gy)</th>"
        "<th>Source</th></tr>"
    )
    metric_head = (
        "<tr><th>ROI</th><th>Metric</th><th>Plan</th><th>Predicted</th><th>Plan − predicted</th><th>Flag</th>"
        "<th>Model error (Gy)</th></tr>"
    )
    inputs = "".join(
        f"<li>{html.escape(k)}: <code>{html.escape(str(v))}</code></li>" for k, v in report["inputs"].items()
    )
    images = "".join(
        f'<section><h2>{html.escape(title)}</h2><img alt="{html.escape(title)}" src="{figures[key]}"></section>'
        for key, title in (
            ("dvh", "Cumulative DVH (plan solid, prediction dashed)"),
            ("slices", "Dose through the high-dose target"),
            ("difference", "Plan minus prediction"),
        )
    )
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>Plan QA: {html.escape(report["patient"])}</title><style>{_CSS}</style></head>
<body>
<h1>Knowledge-based plan QA: {html.escape(report["patient"])}</h1>
<p class="disclaimer"><strong>Research use only.</strong> {html.escape(DISCLAIMER)}</p>
<p class="small">Created {html.escape(report["created"])} with the model of <code>{html.escape(report["bundle"])}</code>
and the protocol “{html.escape(protocol["name"])}” (<code>{html.escape(protocol["file"])}</code>).</p>
<ul class="small">{inputs}</ul>
<section><h2>Summary</h2><p class="counts">
<span id="goals-failed">{counts["goals_failed"]} goal(s) not met by the plan</span>
<span id="room-to-improve">{counts["room_to_improve"]} OAR metric(s) with room to improve</span>
<span id="under-covered">{counts["under_covered"]} target metric(s) under-covered</span></p>
<p class="small">A flag marks a dose metric where the plan's OAR dose exceeds the prediction, or the prediction's
target coverage exceeds the plan's, by more than {margin:g} Gy. “Model error” is the model's mean absolute
error for that metric on the 33 OpenKBP validation patients; a flag whose difference is within
{report["model_error"]["trust_factor"]:g} times that error is marked “within the model's typical error”.</p></section>
<section><h2>Clinical goals</h2><table id="goals"><thead>{goal_head}</thead><tbody>
{_rows(report["goals"], goals=True)}
</tbody></table></section>
<section><h2>DVH metrics (OpenKBP) of every structure</h2><table id="dvh-metrics"><thead>{metric_head}</thead><tbody>
{_rows(report["dvh_metrics"], goals=False)}
</tbody></table></section>
{images}
<p class="small">DVH convention: {html.escape(report["dvh_convention"])}.</p>
<p class="disclaimer">{html.escape(DISCLAIMER)}</p>
</body></html>
"""


def render_summary(rows: Sequence[Mapping], title: str) -> str:
    """The self-contained HTML page of a cohort: one row per patient (:func:`~monai_dose.qa.plan_qa.plan_qa_cohort`),
    linking each patient's report."""
    head = "".join(f"<th>{html.escape(k.replace('_', ' '))}</th>" for k in rows[0]) if rows else ""
    body = []
    for row in rows:
        cells = []
        for key, value in row.items():
            text = html.escape("" if value is None else str(value))
            if key == "patient" and row.get("status") == "ok":
                text = f'<a href="{html.escape(str(value))}/report.html">{text}</a>'
            cells.append(f"<td>{text}</td>")
        css = "fail" if row.get("status") != "ok" else ("flagged" if row.get("flags") else "")
        body.append(f'<tr class="{css}">{"".join(cells)}</tr>')
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title><style>{_CSS}</style></head>
<body><h1>{html.escape(title)}</h1>
<p class="disclaimer"><strong>Research use only.</strong> {html.escape(DISCLAIMER)}</p>
<table id="summary"><thead><tr>{head}</tr></thead><tbody>
{"".join(body)}
</tbody></table></body></html>
"""
