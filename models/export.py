"""torch -> ONNX export shared by the model builders and importers.

It runs ``torch.onnx.export(..., dynamo=True)`` -- the exporter users get from torch 2.9 on -- and
then tidies only what the exporter leaves in a state every consumer would trip over:

* ``Transpose`` of a constant weight in front of a ``MatMul``: the exporter's own constant folding
  skips tensors above a size limit (a 49152 x 576 LM head stays ``Transpose -> MatMul``). Folded
  here, so every ``nn.Linear`` becomes a ``MatMul`` whose second input is an ``[in, out]``
  initializer (or a ``Gemm`` for ``addmm`` users such as GPT-2's Conv1D).
* Names: the exporter calls Linear nodes ``node_linear_4`` and folded weights ``val_155``.
  Nodes are renamed after the module that made them (``model.layers.0.self_attn.q_proj/linear``),
  anonymous MatMul/Gemm weights after their module (``...q_proj.weight_t``, ``_t`` for the
  transposed ``[in, out]`` layout), and a wrapper module's attribute prefix is stripped, so that
  reports and ``--exclude REGEX`` can name layers. Nothing else about the graph changes.

Everything else (the decomposed RMSNorm chain, the additive attention mask, deduplication of equal
initializers) is left exactly as torch exports it, because that is what the compiler meets in the wild.
"""

from __future__ import annotations

import ast
import logging
import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import onnx

__all__ = ["DEFAULT_OPSET", "export_module"]

logger = logging.getLogger(__name__)

# Opset 18 keeps RMSNorm decomposed (RMSNormalization only exists from opset 23) and LayerNorm as one
# LayerNormalization op (opset 17+); ONNX Runtime CPU runs it everywhere we care about.
DEFAULT_OPSET = 18

_SCOPES_KEY = "pkg.torch.onnx.name_scopes"


def export_module(
    module,
    example_inputs: Mapping[str, object],
    output_names: Sequence[str],
    *,
    dynamic_dims: Mapping[str, Mapping[int, str]] | None = None,
    opset: int = DEFAULT_OPSET,
    strip_prefix: str = "",
    readable_names: bool = True,
) -> onnx.ModelProto:
    """Exports ``module`` to an fp32 ONNX model whose Linear weights are constant MatMul/Gemm inputs.

    Args:
        module: a ``torch.nn.Module`` in eval mode whose ``forward`` takes the example inputs
            positionally, in the given order, and returns one tensor per output name.
        example_inputs: graph input name -> example tensor. Give dynamic dims a size > 1 so
            torch.export does not specialise them.
        output_names: graph output names, in the order ``forward`` returns them.
        dynamic_dims: input name -> {axis: symbolic dim name}; equal names share one dimension.
        opset: default-domain opset of the exported model.
        strip_prefix: parameter-name prefix to drop (the attribute under which a wrapper holds the
            real model, e.g. ``"hf."``).
        readable_names: rename nodes and anonymous weights after their torch module.

    Returns:
        The exported model (ir_version <= 10 for ONNX Runtime).

    Raises:
        RuntimeError: a MatMul/Gemm still takes its weight through a runtime Transpose (a folding gap).
    """
    import onnx_ir as ir
    import torch

    dims: dict[str, object] = {}
    dynamic_shapes = None
    if dynamic_dims:
        # Positional, so the forward's parameter names need not equal the graph input names.
        dynamic_shapes = tuple(
            {
                ax: dims.setdefault(dim, torch.export.Dim(dim))
                for ax, dim in dynamic_dims.get(name, {}).items()
            }
            for name in example_inputs
        )
    with warnings.catch_warnings():
        # torch/transformers deprecation chatter from inside the exporter, not actionable by our callers.
        warnings.simplefilter("ignore", FutureWarning)
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.filterwarnings("ignore", message="# The axis name", category=UserWarning)
        with torch.no_grad():
            program = torch.onnx.export(
                module,
                tuple(example_inputs.values()),
                dynamo=True,
                opset_version=opset,
                input_names=list(example_inputs),
                output_names=list(output_names),
                dynamic_shapes=dynamic_shapes,
                optimize=True,
                verbose=False,
            )
    model = program.model
    folded = _fold_weight_transposes(model)
    if folded:
        logger.info("folded %d Transpose(weight) nodes the exporter left in front of MatMul", folded)
    param_names = {name for name, _ in module.named_parameters(remove_duplicate=False)}
    param_names |= {name for name, _ in module.named_buffers(remove_duplicate=False)}
    if readable_names:
        _rename(model, param_names, strip_prefix)
    _check_no_weight_transpose(model)
    proto = ir.to_proto(model)
    proto.ir_version = min(proto.ir_version, 10)
    return proto


def _is_const(value) -> bool:
    return value is not None and value.const_value is not None and value.producer() is None


def _fold_weight_transposes(model) -> int:
    """Replaces Transpose(constant) by a transposed constant; returns how many were folded."""
    import onnx_ir as ir

    graph = model.graph
    count = 0
    for node in list(graph):
        if node.op_type != "Transpose" or node.domain != "" or not _is_const(node.inputs[0]):
            continue
        source = node.inputs[0]
        array = source.const_value.numpy()
        perm_attr = node.attributes.get("perm")
        perm = list(perm_attr.as_ints()) if perm_attr is not None else list(range(array.ndim))[::-1]
        out = node.outputs[0]
        if out.is_graph_output():
            continue
        tensor = ir.tensor(np.ascontiguousarray(array.transpose(perm)), name=out.name)
        new = ir.Value(
            name=out.name, shape=ir.Shape(tensor.shape), type=ir.TensorType(tensor.dtype), const_value=tensor
        )
        out.replace_all_uses_with(new)
        graph.remove(node, safe=True)
        graph.register_initializer(new)
        if not source.uses() and source.is_initializer() and not source.is_graph_input():
            graph.initializers.pop(source.name)
        count += 1
    return count


def _module_path(node) -> str | None:
    scopes = node.metadata_props.get(_SCOPES_KEY)
    if not scopes:
        return None
    try:
        parts = ast.literal_eval(scopes)
    except (ValueError, SyntaxError):
        return None
    # [..., deepest module path, fx node name]; the root module's path is ''.
    return parts[-2] if len(parts) >= 2 and parts[-2] else None


def _strip(name: str, prefix: str) -> str:
    return name[len(prefix) :] if prefix and name.startswith(prefix) else name


def _rename(model, param_names: set[str], prefix: str) -> None:
    graph = model.graph
    taken_nodes = {n.name for n in graph}
    for node in graph:
        path = _module_path(node)
        if path is None:
            continue
        base = (
            node.name[len("node_") :]
            if node.name and node.name.startswith("node_")
            else (node.name or node.op_type)
        )
        module_path = "" if prefix and path == prefix.rstrip(".") else _strip(path, prefix)
        new = f"{module_path}/{base}" if module_path else base
        if new not in taken_nodes:
            taken_nodes.discard(node.name)
            node.name = new
            taken_nodes.add(new)
    # Parameters keep their torch names (minus the wrapper prefix).
    param_names = param_names | {_strip(name, prefix) for name in param_names}
    for name, value in list(graph.initializers.items()):
        stripped = _strip(name, prefix)
        if name in param_names and stripped != name and stripped not in graph.initializers:
            value.name = stripped
    # Anonymous weights (folded transposes) are named after the Linear that consumes them.
    for node in graph:
        if node.op_type not in ("MatMul", "Gemm") or node.domain != "" or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        path = _module_path(node)
        if path is None or not _is_const(weight) or not weight.is_initializer() or weight.name in param_names:
            continue
        if len(weight.uses()) != 1:
            continue
        new = f"{_strip(path, prefix)}.weight_t"
        if new not in graph.initializers:
            weight.name = new


def _check_no_weight_transpose(model) -> None:
    for node in model.graph:
        if node.op_type not in ("MatMul", "Gemm") or len(node.inputs) < 2 or node.inputs[1] is None:
            continue
        producer = node.inputs[1].producer()
        if producer is not None and producer.op_type == "Transpose" and _is_const(producer.inputs[0]):
            raise RuntimeError(f"{node.name}: weight still passes through Transpose {producer.name}")
