"""Typed recipes: frozen dataclasses, validated on construction, round-tripping through dict/YAML.

A recipe says *what* to do (smooth, quantize activations, quantize weights, split outliers); the
pipeline turns it into a literal list of passes.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field, fields
from enum import Enum
from pathlib import Path
from typing import Any, get_args, get_origin, get_type_hints

import yaml

from qcompiler.errors import QCompileError

__all__ = [
    "ActivationScheme", "RangeMethod", "WeightLowering", "SmoothQuantConfig", "W8A8Config",
    "WeightOnlyConfig", "GPTQConfig", "OutlierSplitConfig", "CalibrationConfig", "Recipe", "RecipeError",
]


class RecipeError(QCompileError):
    """A recipe (built-in name or YAML file) is unknown or has invalid values."""


class ActivationScheme(str, Enum):
    """How activations entering a quantized GEMM get their int8 scale.

    PER_TENSOR_STATIC: one scale per tensor, fixed at compile time from calibration (what TensorRT fuses).
    PER_TOKEN_DYNAMIC: one scale per row (token), computed at run time from that row's max|x|.
    """

    PER_TENSOR_STATIC = "per_tensor_static"
    PER_TOKEN_DYNAMIC = "per_token_dynamic"


class RangeMethod(str, Enum):
    """How a static activation range is taken from calibration: the max, or a percentile of |x|."""

    MAX = "max"
    PERCENTILE = "percentile"


class WeightLowering(str, Enum):
    """How a weight-only quantized MatMul is written.

    QDQ: standard ONNX, INT4/INT8 DequantizeLinear with block_size along K (opset 21) feeding the MatMul;
        TensorRT >= 10 fuses it into its weight-only GEMM.
    MATMUL_NBITS: ONNX Runtime's com.microsoft.MatMulNBits (fast on ORT CPU/CUDA).
    """

    QDQ = "qdq"
    MATMUL_NBITS = "matmul_nbits"


def _check(cond: bool, message: str) -> None:
    if not cond:
        raise RecipeError(message)


@dataclass(frozen=True)
class SmoothQuantConfig:
    """SmoothQuant: s_j = max|X_j|^alpha / max|W_j|^(1-alpha).

    Attributes:
        alpha: migration strength in [0, 1], or "auto" to search ``alpha_grid`` per layer group.
        alpha_grid: candidates for "auto".
        auto_samples: calibration samples used to score each alpha candidate.
        fold_into_linear: absorb 1/s into a preceding linear op (V->O, up->down) where exact.
    """

    alpha: float | str = 0.5
    alpha_grid: tuple[float, ...] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
    auto_samples: int = 4
    fold_into_linear: bool = True

    def __post_init__(self):
        if isinstance(self.alpha, str):
            _check(self.alpha == "auto", f"smoothquant.alpha must be a number in [0, 1] or 'auto', got {self.alpha!r}")
        else:
            _check(0.0 <= float(self.alpha) <= 1.0, f"smoothquant.alpha must be in [0, 1], got {self.alpha}")
        _check(len(self.alpha_grid) > 0 and all(0 <= a <= 1 for a in self.alpha_grid),
               "smoothquant.alpha_grid must hold values in [0, 1]")
        _check(self.auto_samples >= 1, "smoothquant.auto_samples must be >= 1")


@dataclass(frozen=True)
class W8A8Config:
    """Int8 weights (symmetric, per output channel) and int8 activations (symmetric).

    Attributes:
        activation: per-tensor static or per-token dynamic activation scales.
        range_method: for static scales, max or percentile of |x| over calibration.
        percentile: the percentile for RangeMethod.PERCENTILE.
        op_types: weighted ops to quantize.
        min_gemm_dim: skip GEMMs whose K or N is below this (tiny GEMMs lose more than they gain).
        quantize_lm_head: include the last MatMul producing the graph output (vocabulary projection).
        quantize_attention_bmm: include activation x activation MatMuls (QK^T, PV).
        include_regex / exclude_regex: node-name filters applied after the op-type rules.
    """

    activation: ActivationScheme = ActivationScheme.PER_TOKEN_DYNAMIC
    range_method: RangeMethod = RangeMethod.MAX
    percentile: float = 99.99
    op_types: tuple[str, ...] = ("MatMul", "Gemm")
    min_gemm_dim: int = 16
    quantize_lm_head: bool = False
    quantize_attention_bmm: bool = False
    include_regex: str | None = None
    exclude_regex: str | None = None

    def __post_init__(self):
        _check(50.0 < self.percentile <= 100.0, f"w8a8.percentile must be in (50, 100], got {self.percentile}")
        _check(set(self.op_types) <= {"MatMul", "Gemm"}, f"w8a8.op_types must be MatMul/Gemm, got {self.op_types}")
        _check(self.min_gemm_dim >= 1, "w8a8.min_gemm_dim must be >= 1")


@dataclass(frozen=True)
class WeightOnlyConfig:
    """Weight-only round-to-nearest quantization (the RTN baseline, and the format GPTQ shares).

    Attributes:
        bits: 2, 3, 4 or 8.
        group_size: columns of K sharing one scale (32, 64, 128, ...), or None for per output channel.
        symmetric: zero-point 0 (what TensorRT accepts) or asymmetric with a zero point.
        lowering: how the quantized MatMul is written (standard Q/DQ or ORT MatMulNBits).
        quantize_lm_head: include the vocabulary projection.
        min_gemm_dim: skip weights with K or N below this.
        accuracy_level: MatMulNBits' accuracy_level (0 unset, 1 fp32, 2 fp16, 3 bf16, 4 int8): the
            lowest precision ORT may compute in. 4 (A quantized to int8 per block) is ORT CPU's fastest
            kernel; 0 computes exactly what the QDQ lowering computes. Ignored by the QDQ lowering.
    """

    bits: int = 4
    group_size: int | None = 128
    symmetric: bool = True
    lowering: WeightLowering = WeightLowering.MATMUL_NBITS
    quantize_lm_head: bool = False
    min_gemm_dim: int = 16
    accuracy_level: int = 4

    def __post_init__(self):
        _check(self.bits in (2, 3, 4, 8), f"bits must be 2, 3, 4 or 8, got {self.bits}")
        _check(self.group_size is None or (self.group_size >= 16 and self.group_size & (self.group_size - 1) == 0),
               f"group_size must be a power of two >= 16 or null (per channel), got {self.group_size}")
        _check(self.min_gemm_dim >= 1, "min_gemm_dim must be >= 1")
        _check(self.accuracy_level in (0, 1, 2, 3, 4), f"accuracy_level must be 0..4, got {self.accuracy_level}")


@dataclass(frozen=True)
class GPTQConfig(WeightOnlyConfig):
    """GPTQ (Frantar et al. 2022) on top of the weight-only format.

    Attributes:
        act_order: process columns by decreasing Hessian diagonal; with static groups the scales are
            fixed from the unpermuted groups first, so the packed layout stays contiguous.
        damp: lambda = damp * mean(diag(H)) added to H's diagonal.
        block_size: columns per lazy batch update.
    """

    act_order: bool = True
    damp: float = 0.01
    block_size: int = 128

    def __post_init__(self):
        super().__post_init__()
        _check(0.0 < self.damp < 1.0, f"gptq.damp must be in (0, 1), got {self.damp}")
        _check(self.block_size >= 1, "gptq.block_size must be >= 1")


@dataclass(frozen=True)
class OutlierSplitConfig:
    """LLM.int8() mixed-precision decomposition as a static rewrite.

    A column j of a GEMM's input stays in float when |x_j| > threshold in at least
    ``min_token_fraction`` of calibration tokens, or, with ``relative_threshold`` set, when
    |x_j| > relative_threshold · rms(x_t) (the token's root mean square over its K values) in at least
    ``relative_min_token_fraction`` of tokens; at most ``max_float_fraction`` of K columns are kept.

    The absolute rule is LLM.int8()'s (6.0, tuned on OPT's LayerNorm outputs). Where a model's GEMM
    inputs live on another scale (RMSNorm outputs of ~1, as in Llama-style models), a few channels can
    still carry each token's int8 scale at 8-12x the token's RMS without ever reaching 6; the relative
    rule catches those systematic outlier features whatever the scale.
    """

    threshold: float = 6.0
    min_token_fraction: float = 0.001
    max_float_fraction: float = 0.1
    relative_threshold: float | None = None
    relative_min_token_fraction: float = 0.01

    def __post_init__(self):
        _check(self.threshold > 0, "outlier_split.threshold must be > 0")
        _check(0.0 <= self.min_token_fraction <= 1.0, "outlier_split.min_token_fraction must be in [0, 1]")
        _check(0.0 < self.max_float_fraction <= 1.0, "outlier_split.max_float_fraction must be in (0, 1]")
        _check(self.relative_threshold is None or self.relative_threshold > 1.0,
               "outlier_split.relative_threshold must be > 1 (a multiple of the token's RMS) or null")
        _check(0.0 <= self.relative_min_token_fraction <= 1.0,
               "outlier_split.relative_min_token_fraction must be in [0, 1]")


@dataclass(frozen=True)
class CalibrationConfig:
    """How calibration statistics are gathered.

    Attributes:
        num_samples: calibration rows used (None: all given).
        batch: rows per ONNX Runtime run.
        histogram_bins: log-spaced |x| bins per tensor, for percentile ranges.
    """

    num_samples: int | None = 64
    batch: int = 1
    histogram_bins: int = 2048

    def __post_init__(self):
        _check(self.num_samples is None or self.num_samples >= 1, "calibration.num_samples must be >= 1")
        _check(self.batch >= 1, "calibration.batch must be >= 1")
        _check(self.histogram_bins >= 16, "calibration.histogram_bins must be >= 16")


@dataclass(frozen=True)
class Recipe:
    """A complete compilation recipe. Each section that is None is skipped."""

    name: str
    description: str = ""
    smoothquant: SmoothQuantConfig | None = None
    outlier_split: OutlierSplitConfig | None = None
    w8a8: W8A8Config | None = None
    weight_only: WeightOnlyConfig | None = None
    gptq: GPTQConfig | None = None
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)

    def __post_init__(self):
        _check(bool(self.name), "recipe needs a name")
        _check(not (self.weight_only and self.gptq), "a recipe takes weight_only (RTN) or gptq, not both")
        _check(not ((self.weight_only or self.gptq) and self.w8a8),
               "weight-only and W8A8 quantization of the same GEMMs cannot be combined in one recipe")
        _check(self.outlier_split is None or self.w8a8 is not None, "outlier_split needs a w8a8 section")

    @property
    def needs_calibration(self) -> bool:
        return bool(self.smoothquant or self.outlier_split or self.gptq or
                    (self.w8a8 and self.w8a8.activation == ActivationScheme.PER_TENSOR_STATIC))

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Recipe:
        return _from_plain(cls, data, "recipe")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @classmethod
    def from_yaml(cls, path: str | Path) -> Recipe:
        try:
            data = yaml.safe_load(Path(path).read_text())
        except (OSError, yaml.YAMLError) as err:
            raise RecipeError(f"cannot read recipe {path}: {err}") from None
        if not isinstance(data, dict):
            raise RecipeError(f"recipe {path} must be a YAML mapping")
        data.setdefault("name", Path(path).stem)
        return cls.from_dict(data)


def _to_plain(value: Any) -> Any:
    if dataclasses.is_dataclass(value):
        return {f.name: _to_plain(getattr(value, f.name)) for f in fields(value)}
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, tuple):
        return list(value)
    return value


def _from_plain(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise RecipeError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = set(data) - known
    if unknown:
        raise RecipeError(f"{where}: unknown key(s) {sorted(unknown)}; known: {sorted(known)}")
    kwargs = {name: _coerce(hints[name], value, f"{where}.{name}") for name, value in data.items()}
    try:
        return cls(**kwargs)
    except TypeError as err:
        raise RecipeError(f"{where}: {err}") from None


def _coerce(hint: Any, value: Any, where: str) -> Any:
    options = get_args(hint) if get_origin(hint) in (types.UnionType, typing.Union) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise RecipeError(f"{where} may not be null")
    errors = []
    for option in options:
        if option is type(None):
            continue
        try:
            if dataclasses.is_dataclass(option):
                return _from_plain(option, value, where)
            if isinstance(option, type) and issubclass(option, Enum):
                return option(value)
            if get_origin(option) is tuple:
                if not isinstance(value, (list, tuple)):
                    raise ValueError("expected a list")
                return tuple(get_args(option)[0](v) for v in value)
            if option is float and isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
            if option in (int, str, bool) and isinstance(value, option) and not (option is int and isinstance(value, bool)):
                return value
            raise ValueError(f"expected {getattr(option, '__name__', option)}")
        except (ValueError, TypeError) as err:
            errors.append(str(err))
    raise RecipeError(f"{where}: invalid value {value!r} ({'; '.join(errors)})")
