"""The reference method's own data, the DLMI 2023 2D slices, through the bundle: ``train_dlmi.json`` and
``inference_dlmi.json`` layered on ``train.json``, on the CPU with a tiny network."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from monai.bundle import ConfigWorkflow
from monai.networks import eval_mode

from monai_dose.data import load_dlmi_datalist
from monai_dose.engines import bare_network

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "openkbp_dose" / "configs"
TRAIN = [str(CONFIGS / "train.json"), str(CONFIGS / "train_dlmi.json")]
TINY = {"network_def#channels": [4, 8, 16], "network_def#dilations": [2, 3]}


def run_workflow(config_file: list[str], workflow_type: str | None, **overrides) -> ConfigWorkflow:
    """Initialise ``config_file`` with ``overrides``, check MONAI's properties of ``workflow_type``, run it."""
    workflow = ConfigWorkflow(
        config_file=config_file,
        meta_file=str(CONFIGS / "metadata.json"),
        logging_file=False,
        workflow_type=workflow_type,
        **overrides,
    )
    workflow.initialize()
    assert workflow.check_properties() in (None, [])
    workflow.run()
    workflow.finalize()
    return workflow


def test_dlmi_training_reports_pixel_mae_and_inference_writes_samples(dlmi_dir, tmp_path):
    """One epoch of 2 steps on 8 samples: validation reports the DLMI metric (mean absolute error over all 128 x 128
    pixels against the sample's dose.npy, averaged over the samples) and saves the model; inference writes every test
    sample's dose.npy in the DLMI orientation, >= 0 and zero outside its possible-dose mask. The network's output is
    raised by 10 Gy first, so that its dose is positive wherever the mask lets it through (an untrained network's
    is 0 everywhere)."""
    run = {"bundle_root": str(tmp_path), "ckpt_dir": str(tmp_path / "models"), "log_dir": str(tmp_path / "logs")}
    small = {"num_train": 8, "batch_size": 4, "epochs": 1, "val_interval": 1, "cache_workers": 0}
    train = run_workflow(TRAIN, "train", dataset_dir=str(dlmi_dir), **run, **small, **TINY)

    evaluator = train.parser.get_parsed_content("validate#evaluator")
    assert np.isfinite(evaluator.state.metrics["val_mae"])
    model = tmp_path / "models" / "model.pt"
    assert model.is_file()

    network, dataset = (train.parser.get_parsed_content(k) for k in ("validated_network", "validate#dataset"))
    with eval_mode(network):
        bare_network(network).head.conv.bias += 10.0  # a positive dose wherever the mask lets it through
        evaluator.run()
        errors = [
            np.abs(network(item["image"][None]).numpy()[0, 0].T - np.load(sample["dose"])).mean()
            for item, sample in zip(dataset, load_dlmi_datalist(dlmi_dir, "validation"), strict=True)
        ]
    np.testing.assert_allclose(evaluator.state.metrics["val_mae"], np.mean(errors), rtol=1e-4)
    torch.save(bare_network(network).state_dict(), model)

    out = tmp_path / "predictions"
    infer = {"dataset_dir": str(dlmi_dir), "output_dir": str(out), "cache_workers": 0}
    run_workflow([*TRAIN, str(CONFIGS / "inference_dlmi.json")], None, **infer, **run, **TINY)
    for sample in load_dlmi_datalist(dlmi_dir, "test"):
        dose, mask = np.load(out / sample["id"] / "dose.npy"), np.load(sample["possible_dose_mask"])
        assert dose.shape == (128, 128) and dose.dtype == np.float32
        assert np.array_equal(dose > 0, mask > 0)
    assert not list(out.rglob(".tmp*"))
