"""Exports one step of a transformers decoder over a KV cache, laid out as optimum exports decoders with
past: inputs ``input_ids`` [batch, seq], ``attention_mask`` [batch, past + seq] and
``past_key_values.{layer}.key/value`` [batch, kv heads, past, head dim]; outputs ``logits`` and
``present.{layer}.key/value`` [batch, kv heads, past + seq, head dim]. One graph serves a prefill (an
empty cache), a decode step and a chunk after a cache. It uses torch's TorchScript exporter, as optimum
does; the model keeps whatever attention implementation its config names (eager, or sdpa, whose export
zeroes the NaN probabilities of rows its mask leaves without a key).
"""

from __future__ import annotations

import io
import warnings

import onnx
import torch

__all__ = ["KVCacheStep", "export_with_kv_cache"]


class KVCacheStep(torch.nn.Module):
    """``(input_ids, attention_mask, *past) -> (logits, *present)`` around a transformers causal LM, past and
    present flattened as (layer 0 key, layer 0 value, layer 1 key, ...)."""

    def __init__(self, hf: torch.nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, *past: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.hf.config)
        for layer in range(len(past) // 2):
            cache.update(past[2 * layer], past[2 * layer + 1], layer)
        out = self.hf(input_ids=input_ids, attention_mask=attention_mask, past_key_values=cache, use_cache=True)
        return (out.logits, *[t for layer in out.past_key_values.layers for t in (layer.keys, layer.values)])


def export_with_kv_cache(hf: torch.nn.Module, input_ids: torch.Tensor, past_length: int,
                         opset: int = 17) -> tuple[onnx.ModelProto, list[tuple[int, int]]]:
    """The exported step and each cache input's (heads, head dim), in input order.

    Traced with the first ``past_length`` tokens of ``input_ids`` [batch, n] cached (computed by ``hf``)
    and the rest as new tokens: give both more than one token, so the tracer keeps them apart.
    """
    if not 1 < past_length < input_ids.shape[1] - 1:
        raise ValueError(f"export_with_kv_cache: past_length must leave more than one token on each side, got "
                         f"{past_length} of {input_ids.shape[1]}")
    hf = hf.eval()
    with torch.no_grad():
        cache = hf(input_ids=input_ids[:, :past_length], use_cache=True).past_key_values
    past = [t for layer in cache.layers for t in (layer.keys, layer.values)]
    names = [f"past_key_values.{i // 2}.{('key', 'value')[i % 2]}" for i in range(len(past))]
    present = [name.replace("past_key_values", "present") for name in names]
    dims = {"input_ids": {0: "batch", 1: "seq"}, "attention_mask": {0: "batch", 1: "past_seq + seq"},
            **{n: {0: "batch", 2: "past_seq"} for n in names}, **{n: {0: "batch", 2: "past_seq + seq"} for n in present}}
    buffer = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TracerWarnings about data-dependent Python control flow
        torch.onnx.export(KVCacheStep(hf), (input_ids[:, past_length:], torch.ones_like(input_ids), *past), buffer,
                          dynamo=False, opset_version=opset, input_names=["input_ids", "attention_mask", *names],
                          output_names=["logits", *present], dynamic_axes=dims)
    return onnx.load_from_string(buffer.getvalue()), [(t.shape[1], t.shape[3]) for t in past]
