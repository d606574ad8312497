"""A decoder compiled for the TensorRT plugins, end to end on a CPU.

    decoder (tests/passes/graphs.py) ─ WeightOnlyRTN (INT4, MatMulNBits) ─ LowerInt4Gemm ─ [LowerW8A8Gemm] ─ FuseAttention("plugin")

Every projection becomes ``qcompiler::Int4Gemm`` and every attention ``qcompiler::FlashAttention``
(its causal mask is computed at run time from the input's shape). Run with the ops' numpy references
under ONNX's reference evaluator, the plugin graph must compute what ONNX Runtime computes for the
MatMulNBits graph. tests/plugins/test_plugin_graph_gpu.py runs the same graph on the plugins' kernels.
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from qcompiler.backends.plugin_graph import run_plugin_graph
from qcompiler.config import Recipe, WeightOnlyConfig
from qcompiler.evaluation import cache_inputs, lm_feeds, logits_through_cache
from qcompiler.graph import export_graph, import_graph
from qcompiler.pass_manager import PassContext
from qcompiler.pipeline import build_passes
from tests.helpers import run_ort
from tests.passes.graphs import decoder_model

LAYERS = 2
PROJECTIONS = 7 * LAYERS  # q, k, v, o, gate, up, down (the LM head stays float)


def plugin_graph(model: onnx.ModelProto, group_size: int = 64) -> tuple[onnx.ModelProto, onnx.ModelProto]:
    """(the MatMulNBits graph, the plugin graph) of ``model``, through `--backend tensorrt --plugins`'s pass list."""
    recipe = Recipe("rtn", weight_only=WeightOnlyConfig(bits=4, group_size=group_size, accuracy_level=0))
    rtn, *lowerings = build_passes(recipe, "tensorrt", plugins=True, max_seq_len=256)
    graph = import_graph(model)
    quantized = rtn.run(graph, PassContext())
    assert len(quantized.details) == PROJECTIONS, quantized.not_fired
    nbits = export_graph(graph)
    lowered, _, fused = (p.run(graph, PassContext()) for p in lowerings)
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
    np.testing.assert_allclose(run_plugin_graph(plugins, feeds)[0], expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def padded_feeds(batch: int, seq: int, seed: int) -> dict[str, np.ndarray]:
    """Token ids and an attention_mask whose rows are left-padded, right-padded, full, ... in turn."""
    mask = np.ones((batch, seq), np.int64)
    pad = max(1, seq // 3)
    for row in range(batch):
        if row % 3 == 0 and seq > 1:
            mask[row, :pad] = 0
        elif row % 3 == 1 and seq > 1:
            mask[row, -pad:] = 0
    return {"input_ids": np.random.default_rng(seed).integers(0, 384, (batch, seq)), "attention_mask": mask}


def test_padded_decoder_takes_its_attention_mask_as_the_key_mask():
    """A decoder with an attention_mask input: FlashAttention reads it as key_mask and the plugin graph
    computes the MatMulNBits graph's logits at every real token (a left-padded position sees no key:
    its logits are the padding's, O = 0 there where the unfused graph averages masked keys)."""
    model = decoder_model(np.random.default_rng(0), layers=LAYERS, padding=True)
    nbits, plugins = plugin_graph(model)
    flash = [n for n in plugins.graph.node if n.op_type == "FlashAttention"]
    assert len(flash) == LAYERS and all(len(n.input) == 5 and n.input[4] for n in flash)
    feeds = padded_feeds(3, 37, seed=1)
    expected, got = run_ort(nbits, feeds)[0], run_plugin_graph(plugins, feeds)[0]
    tokens = feeds["attention_mask"] == 1
    np.testing.assert_allclose(got[tokens], expected[tokens], rtol=1e-4, atol=1e-4 * np.abs(expected).max())


CACHE_BOUNDS = [0, 21, 29, 30, 31, 32, 33]  # a prefill, a chunk of 8 over its cache, then 4 one-token decode steps


def cached_feeds(batch: int, seed: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """A padded window of 33 tokens as one prefill (empty caches) for the cached decoder, and its cache inputs."""
    model = decoder_model(np.random.default_rng(0), layers=LAYERS, cache=True)
    feeds = lm_feeds(model, np.zeros((1, 33), np.int64))[0] | padded_feeds(batch, 33, seed)
    caches = cache_inputs(model)
    return feeds | {name: np.repeat(feeds[name], batch, axis=0) for name in caches}, caches


def test_decoder_steps_through_its_kv_cache():
    """The decoder as one step over a KV cache: FlashAttention takes the cache's keys concatenated before the new
    ones (causal bottom-right aligned, attention_mask over both as the key_mask), and a padded window fed as a
    prefill, a chunk and one-token decode steps, each step's presents fed back, gives the MatMulNBits graph's
    logits at every real token, as does the whole window in one prefill."""
    model = decoder_model(np.random.default_rng(0), layers=LAYERS, cache=True)
    nbits, plugins = plugin_graph(model)
    flash = [n for n in plugins.graph.node if n.op_type == "FlashAttention"]
    assert [n.input[1] for n in flash] == [f"present.{layer}.key" for layer in range(LAYERS)]
    feeds, caches = cached_feeds(3, seed=1)
    expected = run_ort(nbits, feeds)[0]
    tokens = feeds["attention_mask"] == 1
    for got in (run_plugin_graph(plugins, feeds)[0],
                logits_through_cache(lambda f: run_plugin_graph(plugins, f), feeds, caches, CACHE_BOUNDS)):
        np.testing.assert_allclose(got[tokens], expected[tokens], rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_output_comparison_leaves_out_padding_positions(tmp_path):
    """qcompile's output comparison on padded samples judges real tokens only: the plugin graph equals the
    MatMulNBits graph there, while the left padding's own positions (which see no key) differ."""
    from qcompiler.evaluation import compare_outputs

    nbits, plugins = plugin_graph(decoder_model(np.random.default_rng(0), layers=LAYERS, padding=True))
    paths = {name: tmp_path / f"{name}.onnx" for name in ("nbits", "plugins")}
    onnx.save(nbits, str(paths["nbits"]))
    onnx.save(plugins, str(paths["plugins"]))
    feeds = [padded_feeds(3, 37, seed=1)]
    (agreement,), _ = compare_outputs(paths["nbits"], paths["plugins"], feeds)
    assert agreement.sqnr_db > 60.0, agreement
    padding = ~feeds[0]["attention_mask"].astype(bool)
    assert np.abs(run_ort(nbits, feeds[0])[0][padding] - run_plugin_graph(plugins, feeds[0])[0][padding]).max() > 1e-2


@pytest.mark.parametrize("masking", ["seqlens_k", "key_mask"])
@pytest.mark.parametrize("causal", [0, 1])
def test_flash_attention_reference_follows_the_contract(causal, masking):
    """ops.py: query i of batch b sees key j iff j < Sk_b, key_mask[b, j] != 0 and (causal) j <= i + Sk_b - Sq,
    with Sk_b = seqlens_k[b] (or Sk); a row that sees no key has O = 0 and LSE = -inf. Checked one row at a time."""
    rng = np.random.default_rng(0)
    B, HQ, HKV, SQ, SK, D = 3, 4, 2, 5, 7, 8
    q, k, v = (rng.standard_normal(s).astype(np.float32) for s in ((B, HQ, SQ, D), (B, HKV, SK, D), (B, HKV, SK, D)))
    lens = np.array([7, 3, 1], np.int32)
    keep = np.array([[0, 0, 1, 1, 1, 1, 1], [1, 0, 1, 0, 1, 1, 0], [0] * 7], np.int32)
    extra = ["lens"] if masking == "seqlens_k" else ["", "keep"]
    node = helper.make_node("FlashAttention", ["q", "k", "v", *extra], ["o", "lse"], domain="qcompiler", causal=causal,
                            scale=0.3)
    g = helper.make_graph([node], "attn", [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in "qkv"]
                          + [helper.make_tensor_value_info(extra[-1], TensorProto.INT32, None)],
                          [helper.make_tensor_value_info(n, TensorProto.FLOAT, None) for n in ("o", "lse")])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("qcompiler", 1)])
    o, lse = run_plugin_graph(model, {"q": q, "k": k, "v": v, extra[-1]: lens if masking == "seqlens_k" else keep})
    for b, h, i in np.ndindex(B, HQ, SQ):
        sk = lens[b] if masking == "seqlens_k" else SK
        kept = keep[b] if masking == "key_mask" else np.ones(SK)
        keys = [j for j in range(SK) if j < sk and kept[j] and (not causal or j <= i + sk - SQ)]
        if not keys:
            assert lse[b, h, i] == -np.inf and not o[b, h, i].any()
            continue
        s = 0.3 * k[b, h // 2, keys] @ q[b, h, i]
        p = np.exp(s - s.max())
        np.testing.assert_allclose(o[b, h, i], p @ v[b, h // 2, keys] / p.sum(), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(lse[b, h, i], np.log(np.exp(s).sum()), rtol=1e-5)


def test_evaluation_scores_a_plugin_graph_through_the_references(tmp_path):
    """ONNX Runtime cannot load the plugin graph; qcompile's perplexity and output comparison run it
    through the ops' references instead, and agree with running those directly."""
    from qcompiler.evaluation import compare_outputs, holds_plugin_ops, perplexity, perplexity_of

    model = decoder_model(np.random.default_rng(0), layers=LAYERS)
    nbits, plugins = plugin_graph(model)
    assert holds_plugin_ops(plugins) and not holds_plugin_ops(nbits)
    paths = {name: tmp_path / f"{name}.onnx" for name in ("float", "nbits", "plugins")}
    for name, graph in (("float", model), ("nbits", nbits), ("plugins", plugins)):
        onnx.save(graph, str(paths[name]))
    feeds = [{"input_ids": np.random.default_rng(i).integers(0, 384, (1, 33))} for i in range(3)]
    scored = perplexity(paths["plugins"], feeds)
    assert scored == perplexity_of(lambda f: run_plugin_graph(plugins, f)[0], feeds)
    assert scored == pytest.approx(perplexity(paths["nbits"], feeds), rel=1e-4)  # ONNX Runtime, MatMulNBits
    (agreement,), samples = compare_outputs(paths["float"], paths["plugins"], feeds)
    assert (agreement.name, samples) == ("logits", 3) and agreement.sqnr_db > 10.0


def test_benchmark_padded_batch_of_the_padded_decoder(tmp_path):
    """plugin_graph_ppl --padded: a left-padded batch of a window's prefixes equals each prefix alone on the
    references; a model without attention_mask is refused."""
    from benchmarks.plugin_graph_ppl import _worst, main, padded_batch

    _, plugins = plugin_graph(decoder_model(np.random.default_rng(0), layers=LAYERS, padding=True))
    window = np.random.default_rng(2).integers(0, 384, 40)
    batch, alone = padded_batch(lambda f: run_plugin_graph(plugins, f)[0], window, [40, 30, 20, 10])
    assert [len(b) for b in batch] == [40, 30, 20, 10] and _worst(batch, alone) < 1e-5
    _, unpadded = plugin_graph(decoder_model(np.random.default_rng(0), layers=LAYERS))
    onnx.save(unpadded, str(tmp_path / "p.onnx"))
    np.save(tmp_path / "ids.npy", window[None])
    with pytest.raises(SystemExit, match="--padded needs a model that takes attention_mask"):
        main(["--plugin-graph", str(tmp_path / "p.onnx"), "--ids", str(tmp_path / "ids.npy"), "--padded"])


def test_benchmark_decode_steps_of_the_cached_decoder(tmp_path):
    """plugin_graph_ppl --decode: the window fed as a prefill, a chunk and one-token steps through the cache equals one
    prefill on the references; a model without a KV cache is refused."""
    from benchmarks.plugin_graph_ppl import cached_steps, main

    model = decoder_model(np.random.default_rng(0), layers=LAYERS, cache=True)
    _, plugins = plugin_graph(model)
    feed = lm_feeds(plugins, np.random.default_rng(2).integers(0, 384, (1, 40)))[0]
    steps, whole = cached_steps(lambda f: run_plugin_graph(plugins, f), feed, cache_inputs(plugins), 8)
    assert steps.shape == whole.shape == (12, 384) and np.abs(steps - whole).max() < 1e-5 * np.abs(whole).max()
    _, uncached = plugin_graph(decoder_model(np.random.default_rng(0), layers=LAYERS))
    onnx.save(uncached, str(tmp_path / "p.onnx"))
    np.save(tmp_path / "ids.npy", np.zeros((1, 40), np.int64))
    with pytest.raises(SystemExit, match="--decode N needs a model with a KV cache"):
        main(["--plugin-graph", str(tmp_path / "p.onnx"), "--ids", str(tmp_path / "ids.npy"), "--decode", "8"])


@pytest.mark.parametrize("argv,message", [
    (["--ids", "x.npy"], "exactly one of --model and --plugin-graph"),
    (["--plugin-graph", "p.onnx"], "give --ids, or --tokenizer"),
])
def test_benchmark_bad_arguments_are_one_line(argv, message):
    from benchmarks.plugin_graph_ppl import main

    with pytest.raises(SystemExit, match=message):
        main(argv)
