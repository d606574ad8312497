"""GPTQ pass: sequential GPTQ on tiny graphs, lowered like RTN, more accurate than RTN."""

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from qcompiler.algorithms.gptq import HessianAccumulator, gptq_quantize
from qcompiler.algorithms.packing import unpack_int4
from qcompiler.calibration import iterate_feeds
from qcompiler.config import GPTQConfig, WeightLowering, WeightOnlyConfig
from qcompiler.errors import CalibrationDataError
from qcompiler.pass_manager import PassContext
from qcompiler.passes.gptq import GPTQ
from qcompiler.passes.rtn import WeightOnlyRTN
from tests.helpers import run_ort, sqnr_db
from tests.passes.test_rtn import apply, mlp_model, negative_model


def correlated_inputs(rng, rows, k, rho=0.5):
    """Rows with correlated channels of unequal scale (LLM activations are far from white)."""
    mix = np.linalg.cholesky((1 - rho) * np.eye(k) + rho * np.ones((k, k)))
    scale = np.random.default_rng(123).uniform(0.3, 3.0, size=k)
    return ((rng.normal(size=(rows, k)) @ mix.T) * scale).astype(np.float32)


def context(arrays, batch=32):
    return PassContext(calibration_feeds=iterate_feeds(arrays, batch=batch))


@pytest.mark.parametrize("lowering", list(WeightLowering))
def test_gptq_lowers_like_rtn_and_beats_it(lowering):
    rng = np.random.default_rng(0)
    model = mlp_model(rng)
    calib = {"x": correlated_inputs(rng, 512, 64)}
    x = correlated_inputs(rng, 256, 64)
    gptq_out, result = apply(GPTQ(GPTQConfig(group_size=32, lowering=lowering, accuracy_level=0)), model,
                             context(calib))
    rtn_out, _ = apply(WeightOnlyRTN(WeightOnlyConfig(group_size=32, lowering=lowering, accuracy_level=0)), model)
    assert sorted(d["node"] for d in result.details) == ["fc1", "fc2"]
    assert [d["stage"] for d in sorted(result.details, key=lambda d: d["node"])] == [0, 1]
    assert ("tiny", "tiny GEMM (K=96, N=4 < 16)") in result.not_fired
    assert sorted(n.op_type for n in gptq_out.graph.node) == sorted(n.op_type for n in rtn_out.graph.node)
    ref = run_ort(model, {"x": x})[0]
    gptq_db, rtn_db = sqnr_db(ref, run_ort(gptq_out, {"x": x})[0]), sqnr_db(ref, run_ort(rtn_out, {"x": x})[0])
    assert gptq_db > rtn_db + 1.0, (gptq_db, rtn_db)


def _shared_input_model(rng, k=64, n=(48, 32)):
    """Two GEMMs reading one activation share one Hessian (q/k-style)::

        x --MatMul(Wa) "a"--Tanh--> ya
        x --MatMul(Wb) "b"--Tanh--> yb
    """
    inits = [numpy_helper.from_array(rng.normal(size=(k, m)).astype(np.float32), f"w{c}") for c, m in zip("ab", n, strict=True)]
    nodes = [helper.make_node("MatMul", ["x", f"w{c}"], [f"m{c}"], name=c) for c in "ab"]
    nodes += [helper.make_node("Tanh", [f"m{c}"], [f"y{c}"]) for c in "ab"]
    graph = helper.make_graph(nodes, "shared", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["r", k])],
                              [helper.make_tensor_value_info(f"y{c}", TensorProto.FLOAT, ["r", m]) for c, m in zip("ab", n, strict=True)],
                              inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def test_stacked_solve_equals_gptq_of_each_weight():
    """The pass's plumbing (transposes, stacking q/k-style GEMMs, code storage) against the pure function."""
    rng = np.random.default_rng(1)
    model = _shared_input_model(rng)
    calib = correlated_inputs(rng, 300, 64)
    out, result = apply(GPTQ(GPTQConfig(group_size=16, lowering=WeightLowering.QDQ)), model, context({"x": calib}, 64))
    assert {d["node"]: d["shared_with"] for d in result.details} == {"a": 2, "b": 2}
    acc = HessianAccumulator(64, device="cpu")
    acc.add_batch(calib)
    H = acc.finalize()
    inits = {t.name: t for t in out.graph.initializer}
    for name in "ab":
        w = numpy_helper.to_array(next(t for t in model.graph.initializer if t.name == f"w{name}"))
        expected = gptq_quantize(torch.from_numpy(w.T.copy()), H, bits=4, group_size=16, act_order=True, device="cpu")
        codes = unpack_int4(inits[f"w{name}/q4"].raw_data, tuple(inits[f"w{name}/q4"].dims), signed=True)
        assert np.mean(codes == expected.codes.numpy().T) > 0.999
        np.testing.assert_allclose(numpy_helper.to_array(inits[f"w{name}/scale"]), expected.scales.numpy().T, rtol=1e-6)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
@pytest.mark.parametrize("symmetric", [True, False])
def test_formats_run_and_lowerings_agree(bits, symmetric):
    rng = np.random.default_rng(bits)
    model = mlp_model(rng, k=80)
    calib = {"x": correlated_inputs(rng, 128, 80)}
    x = correlated_inputs(rng, 64, 80)
    outs = {}
    for lowering in WeightLowering:
        config = GPTQConfig(bits=bits, group_size=16 if bits < 8 else None, symmetric=symmetric, lowering=lowering,
                            act_order=bits != 2, accuracy_level=0)
        outs[lowering], _ = apply(GPTQ(config), model, context(calib))
    y_qdq = run_ort(outs[WeightLowering.QDQ], {"x": x})[0]
    np.testing.assert_allclose(run_ort(outs[WeightLowering.MATMUL_NBITS], {"x": x})[0], y_qdq, rtol=1e-5, atol=1e-5)
    floor = {2: 3.0, 3: 10.0, 4: 16.0, 8: 35.0}[bits]
    assert sqnr_db(run_ort(model, {"x": x})[0], y_qdq) > floor


def test_needs_calibration_data_but_not_when_nothing_to_do():
    rng = np.random.default_rng(2)
    with pytest.raises(CalibrationDataError, match="calibration data"):
        apply(GPTQ(GPTQConfig(group_size=32)), mlp_model(rng))
    out, result = apply(GPTQ(GPTQConfig(group_size=16)), negative_model(rng))
    assert not result.changed
    assert {n for n, _ in result.not_fired} == {"shared_a", "shared_b", "input_weight", "head"}


def test_feed_with_a_missing_input_is_a_clear_error():
    rng = np.random.default_rng(3)
    with pytest.raises(CalibrationDataError, match="'x'"):
        apply(GPTQ(GPTQConfig(group_size=32)), mlp_model(rng), context({"other": np.zeros((4, 64), np.float32)}))


def test_input_model_is_not_modified():
    rng = np.random.default_rng(4)
    model = mlp_model(rng)
    before = model.SerializeToString()
    out, _ = apply(GPTQ(GPTQConfig(group_size=32, lowering=WeightLowering.QDQ)), model,
                   context({"x": correlated_inputs(rng, 64, 64)}))
    assert model.SerializeToString() == before
    onnx.checker.check_model(out)
