"""Launches an :class:`~qcompiler.plugins.aot.AotKernel` from its PTX through CuPy, as TensorRT would.

This is the plugin boundary tested for real without TensorRT: the module is loaded from the PTX text
(``cuModuleLoadData``), the kernel gets exactly the declared block, grid, dynamic shared memory and
parameter list (tensor pointers, int32 scalars evaluated from the runtime symbols, null scratch
pointers), on the caller's torch stream. No Triton runtime is involved.
"""

from __future__ import annotations

import importlib.util
import logging
from functools import lru_cache
from typing import Any

import numpy as np

from .aot import AotKernel

__all__ = ["load_kernel", "launch", "allow_dynamic_shared", "cuda_kernels_available", "sm90a_kernels_available"]

logger = logging.getLogger(__name__)

_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8  # CUfunction_attribute value
_MODULES: dict[tuple[str, int], Any] = {}  # (kernel name, hash of ptx) -> (module, function); loading is slow


@lru_cache(maxsize=1)
def cuda_kernels_available() -> bool:
    """The hand-written CUDA C++ kernels need NVRTC (to compile) and CuPy (to launch the PTX)."""
    from .nvrtc import NvrtcError, nvrtc_version

    try:
        nvrtc_version()
    except NvrtcError:
        return False
    return importlib.util.find_spec("cupy") is not None


@lru_cache(maxsize=8)
def sm90a_kernels_available(device: int) -> bool:
    """The wgmma kernels' PTX targets sm_90a: Hopper only."""
    import torch

    return cuda_kernels_available() and torch.cuda.get_device_capability(device) == (9, 0)


def allow_dynamic_shared(func, nbytes: int) -> None:
    """Lets a CuPy function launch with ``nbytes`` of dynamic shared memory: above the 48 KiB default a kernel must
    opt in."""
    import cupy

    if nbytes > 48 * 1024:
        cupy.cuda.driver.funcSetAttribute(func.ptr, _CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES, nbytes)


def load_kernel(kernel: AotKernel):
    """Loads the PTX module (cached) and returns the CuPy function with its shared-memory limit raised."""
    import cupy

    key = (kernel.kernel_name, hash(kernel.ptx))
    if key not in _MODULES:
        module = cupy.cuda.function.Module()
        module.load(kernel.ptx.encode())
        func = module.get_function(kernel.kernel_name)
        allow_dynamic_shared(func, kernel.shared_mem)
        _MODULES[key] = (module, func)
    return _MODULES[key][1]


def launch(kernel: AotKernel, tensors: dict[str, Any], env: dict[str, int], stream: Any = None) -> None:
    """Launches ``kernel`` with tensors by op name and runtime symbols ``env`` (e.g. {"M": 17}).

    Args:
        kernel: from :func:`qcompiler.plugins.aot.build`.
        tensors: op input/output name -> torch tensor (CUDA, contiguous) for every "in"/"out" parameter.
        env: runtime symbol values used by the grid and scalar expressions.
        stream: a torch.cuda.Stream (default: the current stream).

    Raises:
        ValueError: a missing or misaligned tensor, or a scalar that does not fit int32.
    """
    import cupy
    import torch

    args = []
    for name, kind, source in kernel.params:
        if kind in ("in", "out"):
            t = tensors.get(source)
            if t is None:
                raise ValueError(f"{kernel.kernel_name}: tensor {source!r} (parameter {name}) was not given")
            if not t.is_cuda or not t.is_contiguous():
                raise ValueError(f"{kernel.kernel_name}: tensor {source!r} must be a contiguous CUDA tensor")
            if t.data_ptr() % 16:
                raise ValueError(f"{kernel.kernel_name}: tensor {source!r} is not 16-byte aligned (compiled assumption)")
            args.append(np.uint64(t.data_ptr()))
        elif kind == "i32":
            value = int(source.evaluate(env))
            if not -(2**31) <= value < 2**31:
                raise ValueError(f"{kernel.kernel_name}: scalar {name}={value} does not fit int32")
            args.append(np.int32(value))
        else:  # Triton's scratch pointers: never dereferenced (compile_kernel refused scratch users)
            args.append(np.uint64(0))
    grid = tuple(int(g.evaluate(env)) for g in kernel.grid)
    if min(grid) == 0:
        return
    func = load_kernel(kernel)
    torch_stream = stream or torch.cuda.current_stream()
    with cupy.cuda.Stream.from_external(torch_stream) if hasattr(cupy.cuda.Stream, "from_external") \
            else cupy.cuda.ExternalStream(torch_stream.cuda_stream):
        func(grid, kernel.block, tuple(args), shared_mem=kernel.shared_mem)
