"""Time the parts of one training step of the bundle: loading a batch (slice sampling and collation, in the
training process), the trainer's ``prepare_batch`` (augmentation, masked dose, input assembly) and the network
step, each averaged over ``--repeats`` batches (with 2 threads on the CPU).

Usage::

    python scripts/profile_training_batch.py --data ../shared/data/openkbp
    python scripts/profile_training_batch.py --data ../shared/data/openkbp --device cuda \
        --config bundles/openkbp_dose/configs/train.json bundles/openkbp_dose/configs/train_gpu.json
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch
from monai.bundle import ConfigParser


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="OpenKBP NIfTI dataset folder")
    parser.add_argument("--config", nargs="+", default=["bundles/openkbp_dose/configs/train.json"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cpu":
        torch.set_num_threads(2)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    config = ConfigParser()
    config.read_config(args.config)
    config.update(
        {
            "bundle_root": tempfile.mkdtemp(),
            "dataset_dir": args.data,
            "device": f"$torch.device('{device}')",
            "num_train": 8,
            "num_workers": 0,
            "train#handlers": [],
        }
    )
    trainer = config.get_parsed_content("train#trainer")
    loader = config.get_parsed_content("train#dataloader")
    for _ in loader:  # warm-up pass
        pass
    start = time.perf_counter()
    batches = [b for _ in range(-(-args.repeats // len(loader))) for b in loader][: args.repeats]
    load_ms = (time.perf_counter() - start) / len(batches) * 1000
    trainer.prepare_batch(batches[0], device)
    sync()
    start = time.perf_counter()
    prepared = [trainer.prepare_batch(b, device) for b in batches]
    sync()
    prepare_ms = (time.perf_counter() - start) / len(batches) * 1000
    network, optimizer, loss_fn = trainer.network, trainer.optimizer, trainer.loss_function
    for step, (image, label) in enumerate([prepared[0]] * 3 + prepared):
        if step == 3:
            sync()
            start = time.perf_counter()
        optimizer.zero_grad(set_to_none=True)
        loss_fn(network(image), label).backward()
        optimizer.step()
    sync()
    step_ms = (time.perf_counter() - start) / len(prepared) * 1000
    print(
        f"per batch of {prepared[0][0].shape[0]} slices: load {load_ms:.1f} ms, prepare_batch {prepare_ms:.1f} ms, "
        f"network step {step_ms:.1f} ms"
    )


if __name__ == "__main__":
    main()
