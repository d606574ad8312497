"""Shared plumbing of the weight-only passes (RTN, GPTQ): which GEMMs they take, and how a quantized
weight is written into the graph.

Selection (each skip is reported as PassResult.not_fired with its reason): MatMul/Gemm with a constant
2-D float weight only (``qcompiler.graph.weighted_gemms``); skipped are nodes named by ``--exclude``
or ending in ``KEEP_FLOAT_SUFFIX``, GEMMs with K or N below ``min_gemm_dim``, the GEMM producing a
graph output (the LM head) unless ``quantize_lm_head``, weights shared by several nodes (one
initializer cannot hold two different quantizations), weights that are graph inputs, and a Gemm whose
dynamic bias C has beta != 1.

Lowerings, for a weight W [K, N] with codes/scales/zero points from ``QuantizedWeight``:

(a) ``WeightLowering.QDQ`` (standard ONNX, what TensorRT >= 10 fuses into its weight-only GEMM)::

        W_q  INT4 [K, N] ──┐                                 (UINT4 + zero point when asymmetric;
        s    [G, N] ───────┼─ DequantizeLinear(axis=0,        INT8/UINT8 for 8 bits)
       (z    [G, N]) ──────┘    block_size=group_size) ── W' ──┐
        X ─────────────────────────────────────────────── MatMul ── Y

    Per output channel (group_size None) uses per-axis DequantizeLinear (axis=1, s [N]). 2- and 3-bit
    codes are stored in INT4 (UINT4 when asymmetric): ONNX Runtime has no 2/3-bit DequantizeLinear and
    the codes fit exactly, so the values are exact but the file is as large as 4-bit. The opset is
    raised to 21 (INT4 types and ``block_size`` appear in DequantizeLinear-21; per-channel INT8 needs 13).
    Symmetric weights omit the zero point (it defaults to 0). The DequantizeLinear feeds the MatMul's
    B directly — no Transpose in between.

(b) ``WeightLowering.MATMUL_NBITS`` (ONNX Runtime's contrib op)::

        X ── com.microsoft.MatMulNBits(K, N, bits, block_size, accuracy_level)
                 (X, B uint8 [N, k_blocks, blob], scales [N, k_blocks], (zero_points uint8 packed)) ── Y

    Packed as in ``qcompiler.algorithms.packing``. Symmetric codes c are stored as c + 2^(bits-1) with no
    zero_points input (the op's default). 3-bit codes are stored as 4-bit (ORT's CPU kernel takes only
    2, 4, 8 bits; exact). ORT accepts block sizes 16..256, so larger groups (and per channel) use
    block_size = min(group, 256) (128 per channel) with each group's scale repeated per block (exact).

A Gemm(X, W, C, transB, beta) becomes MatMul/MatMulNBits with W as [K, N], followed by Add(beta·C)
when it has a bias (beta folded into a constant C).
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from qcompiler.algorithms.packing import (
    int4_tensor_proto,
    pack_matmul_nbits,
    pack_matmul_nbits_zero_points,
)
from qcompiler.algorithms.weight_quant import QuantizedWeight, num_groups
from qcompiler.config import WeightLowering, WeightOnlyConfig
from qcompiler.graph import KEEP_FLOAT_SUFFIX, WeightedGemm, add_domain, constant_value, ensure_opset, weighted_gemms
from qcompiler.pass_manager import PassContext

__all__ = [
    "select_weight_only_gemms", "weight_array", "fake_quant_weight", "lower_weight_only", "prepare_lowering",
    "MATMUL_NBITS_MAX_BLOCK",
]

logger = logging.getLogger(__name__)

# ORT 1.31's CPU MatMulNBits accepts block sizes 16, 32, 64, 128, 256.
MATMUL_NBITS_MAX_BLOCK = 256
_PER_CHANNEL_NBITS_BLOCK = 128
_FLOAT_WEIGHTS = (np.float32, np.float16)


def _name(gemm: WeightedGemm) -> str:
    return gemm.node.name or gemm.node.outputs[0].name


def _shape_kn(gemm: WeightedGemm) -> tuple[int, int]:
    # From the shape alone: reading .values would load every weight of the model into memory.
    rows, cols = gemm.weight.shape
    return (cols, rows) if gemm.transposed else (rows, cols)


def weight_array(gemm: WeightedGemm) -> np.ndarray:
    """The weight as [K, N] (MatMul layout), read without caching it in the graph's Constant.

    Keeping freshly loaded arrays out of the graph's lazily loaded initializers holds peak memory to
    the weights being worked on, not a second copy of the whole model.
    """
    values = gemm.weight._values  # noqa: SLF001 - graphsurgeon offers no non-caching load
    array = values.load() if isinstance(values, LazyValues) else gemm.weight.values
    return array.T if gemm.transposed else array


@contextlib.contextmanager
def _weights_stay_lazy(graph: gs.Graph):
    """Undoes the loading of lazily-read GEMM weights that ``weighted_gemms`` does when it checks their
    rank and dtype through ``.values``: on a 135M-parameter model that is +530 MB held until the end
    of the pass. (Harmless once ``weighted_gemms`` reads ``.shape``/``.dtype`` instead.)"""
    saved = [(t, t._values) for node in graph.nodes if node.op in ("MatMul", "Gemm")  # noqa: SLF001
             for t in node.inputs[1:2] if isinstance(t, gs.Constant) and isinstance(t._values, LazyValues)]  # noqa: SLF001
    try:
        yield
    finally:
        for tensor, values in saved:
            tensor._values = values  # noqa: SLF001


def select_weight_only_gemms(graph: gs.Graph, config: WeightOnlyConfig, context: PassContext
                             ) -> tuple[list[WeightedGemm], list[tuple[str, str]]]:
    """The GEMMs a weight-only pass quantizes, and (name, reason) for each candidate it does not."""
    chosen, skipped = [], []
    graph_inputs = {t.name for t in graph.inputs}
    for node in graph.nodes:
        if node.op in ("MatMul", "Gemm") and len(node.inputs) >= 2 and node.inputs[1].name in graph_inputs:
            skipped.append((node.name or node.outputs[0].name, "weight is a graph input, not a constant initializer"))
    with _weights_stay_lazy(graph):
        candidates = weighted_gemms(graph)
    for gemm in candidates:
        name = _name(gemm)
        k, n = _shape_kn(gemm)
        node = gemm.node
        bias = node.inputs[2] if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name else None
        if name.endswith(KEEP_FLOAT_SUFFIX):
            reason = "kept in float on purpose (outlier columns)"
        elif context.is_excluded(name):
            reason = "excluded by name"
        elif gemm.weight.dtype not in _FLOAT_WEIGHTS:
            reason = f"weight dtype {np.dtype(gemm.weight.dtype).name} (only float32/float16 are quantized)"
        elif k < config.min_gemm_dim or n < config.min_gemm_dim:
            reason = f"tiny GEMM (K={k}, N={n} < {config.min_gemm_dim})"
        elif gemm.produces_graph_output and not config.quantize_lm_head:
            reason = "produces a graph output (LM head); enable quantize_lm_head to include it"
        elif gemm.weight_is_shared:
            reason = "weight shared with other nodes"
        elif bias is not None and node.attrs.get("beta", 1.0) != 1.0 and constant_value(bias) is None:
            reason = "Gemm with a dynamic bias and beta != 1"
        else:
            chosen.append(gemm)
            continue
        skipped.append((name, reason))
    return chosen, skipped


def fake_quant_weight(gemm: WeightedGemm, quantized: QuantizedWeight) -> np.ndarray:
    """ŵ in the initializer's own layout and dtype (what the graph computes with after lowering)."""
    w = quantized.dequantize().astype(gemm.weight.dtype)
    return np.ascontiguousarray(w.T if gemm.transposed else w)


def prepare_lowering(graph: gs.Graph, config: WeightOnlyConfig) -> None:
    """Declares the opset/domain the chosen lowering needs (call once, before ``lower_weight_only``)."""
    # graphsurgeon shares the opset_import protos with the ModelProto it imported; copy them so that
    # raising the opset or adding a domain here never edits the caller's input model.
    graph.import_domains = [onnx.helper.make_opsetid(d.domain, d.version) for d in graph.import_domains or []] or None
    if config.lowering == WeightLowering.MATMUL_NBITS:
        add_domain(graph, "com.microsoft", 1)
    elif config.bits < 8 or config.group_size is not None:
        ensure_opset(graph, 21, "weight-only QDQ lowering uses INT4 and blocked DequantizeLinear (opset 21)")
    else:
        ensure_opset(graph, 13, "per-channel DequantizeLinear needs opset 13")


def _int_constant(name: str, values: np.ndarray, bits: int, signed: bool) -> gs.Constant:
    if bits <= 4:
        return gs.Constant(name, LazyValues(int4_tensor_proto(name, values, signed)))
    return gs.Constant(name, np.ascontiguousarray(values.astype(np.int8 if signed else np.uint8)))


def _lower_qdq(graph: gs.Graph, gemm: WeightedGemm, q: QuantizedWeight, x: gs.Tensor, y: gs.Variable) -> gs.Node:
    base = gemm.weight.name
    signed = q.symmetric
    inputs = [_int_constant(f"{base}/q{q.bits}", q.codes, q.bits, signed)]
    if q.group_size is None:
        attrs = {"axis": 1}
        inputs.append(gs.Constant(f"{base}/scale", np.ascontiguousarray(q.scales[0])))
        if not signed:
            inputs.append(_int_constant(f"{base}/zero_point", q.zero_points[0], q.bits, False))
    else:
        attrs = {"axis": 0, "block_size": q.group_size}
        inputs.append(gs.Constant(f"{base}/scale", np.ascontiguousarray(q.scales)))
        if not signed:
            inputs.append(_int_constant(f"{base}/zero_point", q.zero_points, q.bits, False))
    w = gs.Variable(f"{base}/dequantized", dtype=q.scales.dtype, shape=[q.k, q.n])
    graph.nodes.append(gs.Node("DequantizeLinear", f"{_name(gemm)}/weight_dq", attrs=attrs, inputs=inputs, outputs=[w]))
    matmul = gs.Node("MatMul", _name(gemm), inputs=[x, w], outputs=[y])
    return matmul


def _nbits_layout(q: QuantizedWeight) -> tuple[int, int, np.ndarray]:
    """(storage bits, block size, group of each block) for MatMulNBits."""
    bits = 4 if q.bits == 3 else q.bits
    if q.group_size is None:
        block = min(_PER_CHANNEL_NBITS_BLOCK, max(16, 1 << (max(q.k, 1) - 1).bit_length()))
        k_blocks = -(-q.k // block)
        return bits, block, np.zeros(k_blocks, np.int64)
    block = min(q.group_size, MATMUL_NBITS_MAX_BLOCK)
    k_blocks = -(-q.k // block)
    return bits, block, (np.arange(k_blocks) * block) // q.group_size


def _lower_matmul_nbits(graph: gs.Graph, gemm: WeightedGemm, q: QuantizedWeight, x: gs.Tensor, y: gs.Variable,
                        accuracy_level: int) -> gs.Node:
    base = gemm.weight.name
    bits, block, block_group = _nbits_layout(q)
    codes_nk = q.unsigned_codes(offset_bits=bits).T
    pad = (1 << (bits - 1)) if q.symmetric else 0
    inputs = [x, gs.Constant(f"{base}/B{bits}", pack_matmul_nbits(codes_nk, bits, block, pad)),
              gs.Constant(f"{base}/scales", np.ascontiguousarray(q.scales[block_group].T))]
    if not q.symmetric:
        zero_points = np.ascontiguousarray(q.zero_points[block_group].T)
        inputs.append(gs.Constant(f"{base}/zero_points", pack_matmul_nbits_zero_points(zero_points, bits)))
    attrs = {"K": q.k, "N": q.n, "bits": bits, "block_size": block, "accuracy_level": accuracy_level}
    return gs.Node("MatMulNBits", _name(gemm), attrs=attrs, inputs=inputs, outputs=[y], domain="com.microsoft")


def lower_weight_only(graph: gs.Graph, gemm: WeightedGemm, quantized: QuantizedWeight, config: WeightOnlyConfig
                      ) -> dict[str, Any]:
    """Replaces ``gemm`` by its quantized lowering (see module docstring); returns a report entry.

    The GEMM's output tensor keeps its name; the node keeps its name (Gemm bias goes to an Add).
    """
    node = gemm.node
    name = _name(gemm)
    if num_groups(quantized.k, quantized.group_size) != quantized.scales.shape[0]:
        raise ValueError(f"{name}: quantized weight does not match its group size")
    x, y = node.inputs[0], node.outputs[0]
    bias = node.inputs[2] if node.op == "Gemm" and len(node.inputs) > 2 and node.inputs[2].name else None
    beta = float(node.attrs.get("beta", 1.0)) if node.op == "Gemm" else 1.0
    node.inputs.clear()
    node.outputs.clear()
    graph.nodes.remove(node)
    product = y if bias is None else gs.Variable(f"{y.name}/no_bias", dtype=y.dtype, shape=y.shape)
    if config.lowering == WeightLowering.MATMUL_NBITS:
        new = _lower_matmul_nbits(graph, gemm, quantized, x, product, config.accuracy_level)
    else:
        new = _lower_qdq(graph, gemm, quantized, x, product)
    graph.nodes.append(new)
    if bias is not None:
        if beta != 1.0:
            value = constant_value(bias)
            bias = gs.Constant(f"{bias.name}/beta", (value * beta).astype(value.dtype))
        graph.nodes.append(gs.Node("Add", f"{name}/bias", inputs=[product, bias], outputs=[y]))
    return {"node": name, "k": quantized.k, "n": quantized.n, "bits": quantized.bits,
            "group_size": quantized.group_size, "symmetric": quantized.symmetric,
            "lowering": config.lowering.value, "op": new.op}
