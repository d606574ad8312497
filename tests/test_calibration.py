"""Streaming statistics equal the statistics of all data at once; files round-trip; bad data is refused."""

import numpy as np
import onnx
import pytest

from qcompiler.calibration import CalibrationStats, TensorStats, collect_stats, iterate_feeds, load_calibration_arrays
from qcompiler.errors import CalibrationDataError
from tests.passes.graphs import two_linear_model


def test_streaming_statistics_match_one_shot():
    rng = np.random.default_rng(0)
    x = rng.standard_t(df=3, size=(50, 8, 16)).astype(np.float32)
    streamed = TensorStats.empty(16, 2048, outlier_threshold=2.0)
    for batch in x:
        streamed.update(batch)
    flat = x.reshape(-1, 16)
    np.testing.assert_array_equal(streamed.channel_absmax, np.abs(flat).max(axis=0))
    assert streamed.min == flat.min() and streamed.max == flat.max() and streamed.tokens == 400
    np.testing.assert_array_equal(streamed.outlier_tokens, (np.abs(flat) > 2.0).sum(axis=0))
    assert streamed.relative_outlier_fraction() is None
    exact = np.percentile(np.abs(flat), 99.0)
    assert exact <= streamed.percentile_absmax(99.0) <= exact * 1.02  # log bins: 1.8% wide at 2048 bins
    assert streamed.percentile_absmax(100.0) == pytest.approx(np.abs(flat).max())


def test_relative_outlier_counts_use_each_tokens_rms():
    rng = np.random.default_rng(2)
    x = rng.standard_t(df=3, size=(20, 8, 16)).astype(np.float32)
    x[:, :, 5] *= 10
    streamed = TensorStats.empty(16, 64, outlier_threshold=6.0, relative_threshold=3.0)
    for batch in x:
        streamed.update(batch)
    flat = x.reshape(-1, 16).astype(np.float64)
    rms = np.sqrt((flat ** 2).mean(axis=1, keepdims=True))
    expected = (np.abs(flat) > 3.0 * rms).sum(axis=0)
    np.testing.assert_array_equal(streamed.relative_outlier_tokens, expected)
    assert expected[5] > 0.3 * len(flat) and expected.sum() - expected[5] < expected[5]


def test_collect_stats_through_onnxruntime_and_save_load(tmp_path):
    rng = np.random.default_rng(1)
    model = two_linear_model(rng)
    arrays = {"x": rng.normal(size=(30, 32)).astype(np.float32)}
    stats = collect_stats(model, ["h"], iterate_feeds(arrays, batch=7))
    relu = np.maximum(arrays["x"], 0)
    np.testing.assert_allclose(stats["h"].channel_absmax, relu.max(axis=0))
    assert stats["h"].tokens == 30
    stats.save(tmp_path / "stats.npz")
    loaded = CalibrationStats.load(tmp_path / "stats.npz")
    np.testing.assert_array_equal(loaded["h"].histogram, stats["h"].histogram)
    assert loaded["h"].outlier_threshold == stats["h"].outlier_threshold
    assert loaded["h"].relative_threshold is None and loaded["h"].relative_outlier_tokens is None
    relative = collect_stats(model, ["h"], iterate_feeds(arrays, batch=7), relative_outlier_threshold=2.5)
    relative.save(tmp_path / "relative.npz")
    loaded = CalibrationStats.load(tmp_path / "relative.npz")
    assert loaded["h"].relative_threshold == 2.5
    np.testing.assert_array_equal(loaded["h"].relative_outlier_tokens, relative["h"].relative_outlier_tokens)


def test_folder_of_npz_is_concatenated(tmp_path):
    model = two_linear_model(np.random.default_rng(2))
    for i in range(3):
        np.savez(tmp_path / f"part{i}.npz", x=np.full((2, 32), i, np.float32))
    arrays = load_calibration_arrays(tmp_path, model)
    assert arrays["x"].shape == (6, 32)
    batches = list(iterate_feeds(arrays, batch=4)())
    assert [b["x"].shape[0] for b in batches] == [4, 2]


def test_float64_arrays_are_cast_but_ints_for_floats_are_refused(tmp_path):
    model = two_linear_model(np.random.default_rng(3))
    np.savez(tmp_path / "f64.npz", x=np.zeros((2, 32), np.float64))
    assert load_calibration_arrays(tmp_path / "f64.npz", model)["x"].dtype == np.float32
    np.savez(tmp_path / "int.npz", x=np.zeros((2, 32), np.int32))
    with pytest.raises(CalibrationDataError, match="dtype"):
        load_calibration_arrays(tmp_path / "int.npz", model)


def test_not_a_statistics_file(tmp_path):
    np.savez(tmp_path / "other.npz", a=np.zeros(3))
    with pytest.raises(CalibrationDataError):
        CalibrationStats.load(tmp_path / "other.npz")
    assert isinstance(onnx.__version__, str)
