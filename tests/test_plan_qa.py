"""plan-qa: a plan's dose beside the predicted achievable dose, through the NIfTI and DICOM routes, in a browser."""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid
from test_dicom import build_dicom, load_patient

from monai_dose.cli import main
from monai_dose.data.openkbp import STRUCTURES
from monai_dose.dicom import read_ct_series, write_rtdose
from monai_dose.inference import DosePredictor, predict_patients
from monai_dose.metrics import dvh_metrics
from monai_dose.qa import (
    DEFAULT_PROTOCOL,
    ROOM_TO_IMPROVE,
    UNDER_COVERED,
    QAModel,
    load_protocol,
    parse_metric,
    plan_qa_dicom,
    plan_qa_nifti,
)
from monai_dose.qa.plan_qa import MODEL_ERRORS

REPO_ROOT = Path(__file__).resolve().parents[1]
BUNDLE = REPO_ROOT / "bundles" / "openkbp_dose"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--hide-scrollbars",
]
"""Headless Chromium on a closed network, as root (see .ci/run)."""
PROBE = """<script>
window.__errors = [];
window.addEventListener("error", e => __errors.push(String(e.message || (e.target.src || "").slice(0, 80))), true);
window.addEventListener("load", () => document.body.setAttribute("data-probe", JSON.stringify({
  errors: __errors,
  images: Array.from(document.images, i => ({alt: i.alt, decoded: i.complete && i.naturalWidth > 0}))
})));
</script>"""
"""Injected first into a copy of the report: records load errors and whether each image decoded."""


def reference_dose(folder: Path) -> np.ndarray:
    return np.asarray(nib.load(folder / "dose.nii.gz").dataobj, dtype=np.float32)


def rows(report: dict, table: str = "dvh_metrics") -> dict[str, dict]:
    return {f"{r['roi']}/{r['metric']}": r for r in report[table]}


@pytest.fixture(scope="module")
def pt201(openkbp_dir: Path) -> Path:
    return openkbp_dir / "validation" / "pt_201"


@pytest.fixture(scope="module")
def bundle_report(pt201: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``plan-qa`` on validation patient pt_201 with its reference dose as the plan and the shipped bundle."""
    out = tmp_path_factory.mktemp("qa") / "out"
    args = ["plan-qa", "--patient", str(pt201), "--plan-dose", str(pt201 / "dose.nii.gz"), "--out", str(out)]
    assert main([*args, "--bundle", str(BUNDLE)]) == 0
    return out


@pytest.mark.slow
def test_nifti_route_matches_evaluate_and_bundle_inference(
    bundle_report: Path, pt201: Path, openkbp_dir: Path, tmp_path: Path
):
    """Plan values equal ``monai_dose evaluate``'s OpenKBP DVH metrics of the same dose (1e-6 relative); predicted
    values and dose equal the bundle's inference (``predict_patients``)."""
    from monai_dose.evaluation import evaluate_predictions

    report = json.loads((bundle_report / "report.json").read_text())
    assert sorted(p.relative_to(bundle_report).as_posix() for p in bundle_report.rglob("*") if p.is_file()) == [
        "plan/dvh.csv",
        "prediction/dose.nii.gz",
        "prediction/dvh.csv",
        "report.html",
        "report.json",
    ]
    (tmp_path / "plans" / "pt_201").mkdir(parents=True)
    os.symlink(pt201 / "dose.nii.gz", tmp_path / "plans" / "pt_201" / "dose.nii.gz")
    scores = evaluate_predictions(openkbp_dir, tmp_path / "plans", tmp_path / "eval", split="validation")
    expected = {k: v for k, v in scores["prediction_dvh_metrics"]["pt_201"].items() if v is not None}
    metrics = rows(report)
    assert set(metrics) == set(expected)
    for key, value in expected.items():
        assert metrics[key]["plan"] == pytest.approx(value, rel=1e-6, abs=1e-9), key

    item = {"id": "pt_201", **{k: str(pt201 / f"{k}.nii.gz") for k in ("ct", "structures", "possible_dose_mask")}}
    written = predict_patients(DosePredictor.from_bundle(BUNDLE), [item], tmp_path / "inference")
    inferred = np.asarray(nib.load(written["pt_201"]).dataobj)
    np.testing.assert_allclose(np.asarray(nib.load(bundle_report / "prediction" / "dose.nii.gz").dataobj), inferred)
    structures = np.moveaxis(np.asarray(nib.load(pt201 / "structures.nii.gz").dataobj), -1, 0)
    spacing = nib.load(pt201 / "ct.nii.gz").header.get_zooms()[:3]
    for key, value in dvh_metrics(inferred, structures, spacing).items():
        if value is not None:
            assert metrics[key]["predicted"] == pytest.approx(value, rel=1e-6, abs=1e-9), key

    goals = report["goals"]
    assert [(g["roi"], g["metric"]) for g in goals] == [(g.roi, g.metric.key) for g in load_protocol().goals]
    errors = json.loads((BUNDLE / MODEL_ERRORS).read_text())["mean_abs_error_gy"]
    assert metrics["LeftParotid/mean"]["model_error_gy"] == errors["LeftParotid/mean"]
    with open(bundle_report / "plan" / "dvh.csv", newline="") as f:
        header = next(csv.reader(f))
    assert header == [
        "dose_gy",
        *(f"{s} (% volume)" for s in STRUCTURES if f"{s}/mean" in metrics or f"{s}/D_95" in metrics),
    ]


class _Page(HTMLParser):
    """The goals table's rows and the probe's result from a dumped DOM."""

    def __init__(self) -> None:
        super().__init__()
        self.goal_rows: list[list[str]] = []
        self.probe: dict | None = None
        self._table: str | None = None
        self._cell: list[str] | None = None

    def handle_starttag(self, tag: str, attrs: list) -> None:
        attrs = dict(attrs)
        if tag == "body" and "data-probe" in attrs:
            self.probe = json.loads(attrs["data-probe"])
        if tag == "table":
            self._table = attrs.get("id")
        if self._table == "goals" and tag == "tr":
            self.goal_rows.append([])
        if self._table == "goals" and tag == "td":
            self._cell = []

    def handle_endtag(self, tag: str) -> None:
        if tag == "td" and self._cell is not None:
            self.goal_rows[-1].append("".join(self._cell).strip())
            self._cell = None
        if tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        if self._cell is not None:
            self._cell.append(data)


def chromium(*args: str, user_data: Path) -> subprocess.CompletedProcess:
    command = [CHROMIUM, *CHROMIUM_FLAGS, f"--user-data-dir={user_data}", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=120, check=True)


@pytest.mark.skipif(CHROMIUM is None, reason="Debian's chromium is not installed (.ci/run installs it)")
def test_report_renders_in_headless_chromium(bundle_report: Path, tmp_path: Path):
    """The report loads without errors in Chromium, every image decodes, and the goals table holds one row per goal
    of the protocol. ``MONAI_DOSE_REPORT_SCREENSHOT=docs/figures/plan_qa_report.png`` keeps the screenshot."""
    page = tmp_path / "report.html"
    page.write_text((bundle_report / "report.html").read_text().replace("<head>", "<head>" + PROBE, 1))
    dom = chromium("--virtual-time-budget=10000", "--dump-dom", page.as_uri(), user_data=tmp_path / "profile").stdout
    parsed = _Page()
    parsed.feed(dom)
    assert parsed.probe is not None, "the page did not finish loading"
    assert parsed.probe["errors"] == []
    assert [i["alt"] for i in parsed.probe["images"]] == [
        "Cumulative DVH (plan solid, prediction dashed)",
        "Dose through the high-dose target",
        "Plan minus prediction",
    ]
    assert all(i["decoded"] for i in parsed.probe["images"])
    goals = load_protocol().goals
    table = [row for row in parsed.goal_rows if row]
    assert [(r[0], r[1], r[2]) for r in table] == [(g.roi, g.metric.key, g.text) for g in goals]
    report = json.loads((bundle_report / "report.json").read_text())
    for row, goal in zip(table, report["goals"], strict=True):
        assert row[3] == f"{goal['plan']:.2f} {goal['unit']}"

    shot = tmp_path / "report.png"
    chromium(
        "--window-size=1200,3700",
        f"--screenshot={shot}",
        (bundle_report / "report.html").as_uri(),
        user_data=tmp_path / "profile",
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if keep := os.environ.get("MONAI_DOSE_REPORT_SCREENSHOT"):
        shutil.copy(shot, keep)


def write_plan(folder: Path, dose: np.ndarray, path: Path) -> Path:
    """``dose`` as a NIfTI plan dose on the grid of ``folder``'s CT."""
    ct = nib.load(folder / "ct.nii.gz")
    nib.save(nib.Nifti1Image(dose.astype(np.float32), ct.affine), path)
    return path


def test_worse_parotid_flags_room_to_improve(pt201: Path, tmp_path: Path):
    """The reference dose + 8 Gy inside the left parotid, against a "prediction" that is the reference dose:
    exactly that parotid's metrics are flagged, as beyond the model's error where 8 Gy exceeds twice it."""
    reference = reference_dose(pt201)
    parotid = np.asarray(nib.load(pt201 / "structures.nii.gz").dataobj)[..., STRUCTURES.index("LeftParotid")] > 0
    plan = write_plan(pt201, reference + 8.0 * parotid, tmp_path / "plan.nii.gz")
    errors = {"LeftParotid/mean": 5.0, "LeftParotid/D_0.1_cc": 1.0}
    model = QAModel(lambda ct, structures, mask: reference, "reference dose", errors)
    report = plan_qa_nifti(pt201, plan, tmp_path / "out", model)
    flagged = {k: r for k, r in {**rows(report), **rows(report, "goals")}.items() if r["flag"]}
    assert set(flagged) == {"LeftParotid/mean", "LeftParotid/D_0.1_cc"}
    assert {r["flag"] for r in flagged.values()} == {ROOM_TO_IMPROVE}
    assert flagged["LeftParotid/mean"]["plan_minus_predicted"] == pytest.approx(8.0, abs=1e-4)
    assert flagged["LeftParotid/mean"]["within_model_error"] is True  # 8 <= 2 x 5 Gy
    assert flagged["LeftParotid/D_0.1_cc"]["within_model_error"] is False  # 8 > 2 x 1 Gy
    assert report["summary"]["room_to_improve"] == 2 and report["summary"]["under_covered"] == 0
    assert "room to improve" in (tmp_path / "out" / "report.html").read_text()

    report = plan_qa_nifti(pt201, pt201 / "dose.nii.gz", tmp_path / "same", model)
    assert report["summary"]["room_to_improve"] == report["summary"]["under_covered"] == 0


def test_under_covered_target(pt201: Path, tmp_path: Path):
    """8 Gy less inside PTV70 than the prediction flags its coverage metrics (D_95, D_99), not its hot spot."""
    reference = reference_dose(pt201)
    ptv70 = np.asarray(nib.load(pt201 / "structures.nii.gz").dataobj)[..., STRUCTURES.index("PTV70")] > 0
    plan = write_plan(pt201, reference - 8.0 * ptv70, tmp_path / "plan.nii.gz")
    report = plan_qa_nifti(pt201, plan, tmp_path / "out", lambda ct, structures, mask: reference)
    metrics = rows(report)
    assert metrics["PTV70/D_95"]["flag"] == metrics["PTV70/D_99"]["flag"] == UNDER_COVERED
    assert metrics["PTV70/D_1"]["flag"] is None
    assert rows(report, "goals")["PTV70/D_95"]["plan_meets_goal"] is False


@pytest.fixture(scope="module")
def pt1_dicom(openkbp_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """OpenKBP train/pt_1 as a CT series and RTSTRUCT (tests/test_dicom.py), and its reference dose as the plan's
    RTDOSE on a sub-box of the CT grid (another origin and size than the CT's)."""
    arrays, spacing = load_patient(openkbp_dir, "train", "pt_1")
    folder = build_dicom(arrays, spacing, tmp_path_factory.mktemp("pt_1"))
    ct = read_ct_series(folder / "ct")
    dose = reference_dose(openkbp_dir / "train" / "pt_1")[:, :, ::-1]  # onto the CT grid: slices in ascending z
    box = tuple(slice(max(a.min() - 2, 0), a.max() + 3) for a in np.nonzero(dose))
    path = write_rtdose(dose, ct, folder / "plan_full.dcm", "plan")
    ds = pydicom.dcmread(path)
    frames = ds.pixel_array.transpose(1, 2, 0)[box]  # (rows, columns, frames)
    first = ct.affine @ [box[0].start, box[1].start, box[2].start, 1]
    ds.ImagePositionPatient = [f"{v:.4f}" for v in first[:3]]
    ds.Rows, ds.Columns, ds.NumberOfFrames = frames.shape
    ds.GridFrameOffsetVector = [f"{v:g}" for v in np.arange(frames.shape[2]) * spacing[2]]
    ds.PixelData = np.ascontiguousarray(frames.transpose(2, 0, 1), dtype="<u4").tobytes()
    ds.save_as(folder / "plan.dcm")
    (folder / "plan_full.dcm").unlink()
    return folder


def test_dicom_route_matches_nifti_route(pt1_dicom: Path, openkbp_dir: Path, tmp_path: Path):
    """The plan's RTDOSE (a sub-box of the CT grid, DoseGridScaling applied) resampled onto the CT gives the NIfTI
    route's plan values within 1e-4 Gy: pt_1 is a 128^3 CT of the model's voxel size, so the dose grid's voxels
    are CT voxels (interpolation weights 0 or 1), rt-utils gives back the OpenKBP masks, and what remains is the
    RTDOSE's uint32 quantisation (~1e-8 Gy) and float noise."""
    pt1 = openkbp_dir / "train" / "pt_1"
    reference = reference_dose(pt1)
    nifti = plan_qa_nifti(pt1, pt1 / "dose.nii.gz", tmp_path / "nifti", lambda ct, structures, mask: reference)
    dicom = plan_qa_dicom(
        pt1_dicom / "ct",
        pt1_dicom / "rtstruct.dcm",
        pt1_dicom / "plan.dcm",
        tmp_path / "dicom",
        lambda ct, structures, mask: reference[..., ::-1],  # pt_1's CT grid: OpenKBP's, slices inferior first
        possible_dose_mask="PossibleDose",
    )
    expected = rows(nifti) | rows(nifti, "goals")
    values = rows(dicom) | rows(dicom, "goals")
    assert set(values) == set(expected)
    for key, row in expected.items():
        assert values[key]["plan"] == pytest.approx(row["plan"], abs=1e-4), key
        assert values[key]["predicted"] == pytest.approx(row["predicted"], abs=1e-4), key
    written = sorted(p.name for p in (tmp_path / "dicom" / "prediction").iterdir())
    assert written == ["RTDOSE.dcm", "dose.nii.gz", "dvh.csv", "report.json"]
    assert dicom["dicom"]["structures_found"]["LeftParotid"] == ["Lt Parotid"]
    assert values["Larynx/mean"]["note"] == "ROI not contoured"  # a goal of an absent ROI: no values, no flag


def bad_protocol(tmp_path: Path, content: str) -> Path:
    path = tmp_path / "protocol.json"
    path.write_text(content)
    return path


@pytest.mark.parametrize(
    "case, message",
    [
        ("unknown ROI", r"protocol.json: goal 1: unknown ROI 'Parotid_L'"),
        ("unknown metric", r"protocol.json: goal 1: unknown metric 'Dmean'"),
        ("wrong limit", r"protocol.json: goal 1: give one number as max_percent or min_percent for metric V_77_Gy"),
        ("malformed protocol", r"protocol.json: not a JSON protocol"),
        ("plan on another grid", r"plan.nii.gz: the plan dose grid .* is not the CT's grid"),
    ],
)
def test_bad_nifti_input_writes_nothing(
    case: str, message: str, pt201: Path, tmp_path: Path, capsys: pytest.CaptureFixture
):
    goal = {"roi": "LeftParotid", "metric": "mean", "max_gy": 26}
    protocol = {
        "unknown ROI": json.dumps([{**goal, "roi": "Parotid_L"}]),
        "unknown metric": json.dumps([{**goal, "metric": "Dmean"}]),
        "wrong limit": json.dumps([{"roi": "PTV70", "metric": "V_77Gy", "max_gy": 20}]),
        "malformed protocol": '[{"roi": "LeftParotid", "metric": "mean", "max_gy": 26',
    }.get(case)
    plan = pt201 / "dose.nii.gz"
    if case == "plan on another grid":
        image = nib.load(plan)
        plan = tmp_path / "plan.nii.gz"
        nib.save(nib.Nifti1Image(np.asarray(image.dataobj)[::2, ::2, ::2], image.affine @ np.diag([2, 2, 2, 1])), plan)
    args = ["plan-qa", "--patient", str(pt201), "--plan-dose", str(plan), "--out", str(tmp_path / "out")]
    if protocol is not None:
        args += ["--protocol", str(bad_protocol(tmp_path, protocol))]
    assert main(args) == 1
    assert re.search(message, capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


def test_rtdose_of_another_frame_of_reference(pt1_dicom: Path, tmp_path: Path):
    ds = pydicom.dcmread(pt1_dicom / "plan.dcm")
    ds.FrameOfReferenceUID = generate_uid()
    ds.save_as(tmp_path / "other.dcm")
    with pytest.raises(ValueError, match=r"other.dcm: FrameOfReferenceUID '.*' is not the CT's"):
        plan_qa_dicom(
            pt1_dicom / "ct", pt1_dicom / "rtstruct.dcm", tmp_path / "other.dcm", tmp_path / "out", lambda *a: None
        )
    assert not (tmp_path / "out").exists()


def test_cohort_reports_a_bad_patient_and_runs_the_others(
    pt201: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
):
    cohort = tmp_path / "cohort"
    for pid in ("pt_201", "pt_bad"):
        (cohort / pid).mkdir(parents=True)
        for name in ("ct", "structures", "possible_dose_mask", "dose"):
            if not (pid == "pt_bad" and name == "possible_dose_mask"):
                os.symlink(pt201 / f"{name}.nii.gz", cohort / pid / f"{name}.nii.gz")
    reference = reference_dose(pt201)
    monkeypatch.setattr(
        DosePredictor,
        "from_bundle",
        lambda bundle, **kw: lambda ct, s, m: reference + 5.0 * (np.asarray(s)[..., 3] > 0),
    )
    out = tmp_path / "out"
    assert main(["plan-qa", "--cohort", str(cohort), "--out", str(out), "--bundle", str(BUNDLE)]) == 1
    assert "1 of 2 patients failed (pt_bad: " in capsys.readouterr().err
    with open(out / "summary.csv", newline="") as f:
        summary = list(csv.DictReader(f))
    assert [r["patient"] for r in summary] == ["pt_bad", "pt_201"]
    assert summary[0]["status"].startswith("error: ") and "possible_dose_mask.nii.gz" in summary[0]["status"]
    assert summary[1]["status"] == "ok" and int(summary[1]["under_covered"]) == 0
    assert (out / "pt_201" / "report.html").is_file() and not (out / "pt_bad").exists()
    assert 'href="pt_201/report.html"' in (out / "summary.html").read_text()


def test_model_errors_are_the_model_card_table():
    """The bundle's per-ROI validation errors are the model card's 'DVH metric errors per ROI' table."""
    table = (BUNDLE / "docs" / "figures" / "model_card_tables.md").read_text().split("## DVH metric errors per ROI")[1]
    expected = {
        f"{m[1]}/{m[2]}": float(m[3]) for m in re.finditer(r"^\| (\w+) \| ([\w.]+) \| ([\d.]+) \|", table, re.M)
    }
    assert json.loads((BUNDLE / MODEL_ERRORS).read_text())["mean_abs_error_gy"] == expected
    assert len(expected) == 23


def test_metrics_and_default_protocol():
    dose = np.arange(1.0, 101.0)  # 100 voxels of 1..100 Gy, 1 mm^3 each
    assert parse_metric("D_95")(dose, 1.0) == pytest.approx(np.percentile(dose, 5))
    assert parse_metric("D_0.01cc")(dose, 1.0) == pytest.approx(np.percentile(dose, 90))  # the hottest 10 voxels
    assert parse_metric("V_90Gy")(dose, 1.0) == pytest.approx(11.0)
    assert parse_metric("mean")(dose, 1.0) == pytest.approx(50.5) and parse_metric("max")(dose, 1.0) == 100.0
    assert parse_metric("D_0.1cc") == parse_metric("D_0.1_cc") and parse_metric("D_0.1_cc").key == "D_0.1_cc"
    protocol = load_protocol(DEFAULT_PROTOCOL)
    assert {g.roi for g in protocol.goals} == set(STRUCTURES)
    assert all(g.source for g in protocol.goals) and "example" in protocol.name
