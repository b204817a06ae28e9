"""monai_dose: MONAI-based radiotherapy dose prediction (OpenKBP), with OpenKBP scores and DICOM RT I/O."""

from . import data, engines, evaluation, inference, inferers, metrics, networks, transforms
from .inference import DosePredictor

__version__ = "0.1.0"
__all__ = [
    "DosePredictor",
    "__version__",
    "data",
    "engines",
    "evaluation",
    "inference",
    "inferers",
    "metrics",
    "networks",
    "transforms",
]
