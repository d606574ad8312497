"""Tiny graphs built in code, shared by the pass tests."""

import numpy as np
from onnx import TensorProto, helper, numpy_helper


def make_model(nodes, inits, inputs, outputs, opset=18, domains=()):
    graph = helper.make_graph(nodes, "g", inputs, outputs, inits)
    imports = [helper.make_opsetid("", opset)] + [helper.make_opsetid(d, 1) for d in domains]
    return helper.make_model(graph, opset_imports=imports, ir_version=10)


def two_linear_model(rng, k=32, n=48, t=12, outlier=0.0):
    """x -> Relu -> {MatMul W1, Gemm(transB) W2 + b} -> Tanh;  also a tiny MatMul (N=4) that must stay float.

        x --Relu--> h --+--> MatMul(W1 [K,N])            --Tanh--> y1
                        +--> Gemm(W2 [N,K], transB=1, b)  --Tanh--> y2
                        +--> MatMul(Wt [K,4])            --Tanh--> y3   (tiny: skipped)
    (Tanh keeps the GEMMs from producing graph outputs, which the LM-head rule would skip.)
    """
    w1 = rng.normal(size=(k, n)).astype(np.float32)
    w2 = rng.normal(size=(n, k)).astype(np.float32)
    nodes = [helper.make_node("Relu", ["x"], ["h"], name="relu"),
             helper.make_node("MatMul", ["h", "w1"], ["m1"], name="fc1"),
             helper.make_node("Gemm", ["h", "w2", "b2"], ["m2"], name="fc2", transB=1),
             helper.make_node("MatMul", ["h", "wt"], ["m3"], name="tiny")]
    nodes += [helper.make_node("Tanh", [f"m{i}"], [f"y{i}"]) for i in (1, 2, 3)]
    inits = [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2"),
             numpy_helper.from_array(rng.normal(size=n).astype(np.float32), "b2"),
             numpy_helper.from_array(rng.normal(size=(k, 4)).astype(np.float32), "wt")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["rows", k])]
    outputs = [helper.make_tensor_value_info("y1", TensorProto.FLOAT, ["rows", n]),
               helper.make_tensor_value_info("y2", TensorProto.FLOAT, ["rows", n]),
               helper.make_tensor_value_info("y3", TensorProto.FLOAT, ["rows", 4])]
    return make_model(nodes, inits, inputs, outputs)
