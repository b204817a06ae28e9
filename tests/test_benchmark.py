"""The benchmark command runs every measurement and reports them (speed itself is never asserted)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from monai_dose.cli import main
from monai_dose.inference import DosePredictor

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "openkbp_dose"


@pytest.mark.slow
def test_benchmark_reports_inference_and_training(tmp_path, openkbp_dir, capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    parser = ConfigParser()
    parser.read_config(bundle / "configs" / "inference.json")
    (bundle / "models").mkdir()
    torch.save(parser.get_parsed_content("network_def").state_dict(), bundle / "models" / "model.pt")

    out = tmp_path / "benchmark.json"
    override = tmp_path / "small_batch.json"  # layered on train.json, as configs/train_gpu.json is on a GPU
    override.write_text(json.dumps({"num_slices": 4, "num_workers": 1}))
    args = ["benchmark", "--bundle", str(bundle), "--data", str(openkbp_dir), "--out", str(out)]
    args += ["--device", "cpu", "--amp", "false", "--repeats", "1", "--iterations", "2"]
    assert main([*args, "--train-config", str(override)]) == 0
    results = json.loads(out.read_text())
    assert results["machine"]["cpu_capability"].startswith(torch.backends.cpu.get_cpu_capability())
    assert results["inference"]["cpu"]["precision"] == results["training"]["cpu"]["precision"] == "float32"
    inference = results["inference"]["cpu"]
    assert set(inference["seconds"]) == {"load", "preprocess", "network", "postprocess", "save"}
    assert all(s > 0 for s in inference["seconds"].values()) and inference["peak_memory_mb"] > 0
    network_share = inference["seconds"]["network"] / inference["total_seconds"]
    assert inference["non_network_share"] == pytest.approx(1 - network_share)
    training = results["training"]["cpu"]
    assert training["unit"] == "slices/s" and training["batch"] == [16, 45, 128, 128]  # 4 volumes x 4 slices
    assert training["train_configs"] == [str(override)]
    assert training["pipeline_rate"] > 0 and training["network_only_rate"] > 0
    table = capsys.readouterr().out
    assert "inference total per patient" in table and "pipeline / network-only" in table
    assert "inference not in the network" in table
    assert "native bf16 on the CPU" in table and "inference precision" in table


def test_device_is_a_value_not_code(tmp_path, capsys):
    """A device string is never spliced into a config expression: text that would run a shell command is an
    error naming it, from the benchmark command and from DosePredictor.from_bundle alike, and runs nothing."""
    marker = tmp_path / "ran"
    device = f"cpu') if __import__('os').system('touch {marker}') == 0 else torch.device('cpu"
    out = tmp_path / "benchmark.json"
    assert main(["benchmark", "--bundle", str(BUNDLE), "--device", device, "--out", str(out)]) == 1
    assert "is not a torch device" in capsys.readouterr().err
    with pytest.raises(ValueError, match="is not a torch device"):
        DosePredictor.from_bundle(BUNDLE, device=device)
    assert not marker.exists() and not out.exists()


def test_bundle_outside_the_repository_needs_data(tmp_path, capsys):
    """A bundle copied out of the repository has no example patient two levels above it: the error says where
    it looked and to pass the data, before anything is measured or written."""
    bundle = tmp_path / "a" / "bundle"
    shutil.copytree(BUNDLE / "configs", bundle / "configs")
    out = tmp_path / "benchmark.json"
    assert main(["benchmark", "--bundle", str(bundle), "--device", "cpu", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert "no example patient beside the bundle" in err and str(tmp_path / "examples") in err
    assert not out.exists()
