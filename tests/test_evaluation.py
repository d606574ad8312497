"""Feeds that drive a language model from token windows (qcompile's text calibration and evaluation)."""

import numpy as np
import pytest
from onnx import TensorProto, helper

from qcompiler.errors import QCompileError
from qcompiler.evaluation import lm_feeds, logits_through_cache
from tests.helpers import run_ort
from tests.passes.graphs import decoder_model


def test_a_model_with_a_kv_cache_gets_empty_caches():
    """Each window is a prefill: the cache inputs (float [batch, heads, past, head_dim]) are fed empty, and the
    logits are those of the same decoder without a cache; fed in steps through its presents, the same again."""
    windows = np.random.default_rng(0).integers(0, 384, (2, 19))
    cached = decoder_model(np.random.default_rng(0), cache=True)
    (feed, _) = lm_feeds(cached, windows)
    caches = [name for name in feed if name.startswith("past_key_values")]
    assert len(caches) == 4 and all(feed[name].shape == (1, 2, 0, 64) and feed[name].dtype == np.float32 for name in caches)
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
