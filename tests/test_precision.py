"""The precision policy: bf16 autocast where the device computes bf16 natively, float32 elsewhere, overrides
honoured, and the same decision in training, validation and inference (the CPU capability is mocked both ways)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser

from monai_dose import precision
from monai_dose.inference import DosePredictor
from monai_dose.networks import DCNN
from monai_dose.precision import parse_amp, resolve_precision

CONFIGS = Path(__file__).resolve().parents[1] / "bundles" / "openkbp_dose" / "configs"


@pytest.fixture(params=[True, False], ids=["native_bf16", "emulated_bf16"])
def native(request, monkeypatch) -> bool:
    """A CPU with (``avx512_bf16``) or without native bf16, and fresh log-once state."""
    monkeypatch.setattr(precision, "cpu_bf16_flags", lambda: ("avx512_bf16",) if request.param else ())
    precision._log_once.cache_clear()
    return request.param


def test_auto_follows_the_hardware(native, caplog):
    with caplog.at_level(logging.INFO, logger="monai_dose.precision"):
        chosen = resolve_precision("cpu", "auto")
        resolve_precision("cpu", "auto")
    assert chosen.autocast is native
    assert chosen.dtype == (torch.bfloat16 if native else torch.float32)
    expected = "with native bf16: running in bfloat16 autocast" if native else "without native bf16: running in float32"
    assert [r.getMessage().endswith(expected) for r in caplog.records] == [True]  # logged once, in words


@pytest.mark.parametrize("amp", [True, "true", False, "false"])
def test_explicit_override_is_honoured(native, amp, caplog):
    with caplog.at_level(logging.INFO, logger="monai_dose.precision"):
        chosen = resolve_precision("cpu", amp)
    assert chosen.autocast is parse_amp(amp)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    if chosen.autocast and not native:
        assert len(warnings) == 1 and "emulates bfloat16" in warnings[0] and "30-40x slower" in warnings[0]
    else:
        assert warnings == []


def test_cuda_asks_torch(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    for supported in (True, False):
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, s=supported: s)
        assert resolve_precision("cuda", "auto").autocast is supported


def test_bad_amp_value():
    with pytest.raises(ValueError, match="amp must be one of auto, true, false, got 'yes'"):
        parse_amp("yes")


def test_one_decision_for_training_validation_and_inference(native):
    """train.json's network (training and validation) and its batch dtype, and DosePredictor, follow the policy."""
    parser = ConfigParser()
    parser.read_config(CONFIGS / "train.json")
    parser.update({"device": torch.device("cpu"), "dataset_dir": "unused"})
    assert parser.get_parsed_content("dose_model").amp is native
    assert parser.get_parsed_content("train#trainer#prepare_batch").dose_input.dtype == (
        torch.bfloat16 if native else torch.float32
    )
    assert DosePredictor(DCNN(2, 12, 1, channels=(4, 8)), device="cpu").precision.autocast is native
    assert DosePredictor(DCNN(2, 12, 1, channels=(4, 8)), device="cpu", amp=False).precision.autocast is False
