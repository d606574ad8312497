"""Built-in recipes, and loading a recipe by name or from a YAML file."""

from __future__ import annotations

from pathlib import Path

from qcompiler.config import (
    ActivationScheme,
    CalibrationConfig,
    GPTQConfig,
    OutlierSplitConfig,
    Recipe,
    RecipeError,
    SmoothQuantConfig,
    W8A8Config,
    WeightOnlyConfig,
)

__all__ = ["BUILTIN_RECIPES", "load_recipe"]

_STATIC = W8A8Config(activation=ActivationScheme.PER_TENSOR_STATIC)
_DYNAMIC = W8A8Config(activation=ActivationScheme.PER_TOKEN_DYNAMIC)
_GPTQ_CALIBRATION = CalibrationConfig(num_samples=128)

BUILTIN_RECIPES: dict[str, Recipe] = {r.name: r for r in [
    Recipe("fp32", "no-op baseline: the model as given"),
    Recipe("w8a8-naive", "int8 per-channel weights, per-tensor static int8 activations (max), no smoothing: "
           "what ONNX Runtime's quantize_static gives", w8a8=_STATIC),
    Recipe("w8a8-smoothquant", "SmoothQuant (alpha searched per layer group) + int8 per-channel weights, "
           "per-token dynamic int8 activations", smoothquant=SmoothQuantConfig(alpha="auto"), w8a8=_DYNAMIC),
    Recipe("w8a8-smoothquant-lmhead", "w8a8-smoothquant that also quantizes the vocabulary projection (LM head): "
           "faster on large vocabularies, a little less accurate", smoothquant=SmoothQuantConfig(alpha="auto"),
           w8a8=W8A8Config(activation=ActivationScheme.PER_TOKEN_DYNAMIC, quantize_lm_head=True)),
    Recipe("w8a8-smoothquant-static", "SmoothQuant + int8 per-channel weights, per-tensor static int8 activations "
           "(the form TensorRT fuses)", smoothquant=SmoothQuantConfig(alpha="auto"), w8a8=_STATIC),
    Recipe("w8a8-smoothquant-split", "SmoothQuant + LLM.int8() outlier columns in float + per-token W8A8 for the rest",
           smoothquant=SmoothQuantConfig(alpha="auto"), outlier_split=OutlierSplitConfig(), w8a8=_DYNAMIC),
    # LLM.int8() sends a column to float whenever any value of the batch exceeds 6; the static equivalent is
    # any calibration token (min_token_fraction 0). 6 is a magnitude on OPT's LayerNorm outputs: on RMSNorm
    # outputs of ~1 (SmolLM2) it finds almost nothing in the q/k/v and gate/up inputs, whose per-token int8
    # scale is still set by a few channels at 8-12x the token's RMS. The scale-free rule (4 x RMS in >= 2% of
    # tokens, ~300x what Gaussian tails give) catches those: +1.54% -> +0.44% ppl on SmolLM2
    # (benchmarks/results/llm_int8_smollm2.md).
    Recipe("llm-int8", "LLM.int8(): activation columns with |x| > 6 in any calibration token, or above 4x the "
           "token's RMS in >= 2% of tokens, in float; vector-wise W8A8 for the rest",
           outlier_split=OutlierSplitConfig(threshold=6.0, min_token_fraction=0.0, relative_threshold=4.0,
                                            relative_min_token_fraction=0.02), w8a8=_DYNAMIC),
    Recipe("w4a16-rtn", "4-bit weights, group 128, symmetric, round-to-nearest", weight_only=WeightOnlyConfig(bits=4)),
    Recipe("w8a16-rtn", "8-bit weights per output channel, round-to-nearest",
           weight_only=WeightOnlyConfig(bits=8, group_size=None)),
    Recipe("w4a16-gptq", "4-bit weights, group 128, symmetric, GPTQ with act-order (static groups)",
           gptq=GPTQConfig(bits=4), calibration=_GPTQ_CALIBRATION),
    Recipe("w3a16-gptq", "3-bit weights, group 128, symmetric, GPTQ with act-order (static groups)",
           gptq=GPTQConfig(bits=3), calibration=_GPTQ_CALIBRATION),
]}


def load_recipe(name_or_path: str | Path) -> Recipe:
    """A built-in recipe by name, or a YAML file holding a serialised ``Recipe``."""
    text = str(name_or_path)
    if text in BUILTIN_RECIPES:
        return BUILTIN_RECIPES[text]
    if text.endswith((".yaml", ".yml")) or Path(text).is_file():
        if not Path(text).is_file():
            raise RecipeError(f"recipe file not found: {text}")
        return Recipe.from_yaml(text)
    raise RecipeError(f"unknown recipe {text!r}; built-in: {', '.join(BUILTIN_RECIPES)} (or a .yaml file)")
