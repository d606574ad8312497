"""Launches an :class:`~qcompiler.plugins.aot.AotKernel` from its PTX through CuPy, as TensorRT would.

This is the plugin boundary tested for real without TensorRT: the module is loaded from the PTX text
(``cuModuleLoadData``), the kernel gets exactly the declared block, grid, dynamic shared memory and
parameter list (tensor pointers, int32 scalars evaluated from the runtime symbols, null scratch
pointers), on the caller's torch stream. No Triton runtime is involved. A programmatic launch (PDL) goes
through the driver's ``cuLaunchKernelEx``, which CuPy does not wrap.
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
from functools import lru_cache
from typing import Any

import numpy as np

from .aot import AotKernel

__all__ = ["load_kernel", "launch", "allow_dynamic_shared", "cuda_kernels_available", "sm90a_kernels_available"]

logger = logging.getLogger(__name__)

_CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES = 8  # CUfunction_attribute value
_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # CUlaunchAttributeID value (cuda.h, CUDA 12.0 on)
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


class _LaunchAttribute(ctypes.Structure):  # CUlaunchAttribute: the id, padding to 8 bytes, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int), ("rest", ctypes.c_char * 60)]


class _LaunchConfig(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [("grid", ctypes.c_uint * 3), ("block", ctypes.c_uint * 3), ("shared_mem", ctypes.c_uint),
                ("stream", ctypes.c_void_p), ("attrs", ctypes.POINTER(_LaunchAttribute)), ("num_attrs", ctypes.c_uint)]


@lru_cache(maxsize=1)
def _launch_kernel_ex():
    """The driver's cuLaunchKernelEx: CuPy wraps no launch with attributes."""
    fn = ctypes.CDLL("libcuda.so.1").cuLaunchKernelEx
    fn.argtypes = [ctypes.POINTER(_LaunchConfig), ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p]
    fn.restype = ctypes.c_int
    return fn


def _launch_programmatic(func, grid, block, shared_mem: int, stream_handle: int, args: list) -> None:
    """Launches with programmatic stream serialization: the grid may start before the previous one in the stream
    has finished (the kernel itself waits before reading anything)."""
    values = [ctypes.c_uint64(int(a)) if isinstance(a, np.uint64) else ctypes.c_int32(int(a)) for a in args]
    pointers = (ctypes.c_void_p * len(values))(*(ctypes.addressof(v) for v in values))
    attribute = _LaunchAttribute(id=_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION, value=1)
    config = _LaunchConfig((ctypes.c_uint * 3)(*grid), (ctypes.c_uint * 3)(*block), shared_mem,
                           ctypes.c_void_p(stream_handle), ctypes.pointer(attribute), 1)
    status = _launch_kernel_ex()(ctypes.byref(config), ctypes.c_void_p(func.ptr), pointers, None)
    if status:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUresult {status}")


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


def launch(kernel: AotKernel, tensors: dict[str, Any], env: dict[str, int], stream: Any = None,
           programmatic: bool = False) -> None:
    """Launches ``kernel`` with tensors by op name and runtime symbols ``env`` (e.g. {"M": 17}).

    Args:
        kernel: from :func:`qcompiler.plugins.aot.build`.
        tensors: op input/output name -> torch tensor (CUDA, contiguous) for every "in"/"out" parameter.
        env: runtime symbol values used by the grid and scalar expressions.
        stream: a torch.cuda.Stream (default: the current stream).
        programmatic: launch with programmatic stream serialization (PDL), for kernels that declare
            ``kernel.programmatic``.

    Raises:
        ValueError: a missing or misaligned tensor, a scalar that does not fit int32, or a programmatic launch of a
            kernel that does not wait for the grids before it.
    """
    if programmatic and not kernel.programmatic:
        raise ValueError(f"{kernel.kernel_name}: reads its inputs without griddepcontrol.wait, so it cannot be "
                         "launched programmatically")
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
    if programmatic:
        _launch_programmatic(func, grid, kernel.block, kernel.shared_mem, torch_stream.cuda_stream, args)
        return
    with cupy.cuda.Stream.from_external(torch_stream) if hasattr(cupy.cuda.Stream, "from_external") \
            else cupy.cuda.ExternalStream(torch_stream.cuda_stream):
        func(grid, kernel.block, tuple(args), shared_mem=kernel.shared_mem)
