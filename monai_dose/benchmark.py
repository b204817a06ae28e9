"""Speed and memory of the bundle's inference and training on this machine: ``python -m monai_dose benchmark``.

Every measurement runs in a fresh process, so that its peak memory is its own.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import platform
import resource
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torch
from ignite.engine import Events
from monai.bundle import ConfigParser

from .data.openkbp import load_openkbp_datalist, patient_folder_datalist
from .inference import DosePredictor, load_patient
from .precision import cpu_capability, native_bf16, resolve_precision
from .transforms import save_dose
from .utils import as_device

CPU_THREADS = 2
STAGES = ("load", "preprocess", "network", "postprocess", "save")


def _peak_rss_mb() -> float:
    """Peak resident memory of this process and its finished children, MB."""
    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return (own + children) / 1024


def synchronize(device: torch.device) -> None:
    """Wait for ``device``'s queued work (a no-op on the CPU), so that a clock read after it is meaningful."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measurement_config(
    config_files: list[str | Path],
    dataset_dir: str | Path,
    device: str | torch.device,
    run_dir: str | Path,
    **updates,
) -> ConfigParser:
    """The bundle's training config (``config_files`` layered) on its first 8 training patients, without handlers,
    its run folder ``run_dir``: what the speed measurements run; ``updates`` replace further config values.

    Paths go in absolute and the device as a ``torch.device``: values, never text MONAI would evaluate."""
    parser = ConfigParser()
    parser.read_config([str(f) for f in config_files])
    parser.update(
        {
            "run_dir": str(Path(run_dir).resolve()),
            "dataset_dir": str(Path(dataset_dir).resolve()),
            "device": as_device(device),
            "num_train": 8,
            "train#handlers": [],
            **updates,
        }
    )
    return parser


def network_step(trainer, image: torch.Tensor, label: torch.Tensor) -> None:  # noqa: ANN001
    """One optimizer step of ``trainer``'s network, loss and optimizer on a prepared batch."""
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.loss_function(trainer.network(image), label).backward()
    trainer.optimizer.step()


def _peak_gpu_mb(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def benchmark_inference(
    bundle: str | Path, patient: dict, device: str, repeats: int = 3, amp: bool | str = "auto"
) -> dict:
    """Median seconds per stage of predicting one patient from files to a written dose file."""
    torch.set_num_threads(CPU_THREADS)
    predictor = DosePredictor.from_bundle(bundle, device=device, amp=amp)
    timings: dict[str, list[float]] = {stage: [] for stage in STAGES}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(repeats + 1):  # the first run warms up
            marks = [time.perf_counter()]
            data = load_patient(patient)
            marks.append(time.perf_counter())
            prepared = predictor.prepare(data["ct"], data["structures"], data["possible_dose_mask"])
            synchronize(predictor.device)  # derived inputs computed on a GPU count as preprocessing
            marks.append(time.perf_counter())
            raw = predictor.predict(prepared)
            synchronize(predictor.device)
            marks.append(time.perf_counter())
            dose = predictor.postprocess(raw, prepared)
            marks.append(time.perf_counter())
            save_dose(dose, patient["ct"], Path(tmp) / "dose.nii.gz")
            marks.append(time.perf_counter())
            if repeat:
                for stage, start, end in zip(STAGES, marks, marks[1:], strict=False):
                    timings[stage].append(end - start)
    seconds = {stage: statistics.median(values) for stage, values in timings.items()}
    return {
        "device": str(predictor.device),
        "precision": predictor.precision.name,
        "precision_reason": predictor.precision.reason,
        "threads": torch.get_num_threads(),
        "seconds": seconds,
        "total_seconds": sum(seconds.values()),
        "non_network_share": 1 - seconds["network"] / sum(seconds.values()),
        "peak_memory_mb": _peak_rss_mb(),
        "peak_gpu_memory_mb": _peak_gpu_mb(predictor.device),
    }


def benchmark_training(
    bundle: str | Path,
    dataset_dir: str | Path,
    device: str,
    iterations: int = 20,
    warmup: int = 3,
    train_configs: tuple[str, ...] = (),
    amp: bool | str = "auto",
) -> dict:
    """Training rate of the bundle's full pipeline (cached data, augmentation, ``SupervisedTrainer``) and of
    the same network stepping on one batch held on the device, at the configured batch size.

    ``train_configs`` are config files layered on the bundle's ``train.json`` (e.g. ``configs/train_gpu.json``).
    """
    if device == "cpu":
        torch.set_num_threads(CPU_THREADS)
    configs = [Path(bundle) / "configs" / "train.json", *train_configs]
    with tempfile.TemporaryDirectory() as tmp:
        parser = measurement_config(
            configs,
            dataset_dir,
            device,
            tmp,
            **{
                "amp": amp,
                # one epoch of warmup + iterations batches, so that no epoch restart stalls the loader workers
                "train#dataloader#shuffle": False,
                "train#dataloader#sampler": {
                    "_target_": "torch.utils.data.RandomSampler",
                    "data_source": "@train#dataset",
                },
                "train#trainer#max_epochs": 1,
            },
        )
        parser["train#dataloader#sampler#num_samples"] = parser.get_parsed_content("batch_size") * (warmup + iterations)
        trainer = parser.get_parsed_content("train#trainer")
        stamps: list[float] = []  # after the warm-up and after the last iteration; no synchronisation in between,
        # so that the host queues the next batch while the device computes, as in training

        def stamp(_) -> None:  # noqa: ANN001
            synchronize(trainer.state.device)
            stamps.append(time.perf_counter())

        trainer.add_event_handler(Events.ITERATION_COMPLETED(once=warmup), stamp)
        trainer.add_event_handler(Events.COMPLETED, stamp)
        trainer.run()
    per_batch = parser.get_parsed_content("batch_size")
    if parser.get_parsed_content("spatial_dims") == 2:
        per_batch *= parser.get_parsed_content("num_slices")
    pipeline_rate = per_batch * iterations / (stamps[1] - stamps[0])

    batch = next(iter(parser.get_parsed_content("train#dataloader")))
    image, label = trainer.prepare_batch(batch, trainer.state.device, trainer.non_blocking)
    for step in range(warmup + iterations):
        if step == warmup:
            synchronize(trainer.state.device)
            start = time.perf_counter()
        network_step(trainer, image, label)
    synchronize(trainer.state.device)
    network_rate = per_batch * iterations / (time.perf_counter() - start)
    unit = "slices/s" if parser.get_parsed_content("spatial_dims") == 2 else "volumes/s"
    precision = resolve_precision(trainer.state.device, parser.get_parsed_content("amp"))
    return {
        "device": str(trainer.state.device),
        "precision": precision.name,
        "precision_reason": precision.reason,
        "threads": torch.get_num_threads(),
        "train_configs": list(train_configs),
        "batch": list(image.shape),
        "unit": unit,
        "pipeline_rate": pipeline_rate,
        "network_only_rate": network_rate,
        "pipeline_fraction": pipeline_rate / network_rate,
        "peak_memory_mb": _peak_rss_mb(),
        "peak_gpu_memory_mb": _peak_gpu_mb(trainer.state.device),
    }


def _in_fresh_process(fn, *args) -> dict:  # noqa: ANN001
    """Run ``fn(*args)`` in a new process (its own peak memory) and return its result."""
    with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def _table(results: dict) -> str:
    machine = results["machine"]
    lines = [
        f"CPU: {machine['cpu_capability']}; native bf16 on the CPU: {'yes' if machine['cpu_native_bf16'] else 'no'}"
    ]
    lines += [f"{'measurement':<34}{'device':<8}{'value':>12}  unit", "-" * 64]
    for device, r in results["inference"].items():
        lines.append(f"{'inference precision':<34}{device:<8}{r['precision']:>12}")
        for stage, sec in r["seconds"].items():
            lines.append(f"{'inference ' + stage:<34}{device:<8}{sec:>12.3f}  s")
        lines.append(f"{'inference total per patient':<34}{device:<8}{r['total_seconds']:>12.3f}  s")
        lines.append(f"{'inference not in the network':<34}{device:<8}{100 * r['non_network_share']:>11.1f}%")
        lines.append(f"{'inference peak memory':<34}{device:<8}{r['peak_memory_mb']:>12.0f}  MB (host)")
        if r["peak_gpu_memory_mb"] is not None:
            lines.append(f"{'inference peak GPU memory':<34}{device:<8}{r['peak_gpu_memory_mb']:>12.0f}  MB")
    for device, r in results["training"].items():
        lines.append(f"{'training precision':<34}{device:<8}{r['precision']:>12}")
        lines.append(f"{'training, full pipeline':<34}{device:<8}{r['pipeline_rate']:>12.1f}  {r['unit']}")
        lines.append(f"{'training, network only':<34}{device:<8}{r['network_only_rate']:>12.1f}  {r['unit']}")
        lines.append(f"{'pipeline / network-only':<34}{device:<8}{100 * r['pipeline_fraction']:>11.1f}%")
        lines.append(f"{'training peak memory':<34}{device:<8}{r['peak_memory_mb']:>12.0f}  MB (host)")
        if r["peak_gpu_memory_mb"] is not None:
            lines.append(f"{'training peak GPU memory':<34}{device:<8}{r['peak_gpu_memory_mb']:>12.0f}  MB")
    return "\n".join(lines)


def run_benchmark(
    bundle: str | Path = "bundles/openkbp_dose",
    data: str | Path | None = None,
    out: str | Path = "benchmark.json",
    device: str | None = None,
    repeats: int = 3,
    iterations: int = 20,
    train_configs: tuple[str, ...] = (),
    amp: bool | str = "auto",
) -> dict:
    """Benchmark inference (and training when ``data`` holds a dataset with doses); print a table, write JSON.

    Args:
        bundle: bundle folder with trained weights.
        data: an OpenKBP NIfTI dataset folder (``dataset.json``); default: the example patient
            (``examples/`` two levels above the bundle, as in the repository), inference only.
        out: JSON file to write.
        device: ``cpu`` or ``cuda``; default: the CPU, and CUDA when available.
        repeats: timed repetitions of inference (after one warm-up run).
        iterations: timed training iterations (after 3 warm-up iterations).
        train_configs: config files layered on the bundle's ``train.json`` for the training measurement.
        amp: precision, ``"auto"`` (bf16 autocast where the device computes bf16 natively), ``True`` or ``False``
            (see :mod:`monai_dose.precision`); the result names the precision each measurement ran in.
    """
    devices = [str(as_device(device))] if device else ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    if data is not None and (Path(data) / "dataset.json").is_file():
        patient = load_openkbp_datalist(data, "validation")[0]
    elif data is not None:
        patient = patient_folder_datalist(data)[0]
    else:
        examples = Path(bundle).resolve().parents[1] / "examples"  # the repository's, two levels above the bundle
        if not examples.is_dir():
            raise FileNotFoundError(
                f"no example patient beside the bundle {bundle} (looked in {examples}): give a data folder (--data)"
            )
        patient = patient_folder_datalist(examples)[0]
    results: dict = {
        "machine": {
            "platform": platform.platform(),
            "cpu_count": os.cpu_count(),
            "cpu_capability": cpu_capability(),
            "cpu_native_bf16": native_bf16("cpu"),
            "torch": torch.__version__,
        },
        "patient": patient.get("id"),
        "inference": {},
        "training": {},
    }
    if torch.cuda.is_available():
        results["machine"]["gpu"] = torch.cuda.get_device_name(0)
    for dev in devices:
        results["inference"][dev] = _in_fresh_process(benchmark_inference, str(bundle), patient, dev, repeats, amp)
        if data is not None and (Path(data) / "dataset.json").is_file():
            results["training"][dev] = _in_fresh_process(
                benchmark_training, str(bundle), str(data), dev, iterations, 3, tuple(map(str, train_configs)), amp
            )
    print(_table(results))
    Path(out).write_text(json.dumps(results, indent=2) + "\n")
    return results
