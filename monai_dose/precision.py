"""The precision policy: run the network under bfloat16 autocast only where the device computes bf16 natively.

On a CPU with AVX-512 BF16 or AMX, and on CUDA GPUs that support bf16, autocast is 2-3x faster than float32.
Elsewhere PyTorch emulates bf16 and one patient takes minutes instead of seconds (measured 30-40x on an AVX2
CPU), so ``amp="auto"`` (the default everywhere) runs float32 there. ``amp=True`` or ``False`` overrides.
"""

from __future__ import annotations

import functools
import logging
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

AMP_CHOICES = ("auto", "true", "false")
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
"""``/proc/cpuinfo`` flags of x86 CPUs that compute bf16 natively (``bf16`` among an Arm CPU's features)."""


@functools.cache
def cpu_bf16_flags() -> tuple[str, ...]:
    """The native-bf16 flags this CPU lists in ``/proc/cpuinfo`` (empty where there is none, or no such file)."""
    try:
        flags = next(
            (
                line.split(":", 1)[1].split()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if ":" in line and line.split(":", 1)[0].strip() in ("flags", "Features")
            ),
            [],
        )
    except OSError:
        return ()
    return tuple(f for f in flags if f in (*BF16_CPU_FLAGS, "bf16"))


def cpu_capability() -> str:
    """The vector instruction set PyTorch's CPU kernels use here (``torch.backends.cpu.get_cpu_capability()``),
    with the native-bf16 flags, e.g. ``"AVX512 avx512_bf16 amx_bf16"`` or ``"AVX2"``."""
    return " ".join([torch.backends.cpu.get_cpu_capability(), *cpu_bf16_flags()])


def native_bf16(device: str | torch.device) -> bool:
    """Whether ``device`` computes bfloat16 natively (not by emulation)."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return bool(cpu_bf16_flags())
    return False


@dataclass(frozen=True)
class Precision:
    """Where and how the network runs: bf16 autocast or not, and why (in words, for the log)."""

    autocast: bool
    reason: str

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the network computes in, and the one its input is assembled in."""
        return torch.bfloat16 if self.autocast else torch.float32

    @property
    def name(self) -> str:
        return "bfloat16 autocast" if self.autocast else "float32"


def parse_amp(amp: bool | str | None) -> bool | None:
    """``True``/``False`` for an explicit choice, ``None`` for ``"auto"`` (config and CLI values alike)."""
    if amp is None or isinstance(amp, bool):
        return amp
    text = str(amp).strip().lower()
    if text not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {', '.join(AMP_CHOICES)}, got {amp!r}")
    return None if text == "auto" else text == "true"


def resolve_precision(device: str | torch.device, amp: bool | str | None = "auto") -> Precision:
    """The precision to run on ``device``: with ``amp="auto"`` bf16 autocast where the device computes bf16
    natively and float32 elsewhere; ``True``/``False`` force it (forcing bf16 where it is emulated warns).

    The choice is logged once per process, in words.
    """
    device = torch.device(device)
    forced = parse_amp(amp)
    native = native_bf16(device)
    where = f"CUDA GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda" else f"{device.type.upper()}"
    if device.type == "cpu":
        where += f" ({platform.machine()}, {cpu_capability()})"
    support = "with native bf16" if native else "without native bf16"
    if forced is None:
        precision = Precision(native, f"{where} {support}: running in {'bfloat16 autocast' if native else 'float32'}")
    elif forced:
        precision = Precision(True, f"{where} {support}: bfloat16 autocast forced (amp true)")
        if not native:
            _log_once(
                logging.WARNING,
                f"amp true on {where}, which emulates bfloat16: the network runs about 30-40x slower than in "
                "float32; use amp auto or false",
            )
    else:
        precision = Precision(False, f"{where} {support}: float32 forced (amp false)")
    _log_once(logging.INFO, precision.reason)
    return precision


@functools.cache
def _log_once(level: int, message: str) -> None:
    logger.log(level, message)
