"""Small utilities shared by the tests: run a model in ONNX Runtime, gather statistics, SQNR."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort

from qcompiler.calibration import CalibrationStats, collect_stats, iterate_feeds
from qcompiler.graph import import_graph, weighted_gemms


def run_ort(model: onnx.ModelProto, feeds: dict[str, np.ndarray], optimize: bool = False) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def gemm_input_stats(model: onnx.ModelProto, arrays: dict[str, np.ndarray], threshold: float = 6.0,
                     relative_threshold: float | None = None) -> CalibrationStats:
    names = [g.activation.name for g in weighted_gemms(import_graph(model))]
    return collect_stats(model, names, iterate_feeds(arrays, batch=1), outlier_threshold=threshold,
                         relative_outlier_threshold=relative_threshold)


def sqnr_db(reference: np.ndarray, approximation: np.ndarray) -> float:
    noise = np.linalg.norm(reference.astype(np.float64) - approximation)
    return float("inf") if noise == 0 else float(20 * np.log10(np.linalg.norm(reference) / noise))


def _flash_attention_op():
    from onnx.reference.op_run import OpRun

    class FlashAttention(OpRun):
        """qcompiler::FlashAttention as plugins/ops.py defines it, in float64 numpy (no GPU, no Triton)."""

        op_domain = "qcompiler"

        def _run(self, q, k, v, seqlens_k=None, causal=0, scale=0.0):
            assert seqlens_k is None, "the test reference covers dense batches only"
            k, v = (np.repeat(t.astype(np.float64), q.shape[1] // t.shape[1], axis=1) for t in (k, v))
            s = (scale or 1 / np.sqrt(q.shape[-1])) * (q.astype(np.float64) @ k.swapaxes(-1, -2))
            if causal:  # bottom-right aligned: query i sees key j iff j <= i + Sk - Sq
                sq, sk = s.shape[-2:]
                s = np.where(np.arange(sk)[None, :] <= np.arange(sq)[:, None] + sk - sq, s, -np.inf)
            top = s.max(-1, keepdims=True)
            lse = np.log(np.exp(s - top).sum(-1)) + top[..., 0]
            return (np.exp(s - lse[..., None]) @ v).astype(q.dtype), lse.astype(np.float32)

    return FlashAttention


def _int4_gemm_op():
    from onnx.reference.op_run import OpRun

    from qcompiler.plugins.ops import unpack_int4_matmulnbits

    class Int4Gemm(OpRun):
        """qcompiler::Int4Gemm as plugins/ops.py defines it: X @ ((q - zp) * scale)^T + bias, in numpy."""

        op_domain = "qcompiler"

        def _run(self, x, b, scales, zero_points=None, bias=None, K=0, N=0, block_size=0, bits=4):
            w = unpack_int4_matmulnbits(b, scales.astype(np.float32), zero_points, K)
            y = x.astype(np.float64) @ w.T.astype(np.float64) + (0 if bias is None else bias)
            return (y.astype(x.dtype),)

    return Int4Gemm


def run_reference(model: onnx.ModelProto, feeds: dict[str, np.ndarray], ops=None) -> list[np.ndarray]:
    """``model`` run by ONNX's reference evaluator with the qcompiler ops given as ``onnx.reference`` op
    classes (default: qcompiler::FlashAttention and Int4Gemm in numpy): runs the plugin target's graphs
    on a CPU."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model, new_ops=ops or [_flash_attention_op(), _int4_gemm_op()]).run(None, feeds)
