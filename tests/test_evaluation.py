"""Feeds that drive a language model from token windows (qcompile's text calibration and evaluation)."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from qcompiler.errors import QCompileError
from qcompiler.evaluation import cache_inputs, lm_feeds, logits_through_cache
from tests.helpers import run_ort
from tests.passes.graphs import decoder_model


def test_a_model_with_a_kv_cache_gets_empty_caches():
    """Each window is a prefill: the cache inputs (float [batch, heads, past, head_dim]) are fed empty, and the
    logits are those of the same decoder without a cache; fed in steps through its presents, the same again."""
    windows = np.random.default_rng(0).integers(0, 384, (2, 19))
    cached = decoder_model(np.random.default_rng(0), cache=True)
    (feed, _) = lm_feeds(cached, windows)
    caches = cache_inputs(cached)
    assert caches == [name for name in feed if name.startswith("past_key_values")] and len(caches) == 4
    assert all(feed[name].shape == (1, 2, 0, 64) and feed[name].dtype == np.float32 for name in caches)
    plain = decoder_model(np.random.default_rng(0), padding=True)
    expected = run_ort(plain, lm_feeds(plain, windows)[0])[0]
    np.testing.assert_allclose(run_ort(cached, feed)[0], expected, rtol=1e-5, atol=1e-5)
    stepped = logits_through_cache(lambda f: run_ort(cached, f), feed, caches, [0, 11, 18, 19])
    np.testing.assert_allclose(stepped, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_other_inputs_are_refused():
    """A 4-D input whose third axis is not a symbolic length is not a KV cache: text cannot feed it."""
    model = decoder_model(np.random.default_rng(0))
    model.graph.input.append(helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 224, 224]))
    with pytest.raises(QCompileError, match=r"inputs are input_ids \[\+ attention_mask, position_ids, a KV cache\]"):
        lm_feeds(model, np.zeros((1, 8), np.int64))


def test_steps_must_cover_the_window():
    feed = {"input_ids": np.zeros((1, 8), np.int64)}
    with pytest.raises(ValueError, match="must rise from 0 to the window's length"):
        logits_through_cache(lambda f: [], feed, [], [0, 5, 7])


def test_decode_steps_catch_a_compiled_model_that_loses_its_cache(tmp_path):
    """A compiled model that zeroes the cached keys of one layer computes every prefill exactly (the cache is empty
    then), so comparing prefills cannot see it; comparing the windows fed through the cache can."""
    from onnx import numpy_helper

    from qcompiler.evaluation import cache_inputs, compare_decode_steps, compare_outputs

    model = decoder_model(np.random.default_rng(0), cache=True)
    broken = onnx.ModelProto()
    broken.CopyFrom(model)
    concat = next(n for n in broken.graph.node if n.output[0] == "present.0.key")
    broken.graph.initializer.append(numpy_helper.from_array(np.zeros((), np.float32), "forget"))
    broken.graph.node.insert(list(broken.graph.node).index(concat),
                             helper.make_node("Mul", [concat.input[0], "forget"], ["past_forgotten"]))
    concat.input[0] = "past_forgotten"
    paths = {name: tmp_path / f"{name}.onnx" for name in ("model", "broken")}
    onnx.save(model, str(paths["model"]))
    onnx.save(broken, str(paths["broken"]))
    feeds = lm_feeds(model, np.random.default_rng(1).integers(0, 384, (2, 24)))
    prefill, _ = compare_outputs(paths["model"], paths["broken"], feeds)
    assert prefill[0].sqnr_db == float("inf")
    caches = cache_inputs(model)
    assert compare_decode_steps(paths["model"], paths["model"], feeds, caches, "logits").sqnr_db == float("inf")
    decode = compare_decode_steps(paths["model"], paths["broken"], feeds, caches, "logits")
    assert decode.name == "logits (8 decode steps through the KV cache)" and decode.sqnr_db < 20.0, decode
    assert cache_inputs(decoder_model(np.random.default_rng(0), padding=True)) == []
    short = lm_feeds(model, np.zeros((1, 8), np.int64))  # no longer than the 8 decode steps
    assert compare_decode_steps(paths["model"], paths["broken"], short, caches, "logits") is None
