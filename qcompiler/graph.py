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
    "constant_value", "single_consumer", "ONNX_PROTO_LIMIT", "WeightedGemm", "weighted_gemms", "KEEP_FLOAT_SUFFIX",
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
    """Raises the default-domain opset to ``minimum`` if lower, logging why (never lowers it)."""
    if graph.opset >= minimum:
        return
    logger.warning("raising opset %d -> %d: %s", graph.opset, minimum, reason)
    graph.opset = minimum
    if graph.import_domains:
        for d in graph.import_domains:
            if d.domain in ("", "ai.onnx"):
                d.version = minimum


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
