"""GPU kernels (Triton) for the qcompiler custom ops and their TensorRT plugin bindings.

``ops`` is the contract (domain, op types, attributes, layouts, shape rules) and imports nothing heavy;
the kernel modules (``int4_gemm``, ``w8a8_gemm``, ``quantize_per_token``, ``flash_attention``) need torch
and Triton, ``aot`` needs Triton, ``launch`` needs CuPy, ``tensorrt_plugins`` needs TensorRT: import them
explicitly where needed.
"""

from . import ops

__all__ = ["ops"]
