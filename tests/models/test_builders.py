"""Built reference models: ONNX Runtime vs torch, exported op patterns, outlier injection, rescaling."""

from __future__ import annotations

import functools

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("onnxscript")

import onnxruntime as ort  # noqa: E402
from onnx import numpy_helper  # noqa: E402

from qcompiler.models import builders  # noqa: E402
from qcompiler.models.rescale import apply_channel_factors_, fold_sites, random_rescale_  # noqa: E402

LAYERS = 2
SCALE = 30.0


@functools.cache
def built(kind: str, **kwargs) -> onnx.ModelProto:
    """Each configuration is exported once per test session (a few seconds each)."""
    return getattr(builders, f"build_{kind}")(layers=LAYERS, **kwargs)


def module(kind: str, **kwargs):
    return getattr(builders, f"{kind}_module")(layers=LAYERS, **kwargs)


def run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs: list[str] | None = None) -> list[np.ndarray]:
    if outputs:
        model = onnx.ModelProto.FromString(model.SerializeToString())
        known = {o.name for o in model.graph.output}
        model.graph.output.extend(onnx.ValueInfoProto(name=n) for n in outputs if n not in known)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(outputs, feeds)


def feeds_for(kind: str, batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {"input_ids": rng.integers(0, 256, (batch, seq), dtype=np.int64)}
    if kind == "bert":
        mask = np.ones((batch, seq), dtype=np.int64)
        mask[0, seq - 3:] = 0  # padding at the end of the first row
        feeds["attention_mask"] = mask
    return feeds


def torch_out(mod, feeds: dict[str, np.ndarray]) -> np.ndarray:
    with torch.no_grad():
        return mod(*(torch.from_numpy(v) for v in feeds.values())).numpy()


def rel_err(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


class Graph:
    """Producer/consumer lookups over an onnx graph."""

    def __init__(self, model: onnx.ModelProto):
        self.nodes = list(model.graph.node)
        self.inits = {t.name: t for t in model.graph.initializer}
        self.producer = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = {}
        for n in self.nodes:
            for i in n.input:
                self.consumers.setdefault(i, []).append(n)

    def op(self, tensor: str) -> str | None:
        node = self.producer.get(tensor)
        return node.op_type if node is not None else None

    def linears(self) -> list[onnx.NodeProto]:
        return [n for n in self.nodes if n.op_type in ("MatMul", "Gemm") and n.input[1] in self.inits]

    def ancestors(self, tensor: str) -> set[str]:
        seen, stack = set(), [tensor]
        while stack:
            t = stack.pop()
            if t in seen:
                continue
            seen.add(t)
            node = self.producer.get(t)
            if node is not None:
                stack.extend(node.input)
        return seen


# --------------------------------------------------------------------------------------------------------------
# numerics through ONNX Runtime

@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
@pytest.mark.parametrize("shape", [(1, 5), (3, 17)])
def test_onnxruntime_matches_torch_on_dynamic_shapes(kind, shape):
    model, mod = built(kind), module(kind)
    feeds = feeds_for(kind, *shape)
    (got,) = run(model, feeds)
    expected = torch_out(mod, feeds)
    assert got.shape == expected.shape
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_llama_untied_head_and_gqa_group_of_three():
    model = builders.build_llama(layers=1, hidden=48, heads=6, kv_heads=2, tied_embeddings=False, seed=3)
    mod = builders.llama_module(layers=1, hidden=48, heads=6, kv_heads=2, tied_embeddings=False, seed=3)
    feeds = feeds_for("llama", 2, 9)
    assert rel_err(run(model, feeds)[0], torch_out(mod, feeds)) < 1e-5


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_decoders_are_causal(kind):
    feeds = feeds_for(kind, 1, 12)
    changed = {"input_ids": feeds["input_ids"].copy()}
    changed["input_ids"][0, 8:] = (changed["input_ids"][0, 8:] + 1) % 256
    a, b = run(built(kind), feeds)[0], run(built(kind), changed)[0]
    np.testing.assert_allclose(a[0, :8], b[0, :8], rtol=1e-5, atol=1e-5)
    assert not np.allclose(a[0, 8:], b[0, 8:])


def test_bert_padding_mask_hides_padded_tokens():
    feeds = feeds_for("bert", 2, 10)  # row 0: last 3 tokens are padding
    (full,) = run(built("bert"), feeds)
    alone = {"input_ids": feeds["input_ids"][:1, :7], "attention_mask": np.ones((1, 7), dtype=np.int64)}
    (short,) = run(built("bert"), alone)
    np.testing.assert_allclose(full[0, :7], short[0], rtol=1e-4, atol=1e-5)
    garbage = {k: v.copy() for k, v in feeds.items()}
    garbage["input_ids"][0, 7:] = 5
    (other,) = run(built("bert"), garbage)
    np.testing.assert_allclose(other[0, :7], full[0, :7], rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------------------------------------------
# exported structure

@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_io_signature(kind):
    model = built(kind)
    names = ["input_ids", "attention_mask"] if kind == "bert" else ["input_ids"]
    assert [i.name for i in model.graph.input] == names
    for value in model.graph.input:
        assert value.type.tensor_type.elem_type == onnx.TensorProto.INT64
        assert [d.dim_param for d in value.type.tensor_type.shape.dim] == ["batch", "seq"]
    (out,) = model.graph.output
    assert out.name == ("last_hidden_state" if kind == "bert" else "logits")
    assert out.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in out.type.tensor_type.shape.dim] == ["batch", "seq", 256 if kind != "bert" else 64]
    assert model.opset_import[0].version == 18
    onnx.checker.check_model(model)


@pytest.mark.parametrize("kind, linears_per_layer, extra", [("llama", 7, 1), ("gpt2", 4, 1), ("bert", 6, 0)])
def test_linears_are_constant_weight_gemms_without_runtime_transpose(kind, linears_per_layer, extra):
    graph = Graph(built(kind))
    linears = graph.linears()
    assert len(linears) == LAYERS * linears_per_layer + extra
    for node in linears:
        assert graph.op(node.input[1]) is None  # an initializer, not computed
        w = numpy_helper.to_array(graph.inits[node.input[1]])
        assert w.ndim == 2
        if node.op_type == "Gemm":
            attrs = {a.name: a.i for a in node.attribute}
            assert attrs.get("transB", 0) == 0 and attrs.get("transA", 0) == 0
    for node in graph.nodes:
        if node.op_type == "Transpose":
            assert node.input[0] not in graph.inits, f"{node.name} transposes a constant at run time"
    # Names follow the torch modules, so reports and --exclude can target layers.
    assert any("q_proj" in n.name or "c_attn" in n.name or "query" in n.name for n in linears)


def test_llama_rmsnorm_is_the_decomposed_chain():
    graph = Graph(built("llama"))
    assert not {"RMSNormalization", "SimplifiedLayerNormalization", "LayerNormalization"} & {n.op_type for n in graph.nodes}
    chains = 0
    for pow_node in (n for n in graph.nodes if n.op_type == "Pow"):
        x = pow_node.input[0]
        assert numpy_helper.to_array(graph.inits[pow_node.input[1]]) == 2.0
        (mean,) = graph.consumers[pow_node.output[0]]
        assert mean.op_type == "ReduceMean"
        (add,) = graph.consumers[mean.output[0]]
        assert add.op_type == "Add" and any(i in graph.inits for i in add.input)  # + eps
        (sqrt,) = graph.consumers[add.output[0]]
        assert sqrt.op_type == "Sqrt"
        (inv,) = graph.consumers[sqrt.output[0]]
        if inv.op_type == "Reciprocal":
            (norm,) = graph.consumers[inv.output[0]]
            assert norm.op_type == "Mul" and x in norm.input
        else:
            norm = inv
            assert norm.op_type == "Div" and norm.input[0] == x
        (gain,) = graph.consumers[norm.output[0]]
        assert gain.op_type == "Mul"
        gain_name = next(i for i in gain.input if i != norm.output[0])
        assert numpy_helper.to_array(graph.inits[gain_name]).shape == (64,)
        chains += 1
    assert chains == 2 * LAYERS + 1


def test_norm_gains_are_distinct_initializers():
    # With HF's all-ones init the exporter would deduplicate every gain into one shared tensor.
    graph = Graph(built("llama"))
    gains = [n for n in graph.inits if n.endswith("layernorm.weight") or n == "model.norm.weight"]
    assert len(gains) == 2 * LAYERS + 1


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_attention_is_explicit(kind):
    graph = Graph(built(kind))
    softmaxes = [n for n in graph.nodes if n.op_type == "Softmax"]
    assert len(softmaxes) == LAYERS
    mask_source = "attention_mask" if kind == "bert" else "input_ids"
    for softmax in softmaxes:
        add = graph.producer[softmax.input[0]]
        assert add.op_type == "Add"  # additive mask
        scaled, mask = (add.input if graph.op(add.input[0]) == "Mul" else add.input[::-1])
        mul = graph.producer[scaled]
        assert mul.op_type == "Mul"
        qk = graph.producer[next(i for i in mul.input if i not in graph.inits)]
        assert qk.op_type == "MatMul" and qk.input[1] not in graph.inits  # Q·Kᵀ, both computed
        assert any(i in graph.inits for i in mul.input)  # 1/sqrt(head_dim)
        assert graph.op(mask) == "Where"
        assert mask_source in graph.ancestors(mask)
        (pv,) = graph.consumers[softmax.output[0]]
        assert pv.op_type == "MatMul" and pv.input[1] not in graph.inits  # ·V


def test_llama_gqa_repeats_kv_with_expand():
    graph = Graph(built("llama"))  # 4 heads over 2 KV heads
    for softmax in (n for n in graph.nodes if n.op_type == "Softmax"):
        (pv,) = graph.consumers[softmax.output[0]]
        v = graph.producer[pv.input[1]]
        assert v.op_type == "Reshape" and graph.op(v.input[0]) == "Expand"


def test_gpt2_and_bert_use_layernorm_ops():
    for kind, count in (("gpt2", 2 * LAYERS + 1), ("bert", 2 * LAYERS + 1)):
        graph = Graph(built(kind))
        norms = [n for n in graph.nodes if n.op_type == "LayerNormalization"]
        assert len(norms) == count
        assert all(n.input[1] in graph.inits and n.input[2] in graph.inits for n in norms)


# --------------------------------------------------------------------------------------------------------------
# determinism and arguments

def test_export_is_deterministic_per_seed(tmp_path):
    again = builders.build_llama(layers=LAYERS, path=tmp_path / "llama.onnx")
    assert again.SerializeToString() == built("llama").SerializeToString()
    assert onnx.load(str(tmp_path / "llama.onnx")).SerializeToString() == again.SerializeToString()
    other = built("llama", seed=1)
    name = "model.layers.0.self_attn.q_proj.weight_t"
    a = numpy_helper.to_array(Graph(built("llama")).inits[name])
    b = numpy_helper.to_array(Graph(other).inits[name])
    assert not np.array_equal(a, b)


def test_builders_leave_the_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    builders.llama_module(layers=1)
    assert torch.equal(torch.rand(3), expected)


@pytest.mark.parametrize("kwargs, message", [
    ({"hidden": 60, "heads": 8}, "multiple of heads"),
    ({"heads": 4, "kv_heads": 3}, "multiple of kv_heads"),
    ({"outlier_channels": 65}, "outlier_channels"),
    ({"outlier_channels": 2, "outlier_scale": 0.0}, "outlier_scale"),
    ({"layers": 0}, "layers"),
])
def test_bad_arguments_are_rejected(kwargs, message):
    with pytest.raises(ValueError, match=message):
        builders.llama_module(**kwargs)


# --------------------------------------------------------------------------------------------------------------
# outlier injection

def _outlier_channels(model: onnx.ModelProto) -> list[int]:
    props = {p.key: p.value for p in model.metadata_props}
    assert float(props["qcompiler.outlier_scale"]) == SCALE
    return [int(c) for c in props["qcompiler.outlier_channels"].split(",")]


# Which Linear inputs carry the outliers: everything a pre-norm gain feeds (Llama, GPT-2), the value path
# into the attention output projection (post-norm BERT).
TARGETS = {
    "llama": ("q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"),
    "gpt2": ("c_attn", "c_fc"),
    "bert": ("attention.output.dense",),
}


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_outlier_injection_preserves_the_function(kind):
    feeds = feeds_for(kind, 2, 13, seed=4)
    base = run(built(kind), feeds)[0]
    injected = run(built(kind, outlier_channels=3, outlier_scale=SCALE), feeds)[0]
    assert rel_err(injected, base) < 1e-4


@pytest.mark.parametrize("kind", ["llama", "gpt2", "bert"])
def test_outlier_injection_creates_outlier_channels(kind):
    model = built(kind, outlier_channels=3, outlier_scale=SCALE)
    channels = _outlier_channels(model)
    assert len(channels) == 3
    graph, base_graph = Graph(model), Graph(built(kind))
    feeds = feeds_for(kind, 2, 13, seed=5)
    targets = [n for n in graph.linears() if any(t in n.name for t in TARGETS[kind])]
    assert len(targets) == LAYERS * len(TARGETS[kind])
    base_targets = {n.name: n for n in base_graph.linears()}
    names = [n.input[0] for n in targets]
    acts = run(model, feeds, names)
    base_acts = run(built(kind), feeds, [base_targets[n.name].input[0] for n in targets])
    others = [c for c in range(64) if c not in channels]
    for node, x, x0 in zip(targets, acts, base_acts, strict=True):
        peak = np.abs(x.reshape(-1, x.shape[-1])).max(axis=0)
        typical = np.median(peak[others])
        assert peak[channels].min() >= 0.25 * SCALE * typical, node.name
        # Exactly the chosen channels are scaled, by exactly the factor.
        np.testing.assert_allclose(x[..., channels], SCALE * x0[..., channels], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(x[..., others], x0[..., others], rtol=1e-4, atol=1e-5)


def test_no_outliers_by_default():
    props = {p.key: p.value for p in built("llama").metadata_props}
    assert props["qcompiler.outlier_channels"] == ""


# --------------------------------------------------------------------------------------------------------------
# exact rescaling of torch models

def _params(mod) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in mod.named_parameters()}


def _logits(mod, feeds) -> np.ndarray:
    return torch_out(mod, feeds)


@pytest.mark.parametrize("tied", [True, False])
def test_random_rescale_is_exact_on_llama_gqa(tied):
    mod = builders.llama_module(layers=2, hidden=48, heads=6, kv_heads=2, intermediate=96, tied_embeddings=tied)
    feeds = feeds_for("llama", 2, 9)
    before, params = _logits(mod, feeds), _params(mod)
    applied = random_rescale_(mod, amplitude=0.7, seed=1)
    after = _params(mod)
    assert rel_err(_logits(mod, feeds), before) < 1e-5
    assert any(name.endswith(".v_o") for name in applied) and any(name.endswith(".up_down") for name in applied)
    for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                 "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
        key = f"hf.model.layers.1.{name}.weight"
        ratio = (after[key] / params[key]).flatten()
        assert not torch.allclose(ratio, torch.ones_like(ratio)), key
    assert not torch.equal(after["hf.model.layers.0.input_layernorm.weight"],
                           params["hf.model.layers.0.input_layernorm.weight"])
    final_changed = not torch.equal(after["hf.model.norm.weight"], params["hf.model.norm.weight"])
    assert final_changed == (not tied)  # a tied head cannot absorb 1/f without changing the embedding
    assert torch.equal(after["hf.model.embed_tokens.weight"], params["hf.model.embed_tokens.weight"])
    for factors in applied.values():
        assert float(factors.min()) >= np.exp(-0.7) and float(factors.max()) <= np.exp(0.7)


def test_rescale_moves_weights_off_a_grid():
    mod = builders.llama_module(layers=1)
    w = mod.hf.model.layers[0].self_attn.q_proj.weight
    with torch.no_grad():  # put q_proj on a 16-level grid per row
        lo, hi = w.min(dim=1, keepdim=True).values, w.max(dim=1, keepdim=True).values
        w.copy_(lo + torch.round((w - lo) / (hi - lo) * 15) * (hi - lo) / 15)
    assert max(len(torch.unique(row)) for row in w) <= 16
    random_rescale_(mod, seed=0)
    assert min(len(torch.unique(row)) for row in w) > 16


@pytest.mark.parametrize("kind, kinds", [("gpt2", ("norm",)), ("bert", ("v_o",))])
def test_random_rescale_is_exact_on_gpt2_and_bert(kind, kinds):
    mod = module(kind)
    feeds = feeds_for(kind, 2, 9)
    before = _logits(mod, feeds)
    applied = random_rescale_(mod, seed=2, kinds=kinds)
    assert len(applied) == LAYERS * (2 if kind == "gpt2" else 1)  # GPT-2's ln_f feeds the tied head: skipped
    assert rel_err(_logits(mod, feeds), before) < 1e-5


def test_wrong_gqa_mapping_would_not_be_exact():
    # The v->o site must map o_proj's input column h*hd+d to KV head h // group; ignoring GQA breaks the model.
    mod = builders.llama_module(layers=1, heads=4, kv_heads=2)
    feeds = feeds_for("llama", 1, 7)
    before = _logits(mod, feeds)
    (site,) = fold_sites(mod, ["v_o"])
    assert site.width == 32 and len(site.divide[0].index) == 64
    broken = type(site)(site.name, site.kind, site.width, site.multiply,
                        (type(site.divide[0])(site.divide[0].param, 1, tuple(i % 32 for i in range(64))),))
    apply_channel_factors_(mod, broken, torch.linspace(0.5, 2.0, 32))
    assert rel_err(_logits(mod, feeds), before) > 1e-3


def test_random_rescale_is_exact_on_gemma_one_plus_weight_norms():
    # Gemma's RMSNorm computes (1 + w) * n(x): scaling w by f does not scale its output by f, so its norms
    # are no fold site (they were, and "exact" rescaling changed the logits by ~60%); V->O and up->down are.
    import transformers

    config = transformers.GemmaConfig(vocab_size=256, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=1, head_dim=16, intermediate_size=128, use_cache=False)
    config._attn_implementation = "eager"
    with torch.random.fork_rng(devices=[]):
        hf = transformers.GemmaForCausalLM(config)
    builders._reinit_(hf, 0)
    mod = builders.TensorOutput(hf.eval(), "logits", ("input_ids",)).eval()
    feeds = feeds_for("gemma", 2, 9)
    before = _logits(mod, feeds)
    assert sorted({site.kind for site in fold_sites(mod)}) == ["up_down", "v_o"]
    random_rescale_(mod, seed=3)
    assert rel_err(_logits(mod, feeds), before) < 1e-5


def test_fold_sites_reject_bad_input():
    mod = builders.llama_module(layers=1)
    (site, *_) = fold_sites(mod, ["norm"])
    with pytest.raises(ValueError, match="factors"):
        apply_channel_factors_(mod, site, torch.ones(site.width + 1))
    with pytest.raises(ValueError, match="positive"):
        apply_channel_factors_(mod, site, -torch.ones(site.width))
    with pytest.raises(ValueError, match="unknown fold-site kinds"):
        fold_sites(mod, ["qkv"])
    with pytest.raises(ValueError, match="no fold site"):
        random_rescale_(torch.nn.Sequential(torch.nn.Linear(4, 4)))
