"""Count the host-device synchronisations in training iterations of the bundle on a GPU (``prepare_batch`` and
a network step), with ``torch.cuda.set_sync_debug_mode("warn")``; prints each one's message and place.

Usage::

    python scripts/check_gpu_sync.py --data ../shared/data/openkbp
"""

from __future__ import annotations

import argparse
import tempfile
import warnings

import torch
from monai.bundle import ConfigParser


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", required=True, help="OpenKBP NIfTI dataset folder")
    parser.add_argument(
        "--config",
        nargs="+",
        default=["bundles/openkbp_dose/configs/train.json", "bundles/openkbp_dose/configs/train_gpu.json"],
    )
    parser.add_argument("--iterations", type=int, default=2, help="checked iterations (after 2 warm-up ones)")
    args = parser.parse_args()
    config = ConfigParser()
    config.read_config(args.config)
    config.update(
        {
            "bundle_root": tempfile.mkdtemp(),
            "dataset_dir": args.data,
            "device": "$torch.device('cuda')",
            "num_train": 8,
            "num_workers": 2,
            "train#handlers": [],
        }
    )
    trainer = config.get_parsed_content("train#trainer")
    batches = iter(config.get_parsed_content("train#dataloader"))
    device = torch.device("cuda")

    def step() -> None:
        image, label = trainer.prepare_batch(next(batches), device, True)
        trainer.optimizer.zero_grad(set_to_none=True)
        trainer.loss_function(trainer.network(image), label).backward()
        trainer.optimizer.step()

    for _ in range(2):
        step()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        for _ in range(args.iterations):
            step()
        torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message)]
    print(f"synchronising calls in {args.iterations} iterations: {len(syncs)}")
    for w in syncs:
        print(f"  {w.filename}:{w.lineno}: {w.message}")


if __name__ == "__main__":
    main()
