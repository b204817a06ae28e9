"""The Python examples of the READMEs run as written, from the repository root."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
READMES = (REPO / "README.md", REPO / "bundles" / "openkbp_dose" / "docs" / "README.md")


def python_blocks() -> list[str]:
    """The distinct ```python blocks of the READMEs."""
    blocks = [block for f in READMES for block in re.findall(r"```python\n(.*?)```", f.read_text(), re.DOTALL)]
    return list(dict.fromkeys(blocks))


@pytest.mark.parametrize("code", python_blocks())
def test_readme_python_runs(code, monkeypatch):
    """Each block predicts the example patient's dose with the shipped model."""
    monkeypatch.chdir(REPO)
    namespace: dict = {}
    exec(compile(code, "README", "exec"), namespace)
    dose = namespace["dose"]
    assert dose.shape == (128, 128, 128) and dose.dtype == np.float32
    assert dose.min() >= 0 and 60 < dose.max() < 90  # a 70 Gy plan
