"""Graph I/O: loading, saving (atomic, external data when needed), opset handling, small graph queries.

Passes work on an ``onnx_graphsurgeon.Graph``; these helpers convert to and from ``onnx.ModelProto``
and answer the questions every pass asks (which initializer is a node's weight, who consumes a tensor).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from qcompiler.errors import InputModelError, OutputPathError

__all__ = [
    "load_model", "save_model", "import_graph", "export_graph", "ensure_opset", "add_domain",
    "constant_value", "scalar_value", "producer", "value_readers", "single_consumer", "subgraph_model", "symbolic_shapes",
    "ONNX_PROTO_LIMIT", "WeightedGemm",
    "weighted_gemms", "KEEP_FLOAT_SUFFIX",
]

logger = logging.getLogger(__name__)

# protobuf refuses messages over 2 GiB; stay well clear of it and spill weights to external data.
ONNX_PROTO_LIMIT = 1_800_000_000

# Nodes whose name ends with this are deliberately kept in float (e.g. LLM.int8()'s outlier GEMM);
# quantization passes leave them alone.
KEEP_FLOAT_SUFFIX = "::keep_float"


def load_model(path: str | Path) -> onnx.ModelProto:
    """Loads an ONNX model with its external data; raises InputModelError with the reason on failure."""
    path = Path(path)
    if not path.is_file():
        raise InputModelError(f"model file not found: {path}")
    try:
        model = onnx.load(str(path), load_external_data=True)
    except Exception as err:  # protobuf raises DecodeError, onnx raises its own; both mean "not ONNX"
        raise InputModelError(f"{path} is not a readable ONNX model: {str(err).splitlines()[0] if str(err) else type(err).__name__}") from None
    if not model.graph.node:
        raise InputModelError(f"{path} is not an ONNX model with a graph (no nodes found)")
    return model


def _model_bytes(model: onnx.ModelProto) -> int:
    return sum(t.ByteSize() for t in model.graph.initializer) + model.graph.ByteSize() // 4


def save_model(model: onnx.ModelProto, path: str | Path, *, input_path: str | Path | None = None,
               external_data: bool | None = None) -> Path:
    """Writes ``model`` to ``path`` atomically; a half-written file never survives.

    External data (one ``<name>.data`` file beside it) is used automatically when the model would
    not fit in a protobuf, or when ``external_data`` is True.

    Raises:
        OutputPathError: path equals the input model, or its folder cannot be written.
    """
    path = Path(path)
    if input_path is not None and path.resolve() == Path(input_path).resolve():
        raise OutputPathError(f"output path {path} is the input model; choose another path (the input is never overwritten)")
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise OutputPathError(f"cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK):
        raise OutputPathError(f"cannot write {path}: folder {folder} is not writable")
    if path.is_dir():
        raise OutputPathError(f"cannot write {path}: it is a folder")
    use_external = external_data if external_data is not None else _model_bytes(model) > ONNX_PROTO_LIMIT
    try:
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=folder))
    except OSError as err:
        raise OutputPathError(f"cannot write {path}: {err.strerror or err}") from None
    try:
        staged = staging / path.name
        data_name = path.name + ".data"
        if use_external:
            onnx.save_model(model, str(staged), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data_name, size_threshold=1024)
        else:
            onnx.save_model(model, str(staged))
        if use_external:
            os.replace(staging / data_name, folder / data_name)
        os.replace(staged, path)
        if use_external:  # onnx moved the caller's tensors out to the file; bring them back in
            onnx.load_external_data_for_model(model, str(folder))
    except OSError as err:
        raise OutputPathError(f"cannot write {path}: {err.strerror or err}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    logger.info("wrote %s%s", path, " (+ external data)" if use_external else "")
    return path


def import_graph(model: onnx.ModelProto) -> gs.Graph:
    """onnx -> graphsurgeon, keeping the model's opset imports."""
    return gs.import_onnx(model)


def export_graph(graph: gs.Graph) -> onnx.ModelProto:
    model = gs.export_onnx(graph)
    # graphsurgeon writes whatever IR version onnx defaults to; ONNX Runtime may lag behind it.
    model.ir_version = min(model.ir_version, 10)
    return model


def ensure_opset(graph: gs.Graph, minimum: int, reason: str) -> None:
    """Raises the default-domain opset to ``minimum`` if lower, logging why (never lowers it).

    Nodes whose operator changed its signature in between are rewritten to the new version (e.g.
    ReduceMean's ``axes`` moves from an attribute to an input at opset 18), so a model exported at an
    older opset (TorchScript exports use 14-17) stays valid.

    Raises:
        InputModelError: a node has no conversion to the new opset.
    """
    if graph.opset >= minimum:
        return
    logger.warning("raising opset %d -> %d: %s", graph.opset, minimum, reason)
    _upgrade_nodes(graph, graph.opset, minimum, reason)
    graph.opset = minimum
    # graphsurgeon shares the opset_import protos with the ModelProto it imported: replace, never edit them.
    if graph.import_domains:
        graph.import_domains = [onnx.helper.make_opsetid(d.domain, minimum if d.domain in ("", "ai.onnx") else d.version)
                                for d in graph.import_domains]


def _signature_changed(op: str, old: int, new: int) -> bool:
    try:
        return onnx.defs.get_schema(op, old).since_version != onnx.defs.get_schema(op, new).since_version
    except onnx.defs.SchemaError:  # not a standard operator at one of the two versions
        return False


def _upgrade_nodes(graph: gs.Graph, old: int, new: int, reason: str) -> None:
    """Converts every default-domain node whose operator has a newer version in (old, new] with ONNX's
    version converter, run once on a weightless model of just those nodes, and splices the result back:
    a node converted to the same op is edited in place (passes may hold it); new Constant nodes become
    constants; any other node the converter adds (or one whose op it replaced) is added to the graph.
    If/Loop/Scan nodes are left as they are: their bodies read outer tensors the small model lacks (and
    their own signatures only gained types up to opset 21)."""
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    changed = [n for n in graph.nodes if n.domain in (None, "", "ai.onnx") and _signature_changed(n.op, old, new)
               and not any(isinstance(v, gs.Graph) for v in n.attrs.values())]
    if not changed:
        return
    produced = {t.name: t for n in changed for t in n.outputs}
    outer = {t.name: t for n in changed for t in n.inputs if t.name and t.name not in produced}
    mini = onnx.helper.make_model(
        onnx.helper.make_graph([OnnxExporter.export_node(n) for n in changed], "upgrade",
                               [onnx.helper.make_tensor_value_info(name, onnx.TensorProto.UNDEFINED, None) for name in outer],
                               [onnx.helper.make_empty_tensor_value_info(name) for name in produced]),
        opset_imports=[onnx.helper.make_opsetid("", old)])
    try:
        converted = gs.import_onnx(onnx.version_converter.convert_version(mini, new))
    except Exception as err:  # the converter raises RuntimeError/ValueError/C++ errors with one message
        ops = sorted({n.op for n in changed})
        raise InputModelError(f"cannot raise the model's opset {old} -> {new} ({reason}): converting {ops} failed: "
                              f"{str(err).splitlines()[0] if str(err) else type(err).__name__}; "
                              f"export the model at opset >= {new}") from None
    known = {**outer, **produced}
    new_tensors: dict[str, gs.Tensor] = {}

    def mapped(tensor: gs.Tensor) -> gs.Tensor:
        if not tensor.name:
            return gs.Variable.empty()
        if tensor.name in known:
            return known[tensor.name]
        if tensor.name not in new_tensors:
            new_tensors[tensor.name] = gs.Variable(f"{tensor.name}/opset{new}", dtype=tensor.dtype)
        return new_tensors[tensor.name]

    for node in converted.nodes:  # constants first: the nodes below read them
        value = node.attrs.get("value")
        if node.op == "Constant" and isinstance(value, gs.Constant) and node.outputs[0].name not in known:
            new_tensors[node.outputs[0].name] = gs.Constant(f"{node.outputs[0].name}/opset{new}", value.values)
    by_output = {n.outputs[0].name: n for n in changed if n.outputs}
    kept = set()
    for node in converted.nodes:
        if node.outputs[0].name in new_tensors and isinstance(new_tensors[node.outputs[0].name], gs.Constant):
            continue
        original = by_output.get(node.outputs[0].name)
        if original is not None and original.op == node.op and len(original.outputs) == len(node.outputs):
            original.attrs = dict(node.attrs)
            inputs = [mapped(t) for t in node.inputs]
            original.inputs.clear()
            original.inputs.extend(inputs)
            kept.add(id(original))
            continue
        graph.nodes.append(gs.Node(node.op, node.name, attrs=dict(node.attrs), inputs=[mapped(t) for t in node.inputs],
                                   outputs=[mapped(t) for t in node.outputs], domain=node.domain))
    for node in changed:
        if id(node) not in kept:  # replaced by the converter's nodes, which now produce its outputs
            node.inputs.clear()
            node.outputs.clear()
            graph.nodes.remove(node)


def add_domain(graph: gs.Graph, domain: str, version: int = 1) -> None:
    """Declares a custom/contrib operator domain (com.microsoft, qcompiler) on the graph."""
    domains = graph.import_domains or [onnx.helper.make_opsetid("", graph.opset)]
    if not any(d.domain == domain for d in domains):
        domains.append(onnx.helper.make_opsetid(domain, version))
    graph.import_domains = domains


def constant_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a tensor if it is known at compile time (initializer or Constant node), else None."""
    if isinstance(tensor, gs.Constant):
        return tensor.values
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        attr = tensor.inputs[0].attrs.get("value")
        if isinstance(attr, gs.Constant):
            return attr.values
    return None


def subgraph_model(graph: gs.Graph, nodes: list[gs.Node], inputs: list[gs.Tensor], outputs: list[gs.Tensor], *,
                   weightless_above: int | None = None) -> onnx.ModelProto:
    """A standalone model of ``nodes`` (in graph order) reading ``inputs`` and the constants they use, for
    evaluating or inferring part of ``graph`` without exporting all of it (nor editing it).

    With ``weightless_above``, constants of more elements become typed graph inputs without data: what
    shape inference needs, at none of the weights' memory.
    """
    from onnx_graphsurgeon.exporters.onnx_exporter import OnnxExporter

    def info(t: gs.Tensor) -> onnx.ValueInfoProto:
        if t.dtype is None:  # untyped intermediates of TorchScript exports: ONNX Runtime infers them
            return onnx.helper.make_empty_tensor_value_info(t.name)
        return onnx.helper.make_tensor_value_info(t.name, onnx.helper.np_dtype_to_tensor_dtype(np.dtype(t.dtype)), t.shape)

    members = {id(n) for n in nodes}
    ordered = [n for n in graph.nodes if id(n) in members]
    constants = {t.name: t for n in ordered for t in n.inputs if isinstance(t, gs.Constant)}
    heavy = {name for name, t in constants.items() if weightless_above is not None and t.values.size > weightless_above}
    initializers = [OnnxExporter.export_tensor_proto(t) for name, t in constants.items() if name not in heavy]
    graph_inputs = [info(t) for t in inputs] + [info(constants[name]) for name in heavy]
    body = onnx.helper.make_graph([OnnxExporter.export_node(n) for n in ordered], "subgraph", graph_inputs,
                                  [info(t) for t in outputs], initializers)
    domains = graph.import_domains or [onnx.helper.make_opsetid("", graph.opset)]
    model = onnx.helper.make_model(body, opset_imports=list(domains))
    model.ir_version = min(model.ir_version, 10)
    return model


def symbolic_shapes(graph: gs.Graph) -> dict[str, list[int | str]]:
    """Each tensor's shape as ONNX Runtime's symbolic shape inference derives it (ints, or symbols such as
    the graph inputs' ``batch``/``seq``), run on a weightless copy. It resolves what TorchScript exports
    compute at run time (``Shape -> Gather -> Concat -> Reshape``), e.g. the head count of Q.
    Empty when the inference fails (it does not know every contrib op)."""
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    model = subgraph_model(graph, graph.nodes, [t for t in graph.inputs if not isinstance(t, gs.Constant)],
                           graph.outputs, weightless_above=1024)
    try:
        inferred = SymbolicShapeInference.infer_shapes(model, auto_merge=True)
    except Exception as err:  # an assertion or KeyError deep inside the tool, on ops it does not handle
        logger.info("symbolic shape inference failed: %s: %s", type(err).__name__, err)
        return {}
    if inferred is None:
        return {}
    return {v.name: [d.dim_value if d.HasField("dim_value") else d.dim_param for d in v.type.tensor_type.shape.dim]
            for v in list(inferred.graph.value_info) + list(inferred.graph.output) if v.type.tensor_type.HasField("shape")}


def scalar_value(tensor: gs.Tensor) -> float | None:
    """The value of a compile-time constant with one element, else None."""
    value = constant_value(tensor)
    return float(np.asarray(value).reshape(-1)[0]) if value is not None and np.asarray(value).size == 1 else None


def producer(tensor: gs.Tensor, *ops: str) -> gs.Node | None:
    """The node producing ``tensor`` if it is one of ``ops``, else None."""
    return tensor.inputs[0] if len(tensor.inputs) == 1 and tensor.inputs[0].op in ops else None


def value_readers(tensor: gs.Tensor) -> list[gs.Node]:
    """The nodes that read ``tensor``'s values: every reader but Shape ops, which read only its shape."""
    return [n for n in tensor.outputs if n.op != "Shape"]


def single_consumer(tensor: gs.Tensor) -> gs.Node | None:
    return tensor.outputs[0] if len(tensor.outputs) == 1 else None


@dataclass
class WeightedGemm:
    """A MatMul/Gemm whose second operand is a constant 2-D weight.

    ``weight_kn`` is the weight as [K, N] (input channels x output channels) whatever the storage:
    MatMul stores B as [K, N]; Gemm with transB=1 stores it as [N, K].
    """

    node: gs.Node
    activation: gs.Variable
    weight: gs.Constant
    transposed: bool

    @property
    def weight_kn(self) -> np.ndarray:
        return self.weight.values.T if self.transposed else self.weight.values

    @property
    def k(self) -> int:
        return self.weight_kn.shape[0]

    @property
    def n(self) -> int:
        return self.weight_kn.shape[1]

    @property
    def weight_is_shared(self) -> bool:
        return len(self.weight.outputs) > 1

    @property
    def produces_graph_output(self) -> bool:
        return any(o.name in self.graph_output_names for o in self.node.outputs)

    graph_output_names: frozenset[str] = frozenset()


def weighted_gemms(graph: gs.Graph, op_types: tuple[str, ...] = ("MatMul", "Gemm")) -> list[WeightedGemm]:
    """Every MatMul/Gemm of ``graph`` whose B is a float constant of rank 2, in topological order.

    Gemm qualifies only with transA=0 and alpha=1 (scaling folds are not worth the special cases).
    """
    outputs = frozenset(t.name for t in graph.outputs)
    found = []
    for node in graph.nodes:
        if node.op not in op_types or len(node.inputs) < 2:
            continue
        activation, weight = node.inputs[0], node.inputs[1]
        if not isinstance(weight, gs.Constant) or isinstance(activation, gs.Constant):
            continue
        if weight.values.ndim != 2 or not np.issubdtype(weight.values.dtype, np.floating):
            continue
        transposed = False
        if node.op == "Gemm":
            if node.attrs.get("transA", 0) or node.attrs.get("alpha", 1.0) != 1.0:
                continue
            transposed = bool(node.attrs.get("transB", 0))
        found.append(WeightedGemm(node, activation, weight, transposed, outputs))
    return found
