"""Shared fixtures: where the real data lives, and skips when it does not."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("MONAI_DOSE_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


def _require(path: Path) -> Path:
    if not path.exists():
        pytest.skip(f"{path} not available")
    return path


@pytest.fixture(scope="session")
def openkbp_dir() -> Path:
    """The OpenKBP NIfTI dataset (../shared/data/openkbp)."""
    return _require(SHARED_DATA / "openkbp")


@pytest.fixture(scope="session")
def openkbp_csv_dir() -> Path:
    """Three patients in the original OpenKBP CSV format."""
    return _require(SHARED_DATA / "openkbp-csv-sample")


@pytest.fixture(scope="session")
def oracle_dir() -> Path:
    """Predictions and the official evaluator's scores for five validation patients."""
    return _require(SHARED_DATA / "openkbp-metric-oracle")


@pytest.fixture(scope="session")
def dlmi_dir() -> Path:
    """Samples of the DLMI 2D slice dataset."""
    return _require(SHARED_DATA / "dlmi-2d-sample")
