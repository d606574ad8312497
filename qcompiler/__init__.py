"""qcompiler: an ONNX graph-rewriting quantization compiler for transformer models.

    import qcompiler
    result = qcompiler.compile("model.onnx", "model.w8a8.onnx", "w8a8-smoothquant",
                               data=qcompiler.DataOptions(calib_text="text.txt", tokenizer="tokenizer.json"))
"""

from qcompiler.config import (
    ActivationScheme,
    CalibrationConfig,
    GPTQConfig,
    OutlierSplitConfig,
    RangeMethod,
    Recipe,
    SmoothQuantConfig,
    W8A8Config,
    WeightLowering,
    WeightOnlyConfig,
)
from qcompiler.errors import QCompileError
from qcompiler.pipeline import CompileResult, DataOptions, EvalOptions, build_passes, compile
from qcompiler.recipes import BUILTIN_RECIPES, load_recipe

__all__ = [
    "compile", "CompileResult", "DataOptions", "EvalOptions", "build_passes", "load_recipe", "BUILTIN_RECIPES",
    "Recipe", "SmoothQuantConfig", "W8A8Config", "WeightOnlyConfig", "GPTQConfig", "OutlierSplitConfig",
    "CalibrationConfig", "ActivationScheme", "RangeMethod", "WeightLowering", "QCompileError",
]
__version__ = "0.1.0"
