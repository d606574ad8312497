"""Reference models: seeded transformer builders for tests and the SmolLM2-135M importer.

Needs the ``import`` extra (torch, transformers, gguf, tokenizers, onnxscript):
``pip install qcompiler[import]``. Submodules are imported on first use, so ``import qcompiler.models``
itself stays cheap.
"""

from __future__ import annotations

import importlib
import logging

__all__ = [
    "build_llama",
    "build_gpt2",
    "build_bert",
    "llama_module",
    "gpt2_module",
    "bert_module",
    "export_module",
    "fold_sites",
    "apply_channel_factors_",
    "random_rescale_",
    "import_smollm2",
    "cached_smollm2",
]

logger = logging.getLogger(__name__)

_HOME = {
    "build_llama": "builders",
    "build_gpt2": "builders",
    "build_bert": "builders",
    "llama_module": "builders",
    "gpt2_module": "builders",
    "bert_module": "builders",
    "export_module": "export",
    "fold_sites": "rescale",
    "apply_channel_factors_": "rescale",
    "random_rescale_": "rescale",
    "import_smollm2": "smollm2",
    "cached_smollm2": "smollm2",
}


def __getattr__(name: str):
    if name in _HOME:
        return getattr(importlib.import_module(f"{__name__}.{_HOME[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
