"""CUDA C++ -> PTX with NVRTC, through ctypes (no CUDA driver, no GPU and no toolkit install needed).

The hand-written kernels (``int4_gemm_mma.py``) are compiled here ahead of time, exactly like the
Triton kernels in ``aot.py``: the PTX text is what a TensorRT plugin embeds and what the tests load
through CuPy. NVRTC comes from the pip wheel ``nvidia-cuda-nvrtc`` (CUDA 13: ``nvidia/cu13/lib``), a
CUDA toolkit (``$CUDA_HOME/lib64``) or the loader path. The PTX ISA version NVRTC writes must not be
newer than the driver that loads it: pin the wheel to the driver's CUDA minor (``==13.0.*``).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import glob
import logging
import os
import re
import sys
from functools import lru_cache

__all__ = ["NvrtcError", "compile_to_ptx", "nvrtc_version"]

logger = logging.getLogger(__name__)


class NvrtcError(RuntimeError):
    """NVRTC is missing, or the source did not compile (the message carries NVRTC's log)."""


def _candidates() -> list[str]:
    found = []
    for base in sys.path:
        found += sorted(glob.glob(os.path.join(base, "nvidia", "cu1*", "lib", "libnvrtc.so.*")), reverse=True)
        found += sorted(glob.glob(os.path.join(base, "nvidia", "cuda_nvrtc", "lib", "libnvrtc.so.*")), reverse=True)
    for home in filter(None, (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda")):
        found += sorted(glob.glob(os.path.join(home, "lib64", "libnvrtc.so*")), reverse=True)
    system = ctypes.util.find_library("nvrtc")
    if system:
        found.append(system)
    return [p for p in found if "builtins" not in p and ".alt." not in p]


@lru_cache(maxsize=1)
def _library() -> ctypes.CDLL:
    errors = []
    for path in _candidates():
        try:
            # libnvrtc dlopens its builtins by soname; a wheel's lib folder is not on the loader path.
            for builtins in glob.glob(os.path.join(os.path.dirname(path), "libnvrtc-builtins.so.*")):
                if ".alt." not in builtins:
                    ctypes.CDLL(builtins, mode=ctypes.RTLD_GLOBAL)
            lib = ctypes.CDLL(path)
        except OSError as exc:
            errors.append(f"{path}: {exc}")
            continue
        lib.nvrtcGetErrorString.restype = ctypes.c_char_p
        logger.debug("NVRTC from %s", path)
        return lib
    raise NvrtcError("NVRTC not found: pip install 'nvidia-cuda-nvrtc==13.0.*' (or set CUDA_HOME)"
                     + (f" [{'; '.join(errors)}]" if errors else ""))


def _check(lib: ctypes.CDLL, status: int, what: str) -> None:
    if status != 0:
        raise NvrtcError(f"{what}: {lib.nvrtcGetErrorString(status).decode()}")


def nvrtc_version() -> tuple[int, int]:
    """(major, minor) of the NVRTC library that :func:`compile_to_ptx` uses."""
    lib = _library()
    major, minor = ctypes.c_int(), ctypes.c_int()
    _check(lib, lib.nvrtcVersion(ctypes.byref(major), ctypes.byref(minor)), "nvrtcVersion")
    return major.value, minor.value


@lru_cache(maxsize=64)
def compile_to_ptx(source: str, name: str, options: tuple[str, ...] = ("--gpu-architecture=compute_90",),
                   ptx_version: str | None = None) -> str:
    """Compiles one CUDA C++ translation unit (no includes) and returns its PTX text.

    ``ptx_version`` (e.g. "7.8") lowers the ``.version`` NVRTC stamps (9.0 from CUDA 13, loadable only
    by CUDA 13 drivers) for a kernel that uses nothing newer, so older drivers load it too; ptxas
    rejects an instruction the declared version lacks, which the CPU tests check.

    Raises:
        NvrtcError: NVRTC is missing or the compilation failed (with the compiler log).
    """
    lib = _library()
    prog = ctypes.c_void_p()
    _check(lib, lib.nvrtcCreateProgram(ctypes.byref(prog), source.encode(), name.encode(), 0, None, None),
           "nvrtcCreateProgram")
    try:
        opts = (ctypes.c_char_p * len(options))(*(o.encode() for o in options))
        status = lib.nvrtcCompileProgram(prog, len(options), opts)
        log_size = ctypes.c_size_t()
        lib.nvrtcGetProgramLogSize(prog, ctypes.byref(log_size))
        log = ctypes.create_string_buffer(log_size.value)
        lib.nvrtcGetProgramLog(prog, log)
        if status != 0:
            raise NvrtcError(f"{name}: NVRTC failed: {log.value.decode(errors='replace').strip()}")
        size = ctypes.c_size_t()
        _check(lib, lib.nvrtcGetPTXSize(prog, ctypes.byref(size)), "nvrtcGetPTXSize")
        ptx = ctypes.create_string_buffer(size.value)
        _check(lib, lib.nvrtcGetPTX(prog, ptx), "nvrtcGetPTX")
        text = ptx.value.decode()
        if ptx_version:
            text = re.sub(r"^\.version \d+\.\d+$", f".version {ptx_version}", text, count=1, flags=re.M)
        return text
    finally:
        lib.nvrtcDestroyProgram(ctypes.byref(prog))
