"""The op contract (CPU): shape rules, attribute checks, the INT4 layout against MatMulNBits in ONNX Runtime,
and (when Triton is installed) that every op's AOT build produces PTX whose parameters match the plan."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from qcompiler.plugins import ops


def test_shapes_symbolic_and_int():
    assert ops.infer_output_shapes("Int4Gemm", [["b", "s", 4096], [11008, 32, 64], [11008, 32], None, None]) == [["b", "s", 11008]]
    assert ops.infer_output_shapes("Int4Gemm", [[7, 64], None, None, None, None], {"N": 5}) == [[7, 5]]
    assert ops.infer_output_shapes("W8A8Gemm", [["m", 64], ["m"], [32, 64], [32], None]) == [["m", 32]]
    assert ops.infer_output_shapes("QuantizePerToken", [[2, 3, 8], None, None]) == [[2, 3, 8], [2, 3]]
    assert ops.infer_output_shapes("FlashAttention", [["B", 8, "S", 64], ["B", 2, "T", 64], ["B", 2, "T", 64], None]) == \
        [["B", 8, "S", 64], ["B", 8, "S"]]
    with pytest.raises(ValueError, match="rank"):
        ops.infer_output_shapes("FlashAttention", [[8, 16, 64], [8, 16, 64], [8, 16, 64], None])


def test_attributes():
    assert ops.validate_attributes("Int4Gemm", {"K": 100, "N": 8, "block_size": 32})["bits"] == 4
    assert ops.validate_attributes("Int4Gemm", {"K": 100, "N": 8, "block_size": 112})["block_size"] == 112  # per-channel
    for bad in ({"K": 100, "N": 8, "block_size": 48}, {"K": 100, "N": 8}, {"K": 1, "N": 1, "block_size": 32, "bits": 8}):
        with pytest.raises(ValueError, match="Int4Gemm node 'n1'"):
            ops.validate_attributes("Int4Gemm", bad, "n1")
    assert ops.validate_attributes("QuantizePerToken", {"norm": b"rms"})["norm"] == "rms"
    with pytest.raises(ValueError, match="norm"):
        ops.validate_attributes("QuantizePerToken", {"norm": "batch"})
    with pytest.raises(ValueError, match="unknown attribute"):
        ops.validate_attributes("FlashAttention", {"is_causal": 1})


@pytest.mark.parametrize("K,block,sym", [(100, 32, True), (64, 16, False), (200, 64, False)])
def test_int4_layout_matches_matmulnbits(K, block, sym):
    """Our documented layout == what ORT's com.microsoft.MatMulNBits computes."""
    ort = pytest.importorskip("onnxruntime")
    rng = np.random.default_rng(K)
    N, M = 24, 5
    w = rng.standard_normal((N, K)).astype(np.float32)
    b, s, z = ops.pack_int4_matmulnbits(w, block, symmetric=sym)
    x = rng.standard_normal((M, K)).astype(np.float32)
    inits = [onnx.numpy_helper.from_array(b, "B"), onnx.numpy_helper.from_array(s, "S")]
    ins = ["X", "B", "S"]
    if z is not None:
        inits.append(onnx.numpy_helper.from_array(z, "Z"))
        ins.append("Z")
    node = helper.make_node("MatMulNBits", ins, ["Y"], domain="com.microsoft", K=K, N=N, bits=4, block_size=block)
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("X", TensorProto.FLOAT, [M, K])],
                          [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [M, N])], inits)
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 9
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(None, {"X": x})[0]
    ref = x @ ops.unpack_int4_matmulnbits(b, s, z, K).T
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)
    # and the quantization is a real approximation of w (RTN 4-bit: a few percent)
    err = np.linalg.norm(ops.unpack_int4_matmulnbits(b, s, z, K) - w) / np.linalg.norm(w)
    assert err < 0.15


def test_aot_builds_every_op():
    pytest.importorskip("triton")
    from qcompiler.plugins import aot

    configs = [aot.Int4GemmPlugin("float16", 256, 512, 128, True, True, "m16"),
               aot.W8A8GemmPlugin("bfloat16", 256, 512, False, "small"),
               aot.QuantizePerTokenPlugin("float16", 512, "rms"),
               aot.FlashAttentionPlugin("float16", 4, 2, 64, True, 0.0, True, "d64"),
               aot.FlashAttentionPlugin("bfloat16", 4, 1, 128, False, 0.0, False, "d128", has_key_mask=True)]
    for cfg in configs:
        k = aot.build(cfg)
        assert f".entry {k.kernel_name}(" in k.ptx and ".target sm_90a" in k.ptx
        assert 0 < k.shared_mem <= 227 * 1024 or cfg.op_type == "QuantizePerToken"
        tensor_names = [src for _, kind, src in k.params if kind in ("in", "out")]
        spec = ops.OP_SPECS[cfg.op_type]
        ins = [n for n in tensor_names if n in spec.inputs]
        assert ins == [n for n in spec.inputs if n in ins]  # op input order (TensorRT passes inputs in order)
        kinds = [kind for _, kind, _ in k.params if kind != "ptr"]
        assert kinds == sorted(kinds, key=["in", "i32", "out"].index)  # inputs, scalars, outputs
    from qcompiler.plugins.int4_gemm import INT4_TACTICS

    int4 = aot.build(configs[0])
    t = INT4_TACTICS["m16"]
    assert tuple(g.evaluate({"M": 33}) for g in int4.grid) == (-(-256 // t.BLOCK_N), -(-33 // t.BLOCK_M), 1)


def test_attention_masks_are_refused_when_malformed_or_both_given():
    """Checked before any launch, so on a CPU too: seqlens_k and key_mask exclude each other, and a key mask must
    be contiguous int32 [B, Sk]."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from qcompiler.plugins import aot
    from qcompiler.plugins.flash_attention import flash_attention

    q = k = v = torch.zeros(2, 4, 8, 64, dtype=torch.float16)
    keep = torch.ones(2, 8, dtype=torch.int32)
    with pytest.raises(ValueError, match="give seqlens_k or key_mask, not both"):
        flash_attention(q, k, v, seqlens_k=torch.full((2,), 8, dtype=torch.int32), key_mask=keep)
    for bad in (keep.bool(), keep[:, :4], keep.t().contiguous().t()):
        with pytest.raises(ValueError, match="key_mask must be contiguous int32"):
            flash_attention(q, k, v, key_mask=bad)
    with pytest.raises(ValueError, match="exclude each other"):
        aot.build(aot.FlashAttentionPlugin("float16", 4, 4, 64, False, 0.0, True, "d64", has_key_mask=True))
