"""Time the parts of one training step of the bundle: loading a batch (slice sampling and collation, in the
training process), the trainer's ``prepare_batch`` (augmentation, masked dose, input assembly) and the network
step, each averaged over ``--repeats`` batches (with 2 threads on the CPU). On a GPU, ``--check-sync`` also
counts the host-device synchronisations of ``prepare_batch`` and the network step over two batches
(``torch.cuda.set_sync_debug_mode("warn")``) and prints where each one happens.

Usage::

    python scripts/profile_training_batch.py --data ../shared/data/openkbp
    python scripts/profile_training_batch.py --data ../shared/data/openkbp --device cuda --check-sync \\
        --config bundles/openkbp_dose/configs/train.json bundles/openkbp_dose/configs/train_gpu.json
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import torch

from monai_dose.benchmark import measurement_config, network_step, synchronize


def count_synchronisations(trainer, batches: list, device: torch.device) -> None:  # noqa: ANN001
    """Print the synchronising CUDA calls of ``prepare_batch`` and a network step on each of ``batches``."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        for batch in batches:
            network_step(trainer, *trainer.prepare_batch(batch, device, True))
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    print(f"synchronising calls in {len(batches)} iterations: {len(syncs)}")
    for w in syncs:
        print(f"  {w.filename}:{w.lineno}: {w.message}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="OpenKBP NIfTI dataset folder")
    parser.add_argument("--config", nargs="+", default=["bundles/openkbp_dose/configs/train.json"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--check-sync", action="store_true", help="count host-device synchronisations (CUDA)")
    args = parser.parse_args()
    device = torch.device(args.device)
    if args.check_sync and device.type != "cuda":
        parser.error("--check-sync needs --device cuda")
    if device.type == "cpu":
        torch.set_num_threads(2)
    config = measurement_config(args.config, args.data, device, tempfile.mkdtemp(), num_workers=0)
    trainer = config.get_parsed_content("train#trainer")
    loader = config.get_parsed_content("train#dataloader")
    for _ in loader:  # warm-up pass
        pass
    start = time.perf_counter()
    batches = [b for _ in range(-(-args.repeats // len(loader))) for b in loader][: args.repeats]
    load_ms = (time.perf_counter() - start) / len(batches) * 1000
    trainer.prepare_batch(batches[0], device)
    synchronize(device)
    start = time.perf_counter()
    prepared = [trainer.prepare_batch(b, device) for b in batches]
    synchronize(device)
    prepare_ms = (time.perf_counter() - start) / len(batches) * 1000
    for step, (image, label) in enumerate([prepared[0]] * 3 + prepared):
        if step == 3:
            synchronize(device)
            start = time.perf_counter()
        network_step(trainer, image, label)
    synchronize(device)
    step_ms = (time.perf_counter() - start) / len(prepared) * 1000
    print(
        f"per batch of {prepared[0][0].shape[0]} slices: load {load_ms:.1f} ms, prepare_batch {prepare_ms:.1f} ms, "
        f"network step {step_ms:.1f} ms"
    )
    if args.check_sync:
        count_synchronisations(trainer, batches[:2], device)


if __name__ == "__main__":
    main()
