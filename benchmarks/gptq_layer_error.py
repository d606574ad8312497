"""GPTQ vs RTN layer by layer on SmolLM2-135M: output error ‖(W − Q) X‖² on calibration and on held-out text.

Separates the algorithm from the calibration domain: for a few layers of the fp32 model, H = 2XXᵀ/n is
built from State of the Union windows or from Austen windows, GPTQ (act-order off/on) quantizes W with
it, and the mean squared output error is measured on the calibration inputs themselves and on held-out
Austen inputs. (Not sequential: every layer sees fp32 inputs, which isolates one layer's rounding.)

    python benchmarks/gptq_layer_error.py [--model smollm2-135m.onnx] [--layers 1 6] [--windows 32]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import numpy_helper

from qcompiler.algorithms.gptq import gptq_quantize
from qcompiler.algorithms.weight_quant import quantize_rtn
from qcompiler.calibration import collect_activation_samples, iterate_feeds
from qcompiler.tokenization import load_tokenizer, text_windows

DATA = Path(__file__).resolve().parent.parent / "data"


def output_error(w: np.ndarray, q: np.ndarray, x: np.ndarray) -> float:
    """Mean squared ‖(W − Q) x‖² over the rows x of ``x`` [n, K]."""
    return float(np.mean(((w - q) @ x.T) ** 2))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=Path("work/smollm2/smollm2-135m.onnx"))
    parser.add_argument("--layers", nargs="+", type=int, default=[1, 6])
    parser.add_argument("--projections", nargs="+", default=["q_proj", "o_proj", "down_proj"])
    parser.add_argument("--windows", type=int, default=32)
    parser.add_argument("--bits", nargs="+", type=int, default=[8, 4])
    args = parser.parse_args(argv)
    model = onnx.load(str(args.model))
    tokenizer = load_tokenizer(args.model.with_name("tokenizer.json"))
    weights = {t.name: t for t in model.graph.initializer}
    targets = {n.name: (n.input[0], n.input[1]) for n in model.graph.node
               if n.op_type == "MatMul" and n.input[1] in weights
               and any(f"layers.{layer}." in n.name for layer in args.layers)
               and any(p in n.name for p in args.projections)}

    def activations(text: Path, windows: int) -> dict[str, np.ndarray]:
        ids = text_windows(text, tokenizer, 512, max_windows=windows).astype(np.int64)
        return collect_activation_samples(model, [a for a, _ in targets.values()], iterate_feeds({"input_ids": ids}),
                                          max_batches=windows, max_rows=windows * 512)

    calibration = {"SOTU": activations(DATA / "sotu_calibration.txt", args.windows),
                   "Austen": activations(DATA / "austen_calibration.txt", args.windows)}
    held_out = activations(DATA / "austen_heldout.txt", max(1, args.windows // 4))
    print("| layer | bits | method | calibration | error on calibration | error on held-out Austen |")
    print("|---|---|---|---|---|---|")
    for name, (activation, weight) in targets.items():
        w = numpy_helper.to_array(weights[weight]).T.astype(np.float64)  # [N, K]
        short = name.split("/")[0]
        x_held = held_out[activation].astype(np.float64)
        for bits in args.bits:
            group = None if bits == 8 else 128
            q = quantize_rtn(w.T, bits, group, True).dequantize().T.astype(np.float64)
            x_sotu = calibration["SOTU"][activation].astype(np.float64)
            print(f"| {short} | {bits} | RTN | - | {output_error(w, q, x_sotu):.3e} (SOTU) | {output_error(w, q, x_held):.3e} |")
            for domain, acts in calibration.items():
                x = acts[activation].astype(np.float64)
                h = torch.from_numpy(2.0 * x.T @ x / len(x))
                for act_order in (False, True):
                    q = gptq_quantize(torch.from_numpy(w).float(), h, bits=bits, group_size=group,
                                      act_order=act_order).Q.double().numpy()
                    print(f"| {short} | {bits} | GPTQ act-order {'on' if act_order else 'off'} | {domain} | "
                          f"{output_error(w, q, x):.3e} | {output_error(w, q, x_held):.3e} |", flush=True)


if __name__ == "__main__":
    main()
