"""A decoder compiled for the TensorRT plugins, end to end on a CPU.

    decoder (tests/passes/graphs.py) ─ WeightOnlyRTN (INT4, MatMulNBits) ─ LowerInt4Gemm ─ FuseAttention("plugin")

Every projection becomes ``qcompiler::Int4Gemm`` and every attention ``qcompiler::FlashAttention``
(its causal mask is computed at run time from the input's shape). Run with the ops' numpy references
under ONNX's reference evaluator, the plugin graph must compute what ONNX Runtime computes for the
MatMulNBits graph. tests/plugins/test_plugin_graph_gpu.py runs the same graph on the plugins' kernels.
"""

import numpy as np
import onnx

from qcompiler.config import WeightOnlyConfig
from qcompiler.graph import export_graph, import_graph
from qcompiler.pass_manager import PassContext
from qcompiler.passes.fuse_attention import FuseAttention
from qcompiler.passes.lower_int4_gemm import LowerInt4Gemm
from qcompiler.passes.rtn import WeightOnlyRTN
from tests.helpers import run_ort, run_reference
from tests.passes.graphs import decoder_model

LAYERS = 2
PROJECTIONS = 7 * LAYERS  # q, k, v, o, gate, up, down (the LM head stays float)


def plugin_graph(model: onnx.ModelProto, group_size: int = 64) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(the MatMulNBits graph, the plugin graph) of ``model``."""
    graph = import_graph(model)
    rtn = WeightOnlyRTN(WeightOnlyConfig(bits=4, group_size=group_size, accuracy_level=0)).run(graph, PassContext())
    assert len(rtn.details) == PROJECTIONS, rtn.not_fired
    nbits = export_graph(graph)
    lowered = LowerInt4Gemm().run(graph, PassContext())
    fused = FuseAttention("plugin", max_seq_len=256).run(graph, PassContext())
    assert len(lowered.details) == PROJECTIONS and len(fused.details) == LAYERS, (lowered.not_fired, fused.not_fired)
    return nbits, export_graph(graph)


def test_decoder_lowers_to_plugin_ops_and_keeps_its_function():
    model = decoder_model(np.random.default_rng(0), layers=LAYERS)
    nbits, plugins = plugin_graph(model)
    ops = [n.op_type for n in plugins.graph.node]
    assert ops.count("Int4Gemm") == PROJECTIONS and ops.count("FlashAttention") == LAYERS
    assert not {"Softmax", "MatMulNBits", "Expand"} & set(ops)  # attention, its mask and repeat_kv are gone
    feeds = {"input_ids": np.random.default_rng(1).integers(0, 384, (2, 37))}
    expected = run_ort(nbits, feeds)[0]
    np.testing.assert_allclose(run_reference(plugins, feeds)[0], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
