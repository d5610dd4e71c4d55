"""
The dtype to run OISA in. `resolve_dtype("auto", device)` picks bfloat16 on CUDA and on CPUs that multiply bfloat16
matrices in hardware, float32 elsewhere; explicit dtypes pass through.
"""

import functools
import logging
import sys
from pathlib import Path

import torch


logger = logging.getLogger(__name__)

# CPU features for bfloat16 matrix products: AMX-BF16 tiles (Intel Sapphire Rapids and later), AVX512-BF16 dot
# products (Intel Cooper Lake and later, AMD Zen 4 and later), and on Arm the BF16 extension with its BFMMLA matrix
# multiply (Neoverse V1/N2/V2, AWS Graviton 3 and later, Apple M2 and later). Names as torch.cpu.get_capabilities()
# and Linux's /proc/cpuinfo spell them.
BF16_MATMUL_FEATURES = ("amx_bf16", "avx512_bf16", "bf16")

_CPUINFO = Path("/proc/cpuinfo")


def cpu_features() -> set[str]:
    """
    The instruction-set features of this CPU, lower case: from `torch.cpu.get_capabilities()` (cpuinfo, any OS) where
    torch has it, else from /proc/cpuinfo (Linux), else none.
    """
    get_capabilities = getattr(torch.cpu, "get_capabilities", None)
    if get_capabilities is not None:
        return {name.lower() for name, present in get_capabilities().items() if present is True}
    try:
        return parse_cpuinfo_flags(_CPUINFO.read_text())
    except OSError:
        return set()


def parse_cpuinfo_flags(cpuinfo: str) -> set[str]:
    """The feature names of /proc/cpuinfo's `flags` (x86) or `Features` (Arm) lines."""
    flags = set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.lower().split())
    return flags


@functools.cache
def cpu_has_bf16_matmul() -> bool:
    """Whether this CPU multiplies bfloat16 matrices in hardware (`BF16_MATMUL_FEATURES`); False when unknown."""
    if sys.platform == "darwin":
        # torch's float32 matrix products go through Apple's Accelerate there and its bfloat16 ones do not, so an M2's
        # BF16 extension is no reason to leave float32
        return False
    return any(feature in cpu_features() for feature in BF16_MATMUL_FEATURES)


def resolve_dtype(dtype: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """
    The torch dtype that `dtype` ("auto", a floating dtype's name such as "float32" or "bfloat16", or a torch.dtype)
    stands for on `device`. "auto" is bfloat16 on CUDA and on a CPU with bfloat16 matrix units (`cpu_has_bf16_matmul`),
    float32 otherwise; the choice is logged once per device type and dtype.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype != "auto":
        resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else None
        if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
            raise ValueError(f"dtype must be 'auto', a floating torch dtype or its name, got {dtype!r}.")
        return resolved
    device_type = torch.device(device).type
    if device_type == "cuda":
        resolved, reason = torch.bfloat16, "CUDA"
    elif device_type == "cpu" and cpu_has_bf16_matmul():
        resolved, reason = torch.bfloat16, "a CPU with bfloat16 matrix units"
    elif device_type == "cpu":
        resolved, reason = torch.float32, "a CPU without bfloat16 matrix units"
    else:
        resolved, reason = torch.float32, f"{device_type}, where only float32 is chosen automatically"
    _log_choice(device_type, resolved, reason)
    return resolved


@functools.cache
def _log_choice(device_type: str, dtype: torch.dtype, reason: str) -> None:
    logger.info("dtype='auto' on %s: %s (%s).", device_type, str(dtype).removeprefix("torch."), reason)
