"""TensorRT bindings of the qcompiler ops through TensorRT's Python plugin API (``tensorrt.plugin``).

Each op is registered as ``qcompiler::<OpType>`` with three functions: ``register`` (output shapes and
dtypes from :func:`qcompiler.plugins.ops.infer_output_shapes`), ``autotune`` (type/format combinations
and one tactic per entry of the kernel's tactic table) and ``aot_impl`` (compiles the Triton kernel for
the configuration TensorRT hands over, through :func:`qcompiler.plugins.aot.build`, and returns the PTX
with its launch parameters and scalar arguments as TensorRT symbolic expressions). The engine embeds the
PTX: running it needs neither Python nor Triton.

Plugin input arity is fixed per op: Int4Gemm takes (X, B, scales, zero_points, bias), W8A8Gemm
(A, a_scale, B, b_scale, bias), QuantizePerToken (X, gamma, beta), FlashAttention (Q, K, V) with outputs
(O, LSE). ``qcompiler.backends.tensorrt`` materialises absent optional inputs (zero points 8, bias 0,
gamma 1, beta 0) before parsing, so one registration serves every node. aot_impl sees no tensor values,
so a materialised input is compiled in and costs one small read (zero points: N*K/(2*block) bytes).
A FlashAttention with seqlens_k or a key_mask is a plugin of its own, FlashAttentionSeqLens (Q, K, V,
seqlens_k) or FlashAttentionKeyMask (Q, K, V, key_mask) (``ops.MASKED_ATTENTION_PLUGINS``): a materialised
neutral mask would cost the unmasked attention its mask-free inner loop.

TensorRT cannot be installed on the machines this was written on: this module is written against the
documented API (TensorRT 10.x ``tensorrt.plugin``) and imported lazily; the PTX and launch parameters
it returns are tested for real by launching them through CuPy (tests/plugins/test_aot_launch_gpu.py).
"""

from __future__ import annotations

import logging

__all__ = ["register_plugins", "TACTIC_NAMES"]

logger = logging.getLogger(__name__)

_REGISTERED = False


def TACTIC_NAMES(op_type: str) -> list[str]:  # noqa: N802 - a table by op, kept callable so Triton loads lazily
    from . import aot

    if op_type == "Int4Gemm":  # every tactic; autotune offers those aot.tactics allows for the weight's shape
        from .int4_gemm import INT4_TACTICS
        return list(INT4_TACTICS) + list(aot.cuda_tactics())
    if "Attention" in op_type:  # every tactic of every FlashAttention plugin; autotune offers those that apply
        from .flash_attention import ATTN_TACTICS
        from .flash_attention_wgmma import ATTN_WGMMA_TACTICS
        from .flash_decode import ATTN_DECODE_TACTICS
        return list(ATTN_TACTICS) + list(ATTN_WGMMA_TACTICS) + list(ATTN_DECODE_TACTICS)
    dummy = {"W8A8Gemm": aot.W8A8GemmPlugin("float16", 16, 16)}.get(op_type)
    return aot.tactics(dummy) if dummy else ["default"]


def _dtype_name(trt, dtype) -> str:
    return {trt.float16: "float16", trt.bfloat16: "bfloat16", trt.float32: "float32"}[dtype]


def _to_trt(trtp, kernel, env):
    """AotKernel -> (name, ptx, KernelLaunchParams, SymIntExprs) with symbols from TensorRT shapes."""
    cdiv = getattr(trtp, "cdiv", None) or (lambda a, b: (a + b - 1) // b)
    params = trtp.KernelLaunchParams()
    gx, gy, gz = (g.evaluate(env, cdiv) for g in kernel.grid)
    params.grid_x, params.grid_y, params.grid_z = gx, gy, gz
    params.block_x = kernel.block[0]
    params.shared_mem = kernel.shared_mem
    scalars = [src for _, kind, src in kernel.params if kind == "i32"]
    extra = trtp.SymIntExprs(len(scalars))
    for i, expr in enumerate(scalars):
        extra[i] = trtp.SymInt32(expr.evaluate(env, cdiv))
    # TensorRT launches with inputs, these scalars, then outputs; Triton's two trailing scratch pointers
    # are never dereferenced (aot.compile_kernel refuses kernels that use scratch).
    return kernel.kernel_name, kernel.ptx, params, extra


def _rows(shape_expr, keep_last: int = 1):
    """Product of the leading dims (tokens) of a TensorRT shape expression."""
    dims = [shape_expr[i] for i in range(len(shape_expr) - keep_last)]
    rows = dims[0] if dims else 1
    for d in dims[1:]:
        rows = rows * d
    return rows


def register_plugins() -> None:
    """Registers the qcompiler plugins with TensorRT (idempotent): the four ops, and FlashAttention with a mask.

    Raises:
        ImportError: TensorRT (with ``tensorrt.plugin``, TensorRT >= 10.6) is not installed.
    """
    global _REGISTERED
    if _REGISTERED:
        return
    import numpy as np  # noqa: F401 - tensorrt.plugin type hints resolve numpy attributes
    import tensorrt as trt
    import tensorrt.plugin as trtp

    from . import aot
    from .ops import FLASH_ATTENTION, MASKED_ATTENTION_PLUGINS, OP_SPECS, infer_output_shapes

    def out_desc(shape, dtype):
        return trtp.from_shape_expr(tuple(shape), dtype=dtype)

    # ---------------------------------------------------------------------------------------- Int4Gemm
    @trtp.register("qcompiler::Int4Gemm")
    def _int4_desc(X: trtp.TensorDesc, B: trtp.TensorDesc, scales: trtp.TensorDesc, zero_points: trtp.TensorDesc,
                   bias: trtp.TensorDesc, K: int, N: int, block_size: int, bits: int) -> trtp.TensorDesc:
        (shape,) = infer_output_shapes("Int4Gemm", [list(X.shape_expr), None, None, None, None], {"N": N})
        return out_desc(shape, X.dtype)

    @trtp.autotune("qcompiler::Int4Gemm")
    def _int4_tune(X, B, scales, zero_points, bias, K: int, N: int, block_size: int, bits: int, outputs):
        names = TACTIC_NAMES("Int4Gemm")
        offered = aot.tactics(aot.Int4GemmPlugin("float16", N, K, block_size, True, True))
        tactics = [names.index(name) + 1 for name in offered]
        return [trtp.AutoTuneCombination("FP16|BF16, UINT8, FP16|BF16, UINT8, FP16|BF16, FP16|BF16", "LINEAR", tactics)]

    @trtp.aot_impl("qcompiler::Int4Gemm")
    def _int4_aot(X: trtp.TensorDesc, B: trtp.TensorDesc, scales: trtp.TensorDesc, zero_points: trtp.TensorDesc,
                  bias: trtp.TensorDesc, K: int, N: int, block_size: int, outputs, tactic: int):
        cfg = aot.Int4GemmPlugin(_dtype_name(trt, X.dtype), N, K, block_size, True, True,
                                 TACTIC_NAMES("Int4Gemm")[tactic - 1])
        return _to_trt(trtp, aot.build(cfg), {"M": _rows(X.shape_expr)})

    # ---------------------------------------------------------------------------------------- W8A8Gemm
    @trtp.register("qcompiler::W8A8Gemm")
    def _w8a8_desc(A: trtp.TensorDesc, a_scale: trtp.TensorDesc, B: trtp.TensorDesc, b_scale: trtp.TensorDesc,
                   bias: trtp.TensorDesc, out_dtype: int) -> trtp.TensorDesc:
        (shape,) = infer_output_shapes("W8A8Gemm", [list(A.shape_expr), None, list(B.shape_expr), None, None])
        return out_desc(shape, trt.bfloat16 if out_dtype == 16 else trt.float16)

    @trtp.autotune("qcompiler::W8A8Gemm")
    def _w8a8_tune(A, a_scale, B, b_scale, bias, outputs):
        tactics = list(range(1, len(TACTIC_NAMES("W8A8Gemm")) + 1))
        return [trtp.AutoTuneCombination("INT8, FP32, INT8, FP32, FP16|BF16, FP16|BF16", "LINEAR", tactics)]

    @trtp.aot_impl("qcompiler::W8A8Gemm")
    def _w8a8_aot(A: trtp.TensorDesc, a_scale: trtp.TensorDesc, B: trtp.TensorDesc, b_scale: trtp.TensorDesc,
                  bias: trtp.TensorDesc, out_dtype: int, outputs, tactic: int):
        N, K = B.shape_expr[0].constant_value(), B.shape_expr[1].constant_value()
        cfg = aot.W8A8GemmPlugin("bfloat16" if out_dtype == 16 else "float16", N, K, True,
                                 TACTIC_NAMES("W8A8Gemm")[tactic - 1])
        return _to_trt(trtp, aot.build(cfg), {"M": _rows(A.shape_expr)})

    # -------------------------------------------------------------------------------- QuantizePerToken
    @trtp.register("qcompiler::QuantizePerToken")
    def _quant_desc(X: trtp.TensorDesc, gamma: trtp.TensorDesc, beta: trtp.TensorDesc, norm: str,
                    epsilon: float) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
        q, s = infer_output_shapes("QuantizePerToken", [list(X.shape_expr), None, None])
        return out_desc(q, trt.int8), out_desc(s, trt.float32)

    @trtp.autotune("qcompiler::QuantizePerToken")
    def _quant_tune(X, gamma, beta, outputs):
        return [trtp.AutoTuneCombination("FP16|BF16|FP32, FP16|BF16|FP32, FP16|BF16|FP32, INT8, FP32", "LINEAR")]

    @trtp.aot_impl("qcompiler::QuantizePerToken")
    def _quant_aot(X: trtp.TensorDesc, gamma: trtp.TensorDesc, beta: trtp.TensorDesc, norm: str, epsilon: float,
                   outputs, tactic: int):
        H = X.shape_expr[len(X.shape_expr) - 1].constant_value()
        cfg = aot.QuantizePerTokenPlugin(_dtype_name(trt, X.dtype), H, norm, epsilon)
        return _to_trt(trtp, aot.build(cfg), {"M": _rows(X.shape_expr)})

    # ---------------------------------------------------------------------------------- FlashAttention
    def attn_desc(Q, K, V):
        o, lse = infer_output_shapes("FlashAttention", [list(Q.shape_expr), list(K.shape_expr), list(V.shape_expr)])
        return out_desc(o, Q.dtype), out_desc(lse, trt.float32)

    def attn_config(Q, K, causal, scale, tactic_name, mask):
        hq, d = Q.shape_expr[1].constant_value(), Q.shape_expr[3].constant_value()
        return aot.FlashAttentionPlugin(_dtype_name(trt, Q.dtype), hq, K.shape_expr[1].constant_value(), d, bool(causal),
                                        scale, mask == "seqlens_k", tactic_name, has_key_mask=mask == "key_mask")

    def attn_tactics(op_type, Q, K, scale, mask):
        names = TACTIC_NAMES(op_type)
        return [names.index(name) + 1 for name in aot.tactics(attn_config(Q, K, False, scale, "", mask))]

    def attn_aot(op_type, Q, K, causal, scale, tactic, mask):
        cfg = attn_config(Q, K, causal, scale, TACTIC_NAMES(op_type)[tactic - 1], mask)
        env = {"B": Q.shape_expr[0], "SQ": Q.shape_expr[2], "SK": K.shape_expr[2]}
        return _to_trt(trtp, aot.build(cfg), env)

    @trtp.register("qcompiler::FlashAttention")
    def _attn_desc(Q: trtp.TensorDesc, K: trtp.TensorDesc, V: trtp.TensorDesc, causal: int,
                   scale: float) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
        return attn_desc(Q, K, V)

    @trtp.autotune("qcompiler::FlashAttention")
    def _attn_tune(Q, K, V, causal: int, scale: float, outputs):
        tactics = attn_tactics("FlashAttention", Q, K, scale, "")
        return [trtp.AutoTuneCombination("FP16|BF16, FP16|BF16, FP16|BF16, FP16|BF16, FP32", "LINEAR", tactics)]

    @trtp.aot_impl("qcompiler::FlashAttention")
    def _attn_aot(Q: trtp.TensorDesc, K: trtp.TensorDesc, V: trtp.TensorDesc, causal: int, scale: float,
                  outputs, tactic: int):
        return attn_aot("FlashAttention", Q, K, causal, scale, tactic, "")

    def register_masked_attention(op_type: str, mask: str) -> None:
        """The plugin of a FlashAttention with its ``mask`` input (int32) as the fourth."""

        @trtp.register(f"qcompiler::{op_type}")
        def _desc(Q: trtp.TensorDesc, K: trtp.TensorDesc, V: trtp.TensorDesc, M: trtp.TensorDesc, causal: int,
                  scale: float) -> tuple[trtp.TensorDesc, trtp.TensorDesc]:
            return attn_desc(Q, K, V)

        @trtp.autotune(f"qcompiler::{op_type}")
        def _tune(Q, K, V, M, causal: int, scale: float, outputs):
            tactics = attn_tactics(op_type, Q, K, scale, mask)
            return [trtp.AutoTuneCombination("FP16|BF16, FP16|BF16, FP16|BF16, INT32, FP16|BF16, FP32", "LINEAR", tactics)]

        @trtp.aot_impl(f"qcompiler::{op_type}")
        def _aot(Q: trtp.TensorDesc, K: trtp.TensorDesc, V: trtp.TensorDesc, M: trtp.TensorDesc, causal: int,
                 scale: float, outputs, tactic: int):
            return attn_aot(op_type, Q, K, causal, scale, tactic, mask)

    for index, op_type in MASKED_ATTENTION_PLUGINS.items():
        register_masked_attention(op_type, OP_SPECS[FLASH_ATTENTION].inputs[index])

    _REGISTERED = True
    logger.info("registered qcompiler TensorRT plugins")
