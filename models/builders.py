"""Small seeded transformer models, exported to ONNX the way users export theirs.

Each ``build_*`` function makes a tiny HuggingFace transformers model (``attn_implementation="eager"``,
no KV cache), gives it fresh seeded weights and exports it with ``torch.onnx.export(dynamo=True)``
through :func:`qcompiler.models.export.export_module`. The graphs therefore hold what real exports
hold: explicit attention (``MatMul(Q, Kᵀ) -> Mul(scale) -> Add(mask) -> Softmax -> MatMul(·, V)``),
Linear layers as ``MatMul`` with constant ``[in, out]`` weights (``Gemm`` for GPT-2's Conv1D), the
decomposed RMSNorm chain ``Pow -> ReduceMean -> Add(eps) -> Sqrt -> Reciprocal -> Mul -> Mul(gain)``
(Llama) or one ``LayerNormalization`` op (GPT-2, BERT).

Weights are re-drawn from one seeded generator (Linear/embedding ``N(0, 1/fan_in)``, norm gains
``N(1, 0.1²)``, biases ``N(0, 0.02²)``), not left at HF's default init: with default init every norm
gain is all ones and the exporter's deduplication would make all norms share one initializer.

Outlier injection (``outlier_channels``, ``outlier_scale``) multiplies chosen channels by
``outlier_scale`` where the model can absorb it exactly (see :mod:`qcompiler.models.rescale`): the
pre-norm gains (and LayerNorm biases) feeding q/k/v and gate/up (Llama) or c_attn and c_fc (GPT-2),
with the consuming weights' input channels divided by the same factor; for post-norm BERT, whose norm
output also feeds the residual, the value projection's output channels (the activation entering
``attention.output.dense``). The exported function is unchanged up to fp32 rounding; the activations
entering those Linears carry outlier channels. The chosen channels are recorded in the model's
``metadata_props`` (``qcompiler.outlier_channels``).
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
import torch

from qcompiler.models.export import DEFAULT_OPSET, export_module
from qcompiler.models.rescale import apply_channel_factors_, fold_sites

__all__ = [
    "build_llama",
    "build_gpt2",
    "build_bert",
    "llama_module",
    "gpt2_module",
    "bert_module",
    "TensorOutput",
]

logger = logging.getLogger(__name__)

# Example sizes for tracing: > 1 and unlike any model dimension, so torch.export keeps them symbolic.
_TRACE_BATCH, _TRACE_SEQ = 2, 11
_WRAPPER_PREFIX = "hf."


class TensorOutput(torch.nn.Module):
    """Wraps a transformers model so ``forward`` takes plain tensors and returns one tensor.

    Attributes:
        hf: the wrapped transformers model.
        output: which field of its output object to return (``logits``, ``last_hidden_state``).
        input_names: the graph input names, in ``forward``'s order.
    """

    def __init__(self, hf: torch.nn.Module, output: str, input_names: tuple[str, ...]):
        super().__init__()
        self.hf = hf
        self.output = output
        self.input_names = input_names

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        kwargs = {"input_ids": input_ids}
        if attention_mask is not None:
            kwargs["attention_mask"] = attention_mask
        if self.output == "logits":
            kwargs["use_cache"] = False
        return getattr(self.hf(**kwargs), self.output)


def _check(
    hidden: int,
    layers: int,
    heads: int,
    kv_heads: int,
    intermediate: int,
    vocab: int,
    outlier_channels: int,
    outlier_scale: float,
) -> None:
    for name, value in (
        ("hidden", hidden),
        ("layers", layers),
        ("heads", heads),
        ("kv_heads", kv_heads),
        ("intermediate", intermediate),
        ("vocab", vocab),
    ):
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if hidden % heads:
        raise ValueError(f"hidden ({hidden}) must be a multiple of heads ({heads})")
    if heads % kv_heads:
        raise ValueError(f"heads ({heads}) must be a multiple of kv_heads ({kv_heads})")
    if not 0 <= outlier_channels <= hidden:
        raise ValueError(f"outlier_channels must be in [0, {hidden}], got {outlier_channels}")
    if not (outlier_scale > 0 and np.isfinite(outlier_scale)):
        raise ValueError(f"outlier_scale must be finite and > 0, got {outlier_scale}")


def _reinit_(model: torch.nn.Module, seed: int) -> None:
    """Draws every parameter from one generator, in module order (deterministic for a seed)."""
    generator = torch.Generator().manual_seed(seed)
    seen: set[int] = set()
    with torch.no_grad():
        for module in model.modules():
            for name, param in module.named_parameters(recurse=False):
                if id(param) in seen:
                    continue
                seen.add(id(param))
                if param.dim() == 2:
                    # Conv1D (GPT-2) stores [in, out]; Linear and Embedding [out or vocab, in or hidden].
                    fan_in = param.shape[0] if type(module).__name__ == "Conv1D" else param.shape[1]
                    param.copy_(torch.randn(param.shape, generator=generator) * fan_in**-0.5)
                elif name == "weight":
                    param.copy_(1.0 + 0.1 * torch.randn(param.shape, generator=generator))
                else:
                    param.copy_(0.02 * torch.randn(param.shape, generator=generator))


def _inject_outliers_(
    model: torch.nn.Module, kinds: tuple[str, ...], width: int, count: int, scale: float, seed: int
) -> list[int]:
    if count == 0 or scale == 1.0:
        return []
    channels = sorted(np.random.default_rng(seed).choice(width, size=count, replace=False).tolist())
    sites = fold_sites(model, kinds)
    if not sites:
        raise RuntimeError(f"no fold site for outlier injection in {type(model).__name__}")
    for site in sites:
        factors = torch.ones(site.width, dtype=torch.float64)
        factors[channels] = scale
        apply_channel_factors_(model, site, factors)
    return channels


def _finish(
    hf: torch.nn.Module,
    output: str,
    input_names: tuple[str, ...],
    *,
    seed: int,
    outlier_kinds,
    width: int,
    outlier_channels: int,
    outlier_scale: float,
) -> TensorOutput:
    _reinit_(hf, seed)
    channels = _inject_outliers_(hf, outlier_kinds, width, outlier_channels, outlier_scale, seed)
    module = TensorOutput(hf.eval(), output, input_names).eval()
    module.outlier_channels = channels
    module.outlier_scale = float(outlier_scale) if channels else 1.0
    return module


def _new(make):
    # transformers initialises weights from the global RNG; keep the caller's RNG stream untouched.
    with torch.random.fork_rng(devices=[]):
        return make()


def llama_module(
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 256,
    seed: int = 0,
    tied_embeddings: bool = True,
    max_positions: int = 2048,
    rope_theta: float = 10000.0,
    outlier_channels: int = 0,
    outlier_scale: float = 1.0,
) -> TensorOutput:
    """A seeded Llama-style decoder (``LlamaForCausalLM``): ``input_ids -> logits``.

    RMSNorm, RoPE, SwiGLU MLP, grouped-query attention (``kv_heads < heads`` repeats K/V), causal mask,
    LM head tied to the embedding or not. Outliers go into the pre-attention and pre-MLP RMSNorm gains
    (and the final norm when the head is untied).
    """
    _check(hidden, layers, heads, kv_heads, intermediate, vocab, outlier_channels, outlier_scale)
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=max_positions,
        rope_theta=rope_theta,
        tie_word_embeddings=tied_embeddings,
        use_cache=False,
        attn_implementation="eager",
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    )
    hf = _new(lambda: LlamaForCausalLM(config))
    return _finish(
        hf,
        "logits",
        ("input_ids",),
        seed=seed,
        outlier_kinds=("norm",),
        width=hidden,
        outlier_channels=outlier_channels,
        outlier_scale=outlier_scale,
    )


def gpt2_module(
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    vocab: int = 256,
    seed: int = 0,
    max_positions: int = 1024,
    outlier_channels: int = 0,
    outlier_scale: float = 1.0,
) -> TensorOutput:
    """A seeded GPT-2-style decoder (``GPT2LMHeadModel``): ``input_ids -> logits``.

    LayerNorm (pre-norm), learned positions, fused QKV projection ``c_attn`` (Conv1D, exported as
    ``Gemm``), tanh-GELU MLP (``intermediate`` defaults to ``4 * hidden``), causal mask, tied LM head.
    Outliers go into the ``ln_1``/``ln_2`` gains and biases.
    """
    intermediate = 4 * hidden if intermediate is None else intermediate
    _check(hidden, layers, heads, heads, intermediate, vocab, outlier_channels, outlier_scale)
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(
        vocab_size=vocab,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_inner=intermediate,
        n_positions=max_positions,
        use_cache=False,
        attn_implementation="eager",
        bos_token_id=None,
        eos_token_id=None,
    )
    hf = _new(lambda: GPT2LMHeadModel(config))
    return _finish(
        hf,
        "logits",
        ("input_ids",),
        seed=seed,
        outlier_kinds=("norm",),
        width=hidden,
        outlier_channels=outlier_channels,
        outlier_scale=outlier_scale,
    )


def bert_module(
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 128,
    vocab: int = 256,
    seed: int = 0,
    max_positions: int = 512,
    outlier_channels: int = 0,
    outlier_scale: float = 1.0,
) -> TensorOutput:
    """A seeded BERT-style encoder (``BertModel`` without pooler):
    ``(input_ids, attention_mask) -> last_hidden_state``.

    Post-norm LayerNorm, erf-GELU, bidirectional attention; ``attention_mask`` (1 = token, 0 = padding)
    becomes an additive mask (``Where(mask, 0, -big)`` added to the scores). Outliers go into the
    value projection's output channels, i.e. the activation entering ``attention.output.dense``.
    """
    _check(hidden, layers, heads, heads, intermediate, vocab, outlier_channels, outlier_scale)
    from transformers import BertConfig, BertModel

    config = BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        attn_implementation="eager",
        pad_token_id=0,
    )
    hf = _new(lambda: BertModel(config, add_pooling_layer=False))
    return _finish(
        hf,
        "last_hidden_state",
        ("input_ids", "attention_mask"),
        seed=seed,
        outlier_kinds=("v_o",),
        width=hidden,
        outlier_channels=outlier_channels,
        outlier_scale=outlier_scale,
    )


def _export(
    module: TensorOutput, vocab: int, seed: int, kind: str, path: str | Path | None
) -> onnx.ModelProto:
    generator = torch.Generator().manual_seed(seed)
    inputs = {"input_ids": torch.randint(0, vocab, (_TRACE_BATCH, _TRACE_SEQ), generator=generator)}
    if "attention_mask" in module.input_names:
        mask = torch.ones(_TRACE_BATCH, _TRACE_SEQ, dtype=torch.int64)
        mask[1, _TRACE_SEQ // 2 :] = 0
        inputs["attention_mask"] = mask
    dims = {name: {0: "batch", 1: "seq"} for name in inputs}
    model = export_module(
        module, inputs, [module.output], dynamic_dims=dims, opset=DEFAULT_OPSET, strip_prefix=_WRAPPER_PREFIX
    )
    onnx.helper.set_model_props(
        model,
        {
            "qcompiler.builder": kind,
            "qcompiler.seed": str(seed),
            "qcompiler.outlier_channels": ",".join(str(c) for c in module.outlier_channels),
            "qcompiler.outlier_scale": repr(module.outlier_scale),
        },
    )
    if path is not None:
        from qcompiler.graph import save_model

        save_model(model, path)
    return model


def build_llama(
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    kv_heads: int = 2,
    intermediate: int = 128,
    vocab: int = 256,
    seed: int = 0,
    tied_embeddings: bool = True,
    outlier_channels: int = 0,
    outlier_scale: float = 1.0,
    path: str | Path | None = None,
) -> onnx.ModelProto:
    """Exports :func:`llama_module`: ``input_ids`` int64 [batch, seq] -> ``logits`` fp32 [batch, seq, vocab].

    Args:
        hidden, layers, heads, kv_heads, intermediate, vocab: model sizes.
        seed: seeds the weights, the outlier channels and the trace inputs; equal seeds give equal models.
        tied_embeddings: share the LM head with the token embedding.
        outlier_channels: how many residual channels get outliers (0: none).
        outlier_scale: the factor they are multiplied by.
        path: where to save the model as well (optional).
    """
    module = llama_module(
        hidden=hidden,
        layers=layers,
        heads=heads,
        kv_heads=kv_heads,
        intermediate=intermediate,
        vocab=vocab,
        seed=seed,
        tied_embeddings=tied_embeddings,
        outlier_channels=outlier_channels,
        outlier_scale=outlier_scale,
    )
    return _export(module, vocab, seed, "llama", path)


def build_gpt2(
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    vocab: int = 256,
    seed: int = 0,
    outlier_channels: int = 0,
    outlier_scale: float = 1.0,
    path: str | Path | None = None,
) -> onnx.ModelProto:
    """Exports :func:`gpt2_module`: ``input_ids`` int64 [batch, seq] -> ``logits`` fp32 [batch, seq, vocab].

    Arguments as for :func:`build_llama` (``intermediate`` defaults to ``4 * hidden``).
    """
    module = gpt2_module(
        hidden=hidden,
        layers=layers,
        heads=heads,
        intermediate=intermediate,
        vocab=vocab,
        seed=seed,
        outlier_channels=outlier_channels,
        outlier_scale=outlier_scale,
    )
    return _export(module, vocab, seed, "gpt2", path)


def build_bert(
    *,
    hidden: int = 64,
    layers: int = 2,
    heads: int = 4,
    intermediate: int = 128,
    vocab: int = 256,
    seed: int = 0,
    outlier_channels: int = 0,
    outlier_scale: float = 1.0,
    path: str | Path | None = None,
) -> onnx.ModelProto:
    """Exports :func:`bert_module`: ``input_ids``, ``attention_mask`` int64 [batch, seq] ->
    ``last_hidden_state`` float32 [batch, seq, hidden].

    Arguments as for :func:`build_llama`.
    """
    module = bert_module(
        hidden=hidden,
        layers=layers,
        heads=heads,
        intermediate=intermediate,
        vocab=vocab,
        seed=seed,
        outlier_channels=outlier_channels,
        outlier_scale=outlier_scale,
    )
    return _export(module, vocab, seed, "bert", path)
