"""Weight-only INT4 accuracy on SmolLM2-135M: fp32 vs RTN vs GPTQ (act-order off/on), original and off-grid.

SmolLM2 ships on a 32-wide 4-bit grid, which flatters RTN; the "rescaled" model moves every linear
weight off that grid with an exact per-input-channel rescaling (factors e^U(-0.7, 0.7) folded into the
norms and preceding linear ops), so the comparison there is fair. Group size 128, symmetric; never 32.
Perplexity on held-out Jane Austen text; GPTQ calibrated on State of the Union speeches (and, for the
domain row, on other Austen text). Rows are appended to --out as they finish.

    python benchmarks/eval_weight_only.py [--work work] [--calib-windows 128] [--eval-windows 16]
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import time
from pathlib import Path

import qcompiler
from qcompiler.config import GPTQConfig, Recipe, WeightOnlyConfig
from qcompiler.models.smollm2 import cached_smollm2

DATA = Path(__file__).resolve().parent.parent / "data"


ORT_GPTQ = "ort-gptq"


def _ort_gptq_row(args, variant: str, model: Path, tokenizer: Path, calib_text: Path, label: str) -> None:
    """ONNX Runtime's own GPTQ on the same model, calibration text, window length and group size."""
    import onnx
    from bench_gptq import ort_gptq

    from qcompiler.evaluation import lm_feeds, perplexity
    from qcompiler.graph import save_model
    from qcompiler.tokenization import load_tokenizer, text_windows

    n = args.ort_calib_windows or args.calib_windows
    tok = load_tokenizer(tokenizer)
    original = onnx.load(str(model))
    windows = text_windows(calib_text, tok, args.seq_len, max_windows=n)
    eval_feeds = lm_feeds(original, text_windows(DATA / "austen_heldout.txt", tok, args.seq_len,
                                                 max_windows=args.eval_windows))
    start = time.perf_counter()
    quantized, _ = ort_gptq(original, windows, group_size=args.group_size, act_order=False)
    seconds = time.perf_counter() - start
    path = args.work / f"{model.stem}.ort-gptq-{n}.onnx"
    save_model(quantized, path)
    del quantized
    ppl, ppl_fp32 = perplexity(path, eval_feeds, threads=2), perplexity(model, eval_feeds, threads=2)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    with args.out.open("a") as out:
        out.write(f"| {variant} | {label}, {n} calibration windows | {ppl:.3f} | {100 * (ppl / ppl_fp32 - 1):+.2f}% | "
                  f"{seconds:.0f} | {peak:.0f} |\n")
    print(f"{variant} {label}: ppl {ppl:.3f} (fp32 {ppl_fp32:.3f}), {seconds:.0f}s", flush=True)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=Path("work"))
    parser.add_argument("--calib-windows", type=int, default=128)
    parser.add_argument("--eval-windows", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--group-size", type=int, default=128)
    parser.add_argument("--models", nargs="+", default=["original", "rescaled"])
    parser.add_argument("--out", type=Path, default=Path("weight_only_results.md"))
    parser.add_argument("--runs", nargs="+", type=int, help="indices of the runs to do (default: all)")
    parser.add_argument("--ort-calib-windows", type=int, default=None,
                        help="calibration windows for ONNX Runtime's GPTQ (default --calib-windows; it takes hours at 128)")
    args = parser.parse_args(argv)
    rtn = WeightOnlyConfig(bits=4, group_size=args.group_size)
    gptq = GPTQConfig(bits=4, group_size=args.group_size)
    runs = [("w4a16-rtn", Recipe("w4a16-rtn", weight_only=rtn), None),
            ("w4a16-gptq act-order off", Recipe("gptq-noact", gptq=dataclasses.replace(gptq, act_order=False)), "sotu"),
            ("w4a16-gptq act-order on", Recipe("gptq-act", gptq=gptq), "sotu"),
            ("w4a16-gptq act-order on, Austen calibration", Recipe("gptq-act-austen", gptq=gptq), "austen"),
            ("ONNX Runtime GPTQ (matmul_nbits_quantizer defaults: act-order off)", ORT_GPTQ, "sotu")]
    runs = [run for i, run in enumerate(runs) if args.runs is None or i in args.runs]
    texts = {"sotu": DATA / "sotu_calibration.txt", "austen": DATA / "austen_calibration.txt"}
    with args.out.open("a") as out:
        out.write(f"\n### SmolLM2-135M weight-only INT4 g{args.group_size} symmetric; {args.calib_windows} x {args.seq_len} "
                  f"calibration windows; perplexity on {args.eval_windows} x {args.seq_len} held-out Austen tokens\n\n"
                  "| model | method | ppl | vs fp32 | compile s | peak RSS MB |\n|---|---|---|---|---|---|\n")
    for variant in args.models:
        model, tokenizer = cached_smollm2(args.work / "smollm2", rescale_seed=0 if variant == "rescaled" else None)
        for run_index, (label, recipe, calib) in enumerate(runs):
            if recipe is ORT_GPTQ:
                _ort_gptq_row(args, variant, model, tokenizer, texts[calib], label)
                continue
            data = qcompiler.DataOptions(calib_text=texts.get(calib, texts["sotu"]), tokenizer=tokenizer,
                                         seq_len=args.seq_len, num_samples=args.calib_windows)
            evaluate = qcompiler.EvalOptions(eval_text=DATA / "austen_heldout.txt", eval_windows=args.eval_windows,
                                             layer_report=False, latency_repeats=3, threads=2)
            start = time.perf_counter()
            result = qcompiler.compile(model, args.work / f"{model.stem}.{recipe.name}.onnx", recipe, data=data,
                                       evaluate=evaluate)
            seconds = sum(r.seconds for r in result.records)
            ev = result.evaluation
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            with args.out.open("a") as out:
                if run_index == 0:
                    out.write(f"| {variant} | fp32 | {ev.perplexity_original:.3f} | - | - | - |\n")
                out.write(f"| {variant} | {label} | {ev.perplexity_compiled:.3f} | "
                          f"{100 * (ev.perplexity_compiled / ev.perplexity_original - 1):+.2f}% | {seconds:.0f} | "
                          f"{peak:.0f} |\n")
            print(f"{variant} {label}: ppl {ev.perplexity_compiled:.3f} (fp32 {ev.perplexity_original:.3f}), "
                  f"{seconds:.0f}s passes, {time.perf_counter() - start:.0f}s total", flush=True)


if __name__ == "__main__":
    main()
