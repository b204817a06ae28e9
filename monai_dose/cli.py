"""Command line: ``python -m monai_dose <command>``."""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from .precision import AMP_CHOICES


def _convert(args: argparse.Namespace) -> None:
    from .data.convert import convert_openkbp

    convert_openkbp(args.src, args.dst, overwrite=args.overwrite)


def _evaluate(args: argparse.Namespace) -> None:
    from .evaluation import evaluate_predictions

    evaluate_predictions(args.data, args.predictions, args.out, split=args.split)


def _predict_dicom(args: argparse.Namespace) -> None:
    from .dicom import predict_dicom

    predict_dicom(
        ct_dir=args.ct,
        rtstruct=args.rtstruct,
        bundle=args.bundle,
        out_dir=args.out,
        name_map=args.name_map,
        possible_dose_mask=args.possible_dose_mask,
        rtplan=args.rtplan,
        allow_patient_mismatch=args.allow_patient_mismatch,
    )


def _benchmark(args: argparse.Namespace) -> None:
    from .benchmark import run_benchmark

    run_benchmark(
        args.bundle,
        args.data,
        args.out,
        args.device,
        repeats=args.repeats,
        iterations=args.iterations,
        train_configs=tuple(args.train_config),
        amp=args.amp,
    )


def _average_weights(args: argparse.Namespace) -> None:
    import torch

    from .checkpoints import average_weights
    from .utils import write_atomic

    state = average_weights(args.checkpoints)
    write_atomic(args.out, lambda tmp: torch.save(state, tmp))
    print(f"average of {len(args.checkpoints)} checkpoints -> {args.out}")


AMP_ARGUMENT = {
    "default": "auto",
    "choices": AMP_CHOICES,
    "help": "bfloat16 autocast: auto (where the device computes bf16 natively), true or false (default: auto)",
}


def _plan_qa(args: argparse.Namespace) -> None:
    from .qa import plan_qa_cohort, plan_qa_dicom, plan_qa_nifti

    options = {"bundle": args.bundle, "protocol": args.protocol, "margin_gy": args.margin_gy}
    if args.cohort is not None:
        rows = plan_qa_cohort(args.cohort, args.out, plan_name=args.plan_name, **options)
        print(f"{len(rows)} patients -> {args.out / 'summary.html'}")
        return
    if args.patient is not None:
        if args.plan_dose is None:
            raise ValueError("--patient needs --plan-dose (the plan's dose, NIfTI on the CT's grid)")
        report = plan_qa_nifti(args.patient, args.plan_dose, args.out, **options)
    else:
        if args.rtstruct is None or args.rtdose is None:
            raise ValueError("--ct needs --rtstruct and --rtdose (the plan's RTDOSE)")
        report = plan_qa_dicom(
            args.ct,
            args.rtstruct,
            args.rtdose,
            args.out,
            name_map=args.name_map,
            possible_dose_mask=args.possible_dose_mask,
            **options,
        )
    counts = report["summary"]
    print(
        f"{counts['goals_failed']} goals not met, {counts['room_to_improve']} room to improve, "
        f"{counts['under_covered']} under-covered -> {args.out / 'report.html'}"
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``monai_dose`` argument parser with one sub-command per workflow."""
    parser = argparse.ArgumentParser(
        prog="python -m monai_dose",
        description="Dose prediction: OpenKBP conversion, evaluation, DICOM prediction, benchmark, weight averaging.",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("convert-openkbp", help="OpenKBP CSV `provided-data` folder -> NIfTI dataset")
    p.add_argument("src", type=Path, help="folder holding train-pats/, validation-pats/ and/or test-pats/")
    p.add_argument("dst", type=Path, help="output dataset folder (dataset.json and one folder per patient)")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="convert into a dst already holding a dataset: replace the patients converted again, keep the others",
    )
    p.set_defaults(func=_convert)

    p = sub.add_parser("evaluate", help="OpenKBP dose and DVH scores of predicted doses")
    p.add_argument("--data", type=Path, required=True, help="NIfTI dataset folder (with dataset.json)")
    p.add_argument("--predictions", type=Path, required=True, help="PRED/<id>/*.nii.gz or PRED/<id>.nii.gz")
    p.add_argument("--out", type=Path, required=True, help="output folder for scores.json, CSV and DVH plots")
    p.add_argument("--split", default="validation", help="datalist section holding the reference doses")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("predict-dicom", help="DICOM CT series + RTSTRUCT -> RTDOSE")
    p.add_argument("--ct", type=Path, required=True, help="folder holding the CT series")
    p.add_argument("--rtstruct", type=Path, required=True, help="RTSTRUCT file")
    p.add_argument("--bundle", type=Path, default=Path("bundles/openkbp_dose"), help="bundle folder")
    p.add_argument("--out", type=Path, required=True, help="output folder (RTDOSE.dcm, dose.nii.gz, dvh.csv)")
    p.add_argument("--name-map", type=Path, default=None, help="JSON file overriding the ROI name map")
    p.add_argument("--possible-dose-mask", default=None, help="ROI name of the possible-dose mask")
    p.add_argument("--rtplan", type=Path, default=None, help="RT Plan file for the RTDOSE to reference")
    p.add_argument(
        "--allow-patient-mismatch",
        action="store_true",
        help="accept an RTSTRUCT whose PatientID differs from the CT's (e.g. anonymised separately)",
    )
    p.set_defaults(func=_predict_dicom)

    p = sub.add_parser("benchmark", help="inference and training speed and memory on this machine")
    p.add_argument("--bundle", type=Path, default=Path("bundles/openkbp_dose"), help="bundle folder")
    p.add_argument(
        "--data",
        type=Path,
        default=None,
        help="NIfTI dataset folder (default: the example patient in examples/, two levels above --bundle)",
    )
    p.add_argument("--out", type=Path, default=Path("benchmark.json"), help="JSON result file")
    p.add_argument("--device", default=None, help="cpu or cuda (default: both where available)")
    p.add_argument("--amp", **AMP_ARGUMENT)
    p.add_argument("--repeats", type=int, default=3, help="timed inference repetitions (after a warm-up run)")
    p.add_argument("--iterations", type=int, default=20, help="timed training iterations (after 3 warm-up ones)")
    p.add_argument(
        "--train-config",
        type=Path,
        action="append",
        default=[],
        help="config file layered on the bundle's train.json for the training measurement (repeatable)",
    )
    p.set_defaults(func=_benchmark)

    p = sub.add_parser("average-weights", help="uniform average of checkpoints of one network (a model soup)")
    p.add_argument("out", type=Path, help="the averaged weights, a model.pt")
    p.add_argument(
        "checkpoints",
        nargs="+",
        help="model.pt files or training checkpoints (their network; FILE#ema_model or FILE#swa_model: its average)",
    )
    p.set_defaults(func=_average_weights)

    p = sub.add_parser("plan-qa", help="a plan's dose beside the predicted achievable dose: goals, flags, report")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--patient", type=Path, help="NIfTI patient folder (ct, structures, possible-dose mask)")
    source.add_argument("--ct", type=Path, help="DICOM: folder holding the CT series")
    source.add_argument("--cohort", type=Path, help="folder of NIfTI patient folders, each holding its plan dose")
    p.add_argument("--plan-dose", type=Path, default=None, help="with --patient: the plan's dose (NIfTI, Gy)")
    p.add_argument("--plan-name", default="dose.nii.gz", help="with --cohort: plan dose file in each patient folder")
    p.add_argument("--rtstruct", type=Path, default=None, help="with --ct: RTSTRUCT file")
    p.add_argument("--rtdose", type=Path, default=None, help="with --ct: the plan's RTDOSE file")
    p.add_argument("--name-map", type=Path, default=None, help="with --ct: JSON file overriding the ROI name map")
    p.add_argument("--possible-dose-mask", default=None, help="with --ct: ROI name of the possible-dose mask")
    p.add_argument("--bundle", type=Path, default=Path("bundles/openkbp_dose"), help="bundle folder")
    p.add_argument("--protocol", type=Path, default=None, help="JSON clinical goals (default: head-and-neck example)")
    p.add_argument("--margin-gy", type=float, default=3.0, help="plan - predicted difference that flags (Gy)")
    p.add_argument("--out", type=Path, required=True, help="output folder (report.html, report.json, ...)")
    p.set_defaults(func=_plan_qa)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the command line; errors on user input print one line and exit with status 1."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        args.func(args)
    except (FileNotFoundError, PermissionError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
