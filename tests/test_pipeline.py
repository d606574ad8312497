"""End to end on built transformer models: SmoothQuant exact, W8A8 accuracy, recipes, saved statistics."""

import numpy as np
import onnx
import pytest

import qcompiler
from qcompiler.calibration import CalibrationStats, iterate_feeds
from qcompiler.config import Recipe, SmoothQuantConfig
from qcompiler.errors import CalibrationDataError
from qcompiler.graph import export_graph, import_graph
from qcompiler.pass_manager import PassContext
from qcompiler.passes.smoothquant import SmoothQuant
from qcompiler.report import write_report
from tests.helpers import gemm_input_stats, run_ort

pytest.importorskip("torch")
from qcompiler.models.builders import build_bert, build_gpt2, build_llama  # noqa: E402

BUILDERS = {"llama": build_llama, "gpt2": build_gpt2, "bert": build_bert}


@pytest.fixture(scope="module")
def models():
    return {name: build(outlier_channels=2, outlier_scale=20.0, seed=3) for name, build in BUILDERS.items()}


def _arrays(name, rng, count=4, seq=16):
    arrays = {"input_ids": rng.integers(0, 256, (count, seq)).astype(np.int64)}
    if name == "bert":
        arrays["attention_mask"] = np.ones((count, seq), np.int64)
        arrays["attention_mask"][1, 10:] = 0  # one padded sample
    return arrays


@pytest.mark.parametrize("name", list(BUILDERS))
def test_smoothquant_is_exact_and_inserts_no_mul(models, name):
    model, rng = models[name], np.random.default_rng(0)
    arrays = _arrays(name, rng)
    graph = import_graph(model)
    result = SmoothQuant(SmoothQuantConfig(alpha=0.5)).run(
        graph, PassContext(stats=gemm_input_stats(model, arrays), calibration_feeds=iterate_feeds(arrays)))
    graph.cleanup().toposort()
    smoothed = export_graph(graph)
    assert not any(d["absorbed_by"] == "inserted Mul" for d in result.details)
    folded = {g for d in result.details for g in d["gemms"]}
    if name == "llama":  # every GEMM of a Llama block has a foldable producer
        assert len(result.details) == 9 and not result.not_fired
    if name == "gpt2":  # all but the GELU-fed MLP projections
        assert len(result.not_fired) == 2 and all("mlp.act" in why for _, why in result.not_fired)
    if name == "bert":  # post-norm: LN outputs also feed the residual; only the value paths fold
        assert len(folded) == 2
    feed = {k: v[1:2] for k, v in arrays.items()}
    np.testing.assert_allclose(run_ort(smoothed, feed)[0], run_ort(model, feed)[0], rtol=1e-4,
                               atol=1e-4 * np.abs(run_ort(model, feed)[0]).max())


def test_smoothquant_beats_naive_w8a8_on_outlier_model(models, tmp_path):
    path = tmp_path / "llama.onnx"
    onnx.save(models["llama"], str(path))
    calib = tmp_path / "calib.npz"
    np.savez(calib, **_arrays("llama", np.random.default_rng(1), count=8))
    sqnr = {}
    for recipe in ("w8a8-naive", "w8a8-smoothquant", "w8a8-smoothquant-static"):
        result = qcompiler.compile(path, tmp_path / f"{recipe}.onnx", recipe,
                                   data=qcompiler.DataOptions(calib=calib),
                                   evaluate=qcompiler.EvalOptions(shapes={"input_ids": [1, 16]}, latency_repeats=3))
        sqnr[recipe] = result.evaluation.outputs[0].sqnr_db
        assert result.evaluation.layers and result.evaluation.latency_compiled_ms > 0
    assert sqnr["w8a8-smoothquant"] > sqnr["w8a8-naive"] + 10.0, sqnr
    assert sqnr["w8a8-smoothquant-static"] > sqnr["w8a8-naive"] + 10.0, sqnr


def test_saved_statistics_replace_calibration_data(models, tmp_path):
    path = tmp_path / "gpt2.onnx"
    onnx.save(models["gpt2"], str(path))
    calib, stats = tmp_path / "calib.npz", tmp_path / "stats.npz"
    np.savez(calib, **_arrays("gpt2", np.random.default_rng(2)))
    first = qcompiler.compile(path, tmp_path / "a.onnx", "w8a8-naive",
                              data=qcompiler.DataOptions(calib=calib, save_stats=stats))
    loaded = CalibrationStats.load(stats)
    assert set(loaded.tensors) and all(s.tokens == 4 * 16 for s in loaded.tensors.values())
    qcompiler.compile(path, tmp_path / "b.onnx", "w8a8-naive", data=qcompiler.DataOptions(stats=stats))
    a, b = (onnx.load(str(tmp_path / n)) for n in ("a.onnx", "b.onnx"))
    weights = lambda m: {t.name: onnx.numpy_helper.to_array(t) for t in m.graph.initializer}  # noqa: E731
    for name, value in weights(a).items():
        np.testing.assert_array_equal(weights(b)[name], value)
    assert first.records[0].name == "calibrate"


def test_recipe_yaml_round_trip(tmp_path):
    for recipe in qcompiler.BUILTIN_RECIPES.values():
        path = tmp_path / f"{recipe.name}.yaml"
        path.write_text(recipe.to_yaml())
        assert qcompiler.load_recipe(path) == recipe
    custom = Recipe("mine", smoothquant=SmoothQuantConfig(alpha=0.65), w8a8=qcompiler.W8A8Config())
    assert Recipe.from_dict(custom.to_dict()) == custom


def test_llm_int8_splits_by_the_relative_counts_it_collects(models, tmp_path):
    path = tmp_path / "llama.onnx"
    onnx.save(models["llama"], str(path))
    calib, stats = tmp_path / "calib.npz", tmp_path / "stats.npz"
    np.savez(calib, **_arrays("llama", np.random.default_rng(4), count=8))
    result = qcompiler.compile(path, tmp_path / "int8.onnx", "llm-int8",
                               data=qcompiler.DataOptions(calib=calib, save_stats=stats))
    split = next(r.result for r in result.records if r.name == "outlier_split")
    assert split.changed and "rms" in split.summary
    # The Markdown report lists every split activation with its float columns.
    write_report(result, tmp_path / "report.md")
    report = (tmp_path / "report.md").read_text()
    assert "Input columns kept in float" in report
    for detail in split.details:
        assert f"| {detail['activation']} |" in report and detail["node"] in report
    wanted = qcompiler.BUILTIN_RECIPES["llm-int8"].outlier_split.relative_threshold
    assert {s.relative_threshold for s in CalibrationStats.load(stats).tensors.values()} == {wanted}
    # Statistics saved by a recipe that did not count relative outliers are refused, not silently used.
    qcompiler.compile(path, tmp_path / "naive.onnx", "w8a8-naive",
                      data=qcompiler.DataOptions(calib=calib, save_stats=tmp_path / "plain.npz"))
    with pytest.raises(CalibrationDataError, match="relative"):
        qcompiler.compile(path, tmp_path / "again.onnx", "llm-int8",
                          data=qcompiler.DataOptions(stats=tmp_path / "plain.npz"))
    assert not (tmp_path / "again.onnx").exists()
