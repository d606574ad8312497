"""TensorRT backend: builds a serialized engine from an ONNX model holding qcompiler plugin ops.

Steps: (1) a prepared copy of the model (the input is never modified): absent optional plugin inputs
are materialised with their neutral values (Int4Gemm zero points 8 and bias 0, W8A8Gemm bias 0,
QuantizePerToken gamma 1 / beta 0) so each op has one plugin signature, FlashAttention nodes get
their LSE output (and become FlashAttentionSeqLens / FlashAttentionKeyMask where they read a mask), and in a float32
graph the plugins read float16 (Casts in and out);
(2) the qcompiler plugins are registered (``qcompiler.plugins.tensorrt_plugins``, AOT: the engine
embeds the kernels' PTX and needs no Python at run time); (3) TensorRT's ONNX parser builds a
strongly typed network, with an optimization profile over the dynamic input dims.

TensorRT is imported lazily; without it :func:`build_engine` raises :class:`TensorRTUnavailableError`.
Plugin kernels take float16/bfloat16 activations; a float32 model runs them in float16 and the rest
of the graph in float32 (export or convert the model to float16 to run all of it in half precision).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from qcompiler.errors import QCompileError
from qcompiler.plugins.ops import MASKED_ATTENTION_PLUGINS

__all__ = ["TensorRTUnavailableError", "prepare_for_tensorrt", "build_engine"]

logger = logging.getLogger(__name__)


class TensorRTUnavailableError(QCompileError):
    """TensorRT (>= 10.6 with tensorrt.plugin) is not installed."""


def _import_tensorrt():
    try:
        import tensorrt as trt
        import tensorrt.plugin  # noqa: F401
    except ImportError as err:
        raise TensorRTUnavailableError(
            f"the tensorrt backend needs TensorRT >= 10.6 with its Python plugin API (pip install tensorrt): {err}"
        ) from None
    return trt


def prepare_for_tensorrt(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with every qcompiler node given its full plugin input/output list (see module docstring)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    inits = {t.name: t for t in out.graph.initializer}
    added: list[onnx.TensorProto] = []

    def const(name, array):
        added.append(numpy_helper.from_array(array, name))
        return name

    for node in out.graph.node:
        if node.domain != "qcompiler":
            continue
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        ins = list(node.input)
        if node.op_type == "Int4Gemm":
            ins += [""] * (5 - len(ins))
            N, K, bs = int(attrs["N"]), int(attrs["K"]), int(attrs["block_size"])
            nb = -(-K // bs)
            sdt = numpy_helper.to_array(inits[ins[2]]).dtype if ins[2] in inits else np.float16
            if not ins[3]:
                ins[3] = const(f"{node.name}_zp8", np.full((N, (nb + 1) // 2), 0x88, np.uint8))
            if not ins[4]:
                ins[4] = const(f"{node.name}_bias0", np.zeros(N, sdt))
        elif node.op_type == "W8A8Gemm":
            ins += [""] * (5 - len(ins))
            if not ins[4]:
                n = numpy_helper.to_array(inits[ins[2]]).shape[0] if ins[2] in inits else None
                if n is None:
                    raise QCompileError(f"W8A8Gemm node {node.name!r}: weight {ins[2]!r} must be an initializer")
                ins[4] = const(f"{node.name}_bias0", np.zeros(n, np.float16 if attrs.get("out_dtype", 10) == 10
                                                                 else np.float32))
        elif node.op_type == "QuantizePerToken":
            ins += [""] * (3 - len(ins))
            # H is unknown from the graph alone when gamma is absent; the kernel ignores gamma/beta for
            # norm="none", so a one-element placeholder keeps the signature without changing the result.
            if not ins[1]:
                ins[1] = const(f"{node.name}_gamma", np.ones(1, np.float16))
            if not ins[2]:
                ins[2] = const(f"{node.name}_beta", np.zeros(1, np.float16))
        elif node.op_type == "FlashAttention":
            masks = [i for i in MASKED_ATTENTION_PLUGINS if i < len(ins) and ins[i]]
            if len(masks) > 1:
                raise QCompileError(f"FlashAttention node {node.name!r}: seqlens_k and key_mask exclude each other")
            if masks:  # its own plugin: the input list of a plugin is fixed
                node.op_type = MASKED_ATTENTION_PLUGINS[masks[0]]
            ins = ins[:3] + [ins[i] for i in masks]
            if len(node.output) < 2:
                node.output.append(f"{node.name or node.output[0]}_lse")
        else:
            continue
        del node.input[:]
        node.input.extend(ins)
    out.graph.initializer.extend(added)
    _float16_around_plugins(out)
    return out


def _element_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor. ONNX's inference stops at ops it does not know, so on a probe
    without the weights' values each qcompiler node becomes an Identity of its first input (its main
    output has that type)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    for t in probe.graph.initializer:
        if np.prod(t.dims, dtype=np.int64) > 1024:  # weights: inference reads their dims, not their values
            t.ClearField("raw_data")
            t.ClearField("float_data")
            t.ClearField("int32_data")
    for node in probe.graph.node:
        if node.domain == "qcompiler":
            node.CopyFrom(helper.make_node("Identity", [node.input[0]], [node.output[0]], name=node.name))
    inferred = onnx.shape_inference.infer_shapes(probe)
    types = {v.name: v.type.tensor_type.elem_type
             for v in list(inferred.graph.value_info) + list(inferred.graph.input) + list(inferred.graph.output)}
    types.update({t.name: t.data_type for t in model.graph.initializer})
    return types


# Per op: the float inputs the kernel reads in the activation type, and the outputs it writes in it.
_HALF_INPUTS = {"Int4Gemm": (0, 2, 4), **{name: (0, 1, 2) for name in ("FlashAttention", *MASKED_ATTENTION_PLUGINS.values())}}
_HALF_OUTPUTS = {"Int4Gemm": (0,), **{name: (0,) for name in ("FlashAttention", *MASKED_ATTENTION_PLUGINS.values())}}


def _float16_around_plugins(model: onnx.ModelProto) -> None:
    """In a float32 graph, runs Int4Gemm and FlashAttention in float16: their plugins take float16/bfloat16
    only. Constant inputs (scales, bias) get float16 copies; computed ones a Cast, and so do the outputs,
    back to float32 for the float32 nodes around. LSE stays float32, as the op defines it. (W8A8Gemm reads
    int8 and writes float16 already; QuantizePerToken reads float32 as it is, its gamma/beta in X's type.)"""
    types = _element_types(model)
    inits = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:  # gamma/beta (fused or materialised) in X's type
        if node.domain == "qcompiler" and node.op_type == "QuantizePerToken" and node.input[0] in types:
            want = onnx.helper.tensor_dtype_to_np_dtype(types[node.input[0]])
            for name in node.input[1:3]:
                if name in inits and inits[name].data_type != types[node.input[0]]:
                    inits[name].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(inits[name]).astype(want), name))
    nodes = []
    for node in model.graph.node:
        half_inputs = _HALF_INPUTS.get(node.op_type, ()) if node.domain == "qcompiler" else ()
        if not half_inputs or types.get(node.input[0]) != onnx.TensorProto.FLOAT:
            nodes.append(node)
            continue
        for i in half_inputs:
            name = node.input[i] if i < len(node.input) else ""
            if not name:
                continue
            half = f"{name}/fp16"
            if name in inits:
                if half not in inits:
                    inits[half] = numpy_helper.from_array(numpy_helper.to_array(inits[name]).astype(np.float16), half)
                    model.graph.initializer.append(inits[half])
            elif all(n.output[0] != half for n in nodes):
                nodes.append(helper.make_node("Cast", [name], [half], to=onnx.TensorProto.FLOAT16, name=f"{name}/to_fp16"))
            node.input[i] = half
        casts_back = []
        for i in _HALF_OUTPUTS[node.op_type]:
            name = node.output[i]
            node.output[i] = f"{name}/fp16"
            casts_back.append(helper.make_node("Cast", [node.output[i]], [name], to=onnx.TensorProto.FLOAT, name=f"{name}/to_fp32"))
        nodes += [node, *casts_back]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    read = {name for node in nodes for name in node.input}
    unread = [t for t in model.graph.initializer if t.name not in read]  # the float32 originals of the copies
    for t in unread:
        model.graph.initializer.remove(t)


def build_engine(model: onnx.ModelProto | str | Path, engine_path: str | Path, *,
                 profile: dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]] | None = None,
                 workspace_bytes: int = 4 << 30) -> Path:
    """Builds and writes a serialized TensorRT engine.

    Args:
        model: ONNX model (or path) after the qcompiler passes.
        engine_path: where the engine is written.
        profile: input name -> (min, opt, max) shapes for dynamic inputs.
        workspace_bytes: builder workspace limit.

    Raises:
        TensorRTUnavailableError: TensorRT is not installed.
        QCompileError: the parser or the builder failed (first parser error in the message).
    """
    trt = _import_tensorrt()
    from qcompiler.plugins.tensorrt_plugins import register_plugins

    if not isinstance(model, onnx.ModelProto):
        model = onnx.load(str(model))
    prepared = prepare_for_tensorrt(model)
    register_plugins()
    logger_trt = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger_trt)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, logger_trt)
    if not parser.parse(prepared.SerializeToString()):
        first = parser.get_error(0) if parser.num_errors else "unknown error"
        raise QCompileError(f"TensorRT could not parse the model: {first}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, workspace_bytes)
    # Only aot_impl is registered for our ops, so TensorRT has no JIT (Python) path to fall back on.
    if profile:
        opt = builder.create_optimization_profile()
        for name, (lo, mid, hi) in profile.items():
            opt.set_shape(name, lo, mid, hi)
        config.add_optimization_profile(opt)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise QCompileError("TensorRT failed to build the engine (see the TensorRT log above)")
    engine_path = Path(engine_path)
    engine_path.write_bytes(bytes(serialized))
    logger.info("wrote TensorRT engine %s", engine_path)
    return engine_path
