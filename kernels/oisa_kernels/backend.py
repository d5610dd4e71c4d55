"""
Building, loading and choosing the multi-scale deformable attention backend.

The compiled kernels are built on first use with `torch.utils.cpp_extension.load` (JIT, local compiler, no network)
into `<cache>/<torch>-py<version>-<cpu-<host>|cuda>-src<sources' folder>`, where `<cache>` is `$OISA_KERNELS_CACHE` or
`${XDG_CACHE_HOME:-~/.cache}/oisa_kernels`; later processes reuse the build. The environment variable
`OISA_MSDA_BACKEND` (`auto`, `torch`, `cpu` or `cuda`) picks the path: `auto` (the default) uses the compiled kernels of
the tensors' device when they build and otherwise the PyTorch reference, with one logged warning; a forced backend
that cannot run raises instead.
"""

import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
from pathlib import Path

import torch


logger = logging.getLogger(__name__)

ENV_VAR = "OISA_MSDA_BACKEND"
CHOICES = ("auto", "torch", "cpu", "cuda")
COMPILED = ("cpu", "cuda")

_CSRC = Path(__file__).resolve().parent / "csrc"
_SOURCES = {"cpu": "ms_deform_attn_cpu.cpp", "cuda": "ms_deform_attn_cuda.cu"}
_LOCK = threading.Lock()
_LOADED: dict[str, bool] = {}
_FAILURES: dict[str, str] = {}
_WARNED: set[str] = set()
_last_backend: str | None = None


def requested_backend() -> str:
    """The backend asked for by `OISA_MSDA_BACKEND` (default `auto`)."""
    requested = os.environ.get(ENV_VAR, "auto").strip().lower() or "auto"
    if requested not in CHOICES:
        raise ValueError(f"{ENV_VAR}={requested!r} is not one of {', '.join(CHOICES)}.")
    return requested


def build_directory(kind: str) -> Path:
    """
    Where the `kind` ('cpu' or 'cuda') library is built. Binaries depend on the torch and Python versions, and the CPU
    one on the host's instruction set, since it is tuned for it (a shared home directory may serve other machines).
    The sources' folder is part of the key too: two installs or checkouts on one machine would otherwise rebuild over
    each other's library whenever their sources differ.
    """
    root = os.environ.get("OISA_KERNELS_CACHE")
    if root is None:
        root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "oisa_kernels"
    version = f"{torch.__version__}-py{sys.version_info.major}{sys.version_info.minor}-{kind}"
    if kind == "cpu":
        version += f"-{_host_tag()}"
    version += "-src" + hashlib.sha1(str(_CSRC).encode()).hexdigest()[:8]
    return Path(root) / version


def _host_tag() -> str:
    """A short fingerprint of the CPU model and its instruction-set extensions."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            lines = cpuinfo.read().splitlines()
    except OSError:
        return platform.machine() or "host"
    keys = ("model name", "flags", "Features", "CPU implementer", "CPU part")
    description = sorted({line for line in lines if line.split(":")[0].strip() in keys})
    return platform.machine() + "-" + hashlib.sha1("\n".join(description).encode()).hexdigest()[:10]


def _missing_tool(kind: str) -> str | None:
    """Why the `kind` library cannot be built here, or None when the tools are present."""
    from torch.utils import cpp_extension

    if kind == "cuda":
        if not torch.cuda.is_available():
            return "CUDA is not available to torch"
        if cpp_extension.CUDA_HOME is None:
            return "no CUDA toolkit was found (set CUDA_HOME or put nvcc on PATH)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"no C++ compiler ({compiler}) was found"
    if shutil.which("ninja") is None:
        # the `ninja` wheel installs its binary next to the interpreter, which is not on PATH unless the
        # environment is activated, and cpp_extension looks for it on PATH
        try:
            import ninja
        except ImportError:
            return "ninja was not found (pip install ninja)"
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")
    return None


def _build(kind: str) -> None:
    from torch.utils import cpp_extension

    directory = build_directory(kind)
    directory.mkdir(parents=True, exist_ok=True)
    if kind == "cpu":
        # -march=native lets the channel loops use the host's widest vectors (AVX2 halves the forward time
        # against the SSE2 baseline); the build directory is per host type for that reason
        flags = {"extra_cflags": ["-O3", "-march=native", "-fopenmp"], "extra_ldflags": ["-fopenmp"]}
    else:
        flags = {"extra_cflags": ["-O3"], "extra_cuda_cflags": ["-O3"]}
    cpp_extension.load(
        name=f"oisa_msda_{kind}",
        sources=[str(_CSRC / _SOURCES[kind])],
        extra_include_paths=[str(_CSRC)],
        build_directory=str(directory),
        is_python_module=False,
        verbose=False,
        **flags,
    )


def load_extension(kind: str) -> bool:
    """Builds (the first time) and loads the `kind` ('cpu' or 'cuda') kernels; True when they are usable."""
    if kind not in COMPILED:
        raise ValueError(f"No compiled kernels for {kind!r}; expected one of {COMPILED}.")
    with _LOCK:
        if kind not in _LOADED:
            failure = _missing_tool(kind)
            if failure is None:
                try:
                    _build(kind)
                except Exception as error:  # compiler, linker and loader errors all mean "use the reference"
                    failure = f"building the {kind} kernels failed: {error}"
            _LOADED[kind] = failure is None
            if failure is not None:
                _FAILURES[kind] = failure
        return _LOADED[kind]


def _tail(text: str, limit: int = 2000) -> str:
    return text if len(text) <= limit else "..." + text[-limit:]


def load_failure(kind: str) -> str | None:
    """Why the `kind` kernels could not be loaded, or None when they loaded or were not tried yet."""
    return _FAILURES.get(kind)


def available_backends() -> list[str]:
    """The backends that can run in this process: always 'torch', plus 'cpu' and 'cuda' when they build and load."""
    usable = [kind for kind in COMPILED if (kind == "cpu" or torch.cuda.is_available()) and load_extension(kind)]
    return ["torch", *usable]


def last_backend() -> str | None:
    """The backend chosen by the latest `ms_deform_attn` call (or trace), None before the first."""
    return _last_backend


@torch.compiler.assume_constant_result
def backend_for(device_type: str) -> str:
    """
    The backend that `ms_deform_attn` uses for tensors on `device_type`: 'torch' (the PyTorch reference), 'cpu' or
    'cuda' (the compiled kernels) or 'meta' (the operator's shape function, for meta tensors). Builds the kernels the
    first time. `torch.compile` evaluates it once while tracing and keeps the answer.
    """
    global _last_backend
    requested = requested_backend()
    if requested == "torch":
        backend = "torch"
    elif device_type == "meta":
        backend = "meta"
    elif requested == "auto":
        backend = device_type if device_type in COMPILED and load_extension(device_type) else "torch"
        if backend == "torch" and device_type not in _WARNED:
            _WARNED.add(device_type)
            reason = load_failure(device_type) or f"there are no compiled kernels for {device_type} tensors"
            # compiler output can run to pages; its end holds the error
            logger.warning(
                "oisa_kernels: using the PyTorch multi-scale deformable attention because %s.", _tail(reason)
            )
    elif requested != device_type:
        raise ValueError(f"{ENV_VAR}={requested} cannot run on {device_type} tensors.")
    elif not load_extension(requested):
        raise RuntimeError(f"{ENV_VAR}={requested}, but {load_failure(requested)}.")
    else:
        backend = requested
    _last_backend = backend
    return backend
