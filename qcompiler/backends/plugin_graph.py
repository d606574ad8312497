"""Runs a graph holding qcompiler plugin ops without TensorRT, to check it before an engine is built.

ONNX's reference evaluator runs every standard node (in numpy, on the CPU) and the qcompiler nodes
(Int4Gemm, FlashAttention, W8A8Gemm, QuantizePerToken) with one of two implementations:

* :func:`reference_ops`: the semantics ``qcompiler.plugins.ops`` documents, in float64 numpy (no GPU).
* :func:`kernel_ops`: the kernels a TensorRT engine embeds: each node's plugin configuration is built
  ahead of time (``qcompiler.plugins.aot.build``, the PTX ``aot_impl`` hands TensorRT) and launched
  through CuPy with exactly its declared launch parameters, in float16, one chosen tactic per op.

What stays unchecked is TensorRT itself (its ONNX parser, the plugin registration and the engine
build), which cannot be installed where this was written. Slow (numpy for everything else): meant for
checks of small models and a few windows of text, not for serving.
"""

from __future__ import annotations

import functools
import logging

import numpy as np
import onnx

__all__ = ["reference_ops", "kernel_ops", "plugin_graph_evaluator", "run_plugin_graph"]

logger = logging.getLogger(__name__)


def reference_ops() -> list[type]:
    """``onnx.reference`` op classes computing the four ops as ops.py defines them (and FlashAttention under the
    plugin names ``prepare_for_tensorrt`` gives its masked forms)."""
    from onnx.reference.op_run import OpRun

    from qcompiler.plugins.ops import unpack_int4_matmulnbits

    class Int4Gemm(OpRun):
        op_domain = "qcompiler"

        def _run(self, x, b, scales, zero_points=None, bias=None, K=0, N=0, block_size=0, bits=4):
            w = unpack_int4_matmulnbits(b, scales.astype(np.float32), zero_points, K)
            y = x.astype(np.float64) @ w.T.astype(np.float64) + (0 if bias is None else bias)
            return (y.astype(x.dtype),)

    class FlashAttention(OpRun):
        op_domain = "qcompiler"

        def _run(self, q, k, v, seqlens_k=None, key_mask=None, causal=0, scale=0.0):
            k, v = (np.repeat(t.astype(np.float64), q.shape[1] // t.shape[1], axis=1) for t in (k, v))
            s = (scale or 1 / np.sqrt(q.shape[-1])) * (q.astype(np.float64) @ k.swapaxes(-1, -2))
            sq, sk = s.shape[-2:]
            keys = np.arange(sk)
            keep = np.ones((q.shape[0], 1, sq, sk), bool)
            if causal:  # bottom-right aligned: query i sees key j iff j <= i + Sk_b - Sq
                lengths = np.full(q.shape[0], sk) if seqlens_k is None else np.asarray(seqlens_k)
                keep &= keys <= np.arange(sq)[:, None] + (lengths - sq)[:, None, None, None]
            if seqlens_k is not None:
                keep &= keys < np.asarray(seqlens_k)[:, None, None, None]
            if key_mask is not None:
                keep &= np.asarray(key_mask)[:, None, None, :] != 0
            s = np.where(keep, s, -np.inf)
            top = np.max(s, -1, keepdims=True, initial=-np.inf)
            safe = np.where(np.isfinite(top), top, 0)
            total = np.exp(s - safe).sum(-1, keepdims=True)
            lse = np.where(total > 0, np.log(np.maximum(total, 1e-300)) + safe, -np.inf)[..., 0]
            p = np.where(total > 0, np.exp(s - safe) / np.maximum(total, 1e-300), 0)
            return (p @ v).astype(q.dtype), lse.astype(np.float32)

    class W8A8Gemm(OpRun):
        op_domain = "qcompiler"

        def _run(self, a, a_scale, b, b_scale, bias=None, out_dtype=10):
            y = (a.astype(np.float64) @ b.astype(np.float64).T) * a_scale[..., None] * b_scale.astype(np.float64)
            return ((y + (0 if bias is None else bias)).astype(np.float16 if out_dtype == 10 else np.float32),)

    class QuantizePerToken(OpRun):
        op_domain = "qcompiler"

        def _run(self, x, gamma=None, beta=None, norm="none", epsilon=1e-6):
            y = x.astype(np.float64)
            norm = norm.decode() if isinstance(norm, bytes) else norm
            if norm == "rms":
                y = y / np.sqrt((y * y).mean(-1, keepdims=True) + epsilon) * gamma
            elif norm == "layer":
                centred = y - y.mean(-1, keepdims=True)
                y = centred / np.sqrt((centred * centred).mean(-1, keepdims=True) + epsilon) * gamma + beta
            scale = np.maximum(np.abs(y).max(-1), 1e-8) / 127.0
            q = np.clip(np.round(y / scale[..., None]), -127, 127).astype(np.int8)
            return q, scale.astype(np.float32)

    return [Int4Gemm, FlashAttention, *_masked_attention_ops(FlashAttention), W8A8Gemm, QuantizePerToken]


def _masked_attention_ops(flash_attention: type) -> list[type]:
    """``flash_attention`` under the TensorRT plugin names of its masked forms (``ops.MASKED_ATTENTION_PLUGINS``:
    Q, K, V and the mask input), which ``prepare_for_tensorrt`` gives such nodes."""
    from qcompiler.plugins.ops import FLASH_ATTENTION, MASKED_ATTENTION_PLUGINS, OP_SPECS

    def masked(index: int) -> type:
        name = OP_SPECS[FLASH_ATTENTION].inputs[index]

        def _run(self, q, k, v, mask, causal=0, scale=0.0):
            return flash_attention._run(self, q, k, v, **{name: mask}, causal=causal, scale=scale)

        return type(MASKED_ATTENTION_PLUGINS[index], (flash_attention,), {"_run": _run})

    return [masked(index) for index in MASKED_ATTENTION_PLUGINS]


@functools.cache
def _built(config):
    from qcompiler.plugins import aot

    tactic = getattr(config, "tactic", "default")  # QuantizePerToken has one kernel, no tactic field
    if tactic not in aot.tactics(config):
        raise ValueError(f"tactic {tactic!r} is not offered for {config} (offered: {aot.tactics(config)})")
    return aot.build(config)


def kernel_ops(int4_tactic: str, attention_tactic: str, launched: list[str] | None = None,
               w8a8_tactic: str = "large") -> list[type]:
    """``onnx.reference`` op classes that run the four ops on the plugins' AOT kernels (CUDA GPU, CuPy,
    Triton): the GEMMs and attention in float16, QuantizePerToken in its input's type. ``launched`` (if
    given) collects the tactic of every launch."""
    import torch
    from onnx.reference.op_run import OpRun

    from qcompiler.plugins import aot, launch

    record = launched if launched is not None else []

    def cuda(array: np.ndarray, dtype=None) -> torch.Tensor:
        t = torch.from_numpy(np.array(array, order="C")).cuda()  # a copy: the evaluator's arrays are read-only
        return (t.to(dtype) if dtype is not None else t).contiguous()

    class Int4Gemm(OpRun):
        op_domain = "qcompiler"

        def _run(self, x, b, scales, zero_points=None, bias=None, K=0, N=0, block_size=0, bits=4):
            config = aot.Int4GemmPlugin("float16", N, K, block_size, zero_points is not None, bias is not None, int4_tactic)
            rows = cuda(x.reshape(-1, K), torch.float16)
            y = torch.full((rows.shape[0], N), float("nan"), dtype=torch.float16, device="cuda")
            tensors = {"X": rows, "B": cuda(b), "scales": cuda(scales, torch.float16), "Y": y,
                       "zero_points": None if zero_points is None else cuda(zero_points),
                       "bias": None if bias is None else cuda(bias, torch.float16)}
            launch.launch(_built(config), tensors, {"M": rows.shape[0]})
            record.append(config.tactic)
            return (y.float().cpu().numpy().reshape(*x.shape[:-1], N).astype(x.dtype),)

    class FlashAttention(OpRun):
        op_domain = "qcompiler"

        def _run(self, q, k, v, seqlens_k=None, key_mask=None, causal=0, scale=0.0):
            (B, HQ, SQ, D), (HKV, SK) = q.shape, k.shape[1:3]
            config = aot.FlashAttentionPlugin("float16", HQ, HKV, D, bool(causal), float(scale), seqlens_k is not None,
                                              attention_tactic, has_key_mask=key_mask is not None)
            o = torch.full(q.shape, float("nan"), dtype=torch.float16, device="cuda")
            lse = torch.full((B, HQ, SQ), float("nan"), dtype=torch.float32, device="cuda")
            tensors = {"Q": cuda(q, torch.float16), "K": cuda(k, torch.float16), "V": cuda(v, torch.float16),
                       "seqlens_k": None if seqlens_k is None else cuda(seqlens_k, torch.int32),
                       "key_mask": None if key_mask is None else cuda(key_mask, torch.int32), "O": o, "LSE": lse}
            launch.launch(_built(config), tensors, {"B": B, "SQ": SQ, "SK": SK})
            record.append(config.tactic)
            return o.float().cpu().numpy().astype(q.dtype), lse.cpu().numpy()

    class W8A8Gemm(OpRun):
        op_domain = "qcompiler"

        def _run(self, a, a_scale, b, b_scale, bias=None, out_dtype=10):
            rows = cuda(a.reshape(-1, a.shape[-1]))
            N, K = b.shape
            dtype = torch.float16 if out_dtype == 10 else torch.bfloat16
            config = aot.W8A8GemmPlugin("float16" if out_dtype == 10 else "bfloat16", N, K, bias is not None, w8a8_tactic)
            y = torch.full((rows.shape[0], N), float("nan"), dtype=dtype, device="cuda")
            tensors = {"A": rows, "a_scale": cuda(a_scale.reshape(-1), torch.float32), "B": cuda(b),
                       "b_scale": cuda(b_scale, torch.float32), "bias": None if bias is None else cuda(bias, dtype), "Y": y}
            launch.launch(_built(config), tensors, {"M": rows.shape[0]})
            record.append(config.tactic)
            return (y.float().cpu().numpy().reshape(*a.shape[:-1], N).astype(np.float16),)

    class QuantizePerToken(OpRun):
        op_domain = "qcompiler"

        def _run(self, x, gamma=None, beta=None, norm="none", epsilon=1e-6):
            norm = norm.decode() if isinstance(norm, bytes) else norm
            H = x.shape[-1]
            # X in its own type: float32 rows stay float32 (the residual stream a fused norm reads)
            name = {np.dtype(np.float32): "float32", np.dtype(np.float16): "float16"}[x.dtype]
            config = aot.QuantizePerTokenPlugin(name, H, norm, float(epsilon))
            dtype = getattr(torch, name)
            rows = cuda(x.reshape(-1, H))
            q = torch.zeros(rows.shape, dtype=torch.int8, device="cuda")
            scale = torch.full((rows.shape[0],), float("nan"), dtype=torch.float32, device="cuda")
            tensors = {"X": rows, "gamma": None if gamma is None else cuda(gamma, dtype),
                       "beta": None if beta is None else cuda(beta, dtype), "Q": q, "scale": scale}
            launch.launch(_built(config), tensors, {"M": rows.shape[0]})
            record.append("quantize_per_token")
            return q.cpu().numpy().reshape(x.shape), scale.cpu().numpy().reshape(x.shape[:-1])

    return [Int4Gemm, FlashAttention, *_masked_attention_ops(FlashAttention), W8A8Gemm, QuantizePerToken]


def _standard_op_fixes() -> list[type]:
    """Standard ops the reference evaluator gets wrong: GatherElements on data longer than 32 along the
    first axis (numpy's ``choose`` limit; BERT's ``token_type_ids`` buffer [1, 512] hits it)."""
    from onnx.reference.op_run import OpRun

    class GatherElements(OpRun):
        def _run(self, data, indices, axis=0):
            indices = np.where(indices < 0, indices + data.shape[axis], indices)
            return (np.take_along_axis(data, indices, axis=axis),)

    return [GatherElements]


def plugin_graph_evaluator(model: onnx.ModelProto, ops: list[type] | None = None):
    """ONNX's reference evaluator for ``model`` (``run(names, feeds)``), its qcompiler nodes run by ``ops``
    (default: :func:`reference_ops`)."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model, new_ops=(ops or reference_ops()) + _standard_op_fixes())


def run_plugin_graph(model: onnx.ModelProto, feeds: dict[str, np.ndarray], ops: list[type] | None = None) -> list[np.ndarray]:
    """``model``'s outputs for ``feeds``, its qcompiler nodes run by ``ops`` (default: :func:`reference_ops`)."""
    return plugin_graph_evaluator(model, ops).run(None, feeds)
