"""Perplexity of an LM's TensorRT plugin graph without TensorRT: the numpy references of the ops and the
plugins' own kernels, side by side with the fp32 model and the INT4 MatMulNBits graph in ONNX Runtime.

The plugin graph: `qcompile --backend tensorrt --plugins`'s pass list for INT4 RTN (symmetric, --group-size,
MatMulNBits at accuracy_level 0): WeightOnlyRTN -> LowerInt4Gemm -> LowerW8A8Gemm -> FuseAttention("plugin").
Its qcompiler nodes run under ONNX's reference evaluator (qcompiler.backends.plugin_graph): float64 numpy
references, or (--kernels, CUDA) the AOT kernels a TensorRT engine embeds, launched through CuPy in float16
with one tactic pair per row.

    python -m benchmarks.plugin_graph_ppl --model smollm2-135m.onnx --tokenizer tokenizer.json \\
        [--windows 4 --seq-len 512] [--save-plugin-graph plugin.onnx]              # CPU rows
    python -m benchmarks.plugin_graph_ppl --plugin-graph plugin.onnx --ids ids.npy \\
        --kernels wgmma_64x128:wgmma_d64,mma_n32_w4_sw:d64                         # GPU rows

(--save-ids writes the token windows, so a GPU machine without the tokenizer scores the same tokens. A
--plugin-graph may hold any of the four plugin ops, e.g. `qcompile --backend tensorrt --plugins` output. Models
that also take attention_mask / position_ids get them as qcompile's evaluation feeds them.)

--padded (models taking attention_mask): a second table. The first window's prefixes of 4/4, 3/4, 2/4 and 1/4 of its
length, left-padded into one batch, against each prefix run alone, per implementation: the largest |logit
difference| at real tokens over the largest |logit|. Beside it, for scale, the same measure between each prefix
alone on that implementation and on the numpy references (the implementation's own rounding). This runs
FlashAttention's key_mask (one run of kept keys per row) on a real model.

--decode N (models with a KV cache, e.g. qcompiler.models.kv_cache exports): a third table. The first window
run as a prefill of all but its last N + N/2 tokens, a chunk of N/2 tokens over that cache, then N one-token
decode steps, each step's presents fed back as the next past, against the window run as one prefill, per
implementation (the largest |logit difference| at the tokens after the prefill, over the largest |logit|).
This runs FlashAttention with fewer queries than keys (causal bottom-right aligned) on a real model.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import onnx

from qcompiler.backends.plugin_graph import kernel_ops, run_plugin_graph
from qcompiler.config import Recipe, WeightOnlyConfig
from qcompiler.evaluation import cache_inputs, lm_feeds, logits_through_cache, perplexity_of
from qcompiler.graph import export_graph, import_graph, save_model
from qcompiler.pass_manager import PassContext
from qcompiler.pipeline import build_passes

DATA = Path(__file__).resolve().parent.parent / "data"


def plugin_graphs(model: onnx.ModelProto, group_size: int, max_seq_len: int) -> tuple[onnx.ModelProto, onnx.ModelProto, str]:
    """(the MatMulNBits graph, the plugin graph, what the passes did): the pass list of `qcompile --recipe
    w4a16-rtn --backend tensorrt --plugins`, at accuracy_level 0 (MatMulNBits then computes in float32)."""
    recipe = Recipe("w4a16-rtn-exact", weight_only=WeightOnlyConfig(bits=4, group_size=group_size, accuracy_level=0))
    rtn, *lowerings = build_passes(recipe, "tensorrt", plugins=True, max_seq_len=max_seq_len)
    graph = import_graph(model)
    done = [rtn.run(graph, PassContext())]
    nbits = export_graph(graph)
    done += [p.run(graph, PassContext()) for p in lowerings]
    return nbits, export_graph(graph), "; ".join(r.summary for r in done)


def _ort(model: onnx.ModelProto):
    import onnxruntime as ort

    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return lambda feed: session.run(None, feed)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="fp32 ONNX LM (input_ids -> logits)")
    ap.add_argument("--plugin-graph", help="an already built plugin graph (instead of --model)")
    ap.add_argument("--tokenizer")
    ap.add_argument("--text", default=str(DATA / "austen_heldout.txt"))
    ap.add_argument("--ids", help=".npy of token windows [windows, seq] (instead of --text/--tokenizer)")
    ap.add_argument("--save-ids")
    ap.add_argument("--windows", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--max-seq-len", type=int, default=8192)
    ap.add_argument("--save-plugin-graph")
    ap.add_argument("--kernels", default="", help="INT4_TACTIC:ATTENTION_TACTIC[:W8A8_TACTIC],... (needs CUDA)")
    ap.add_argument("--padded", action="store_true", help="also the left-padded batch table (see above)")
    ap.add_argument("--decode", type=int, default=0, help="also the KV-cache table: N decode steps (see above)")
    args = ap.parse_args(argv)
    if bool(args.model) == bool(args.plugin_graph):
        raise SystemExit("plugin_graph_ppl: give exactly one of --model and --plugin-graph")
    if args.ids:
        windows = np.load(args.ids)
    elif args.tokenizer:
        from qcompiler.tokenization import text_windows

        windows = text_windows(args.text, args.tokenizer, args.seq_len, max_windows=args.windows)
    else:
        raise SystemExit("plugin_graph_ppl: give --ids, or --tokenizer (with --text)")
    if args.save_ids:
        np.save(args.save_ids, windows)
    model = onnx.load(args.model or args.plugin_graph)
    feeds = lm_feeds(model, windows)
    if args.padded and ("attention_mask" not in feeds[0] or "position_ids" in feeds[0]):
        raise SystemExit("plugin_graph_ppl: --padded needs a model that takes attention_mask (and not position_ids)")
    caches = cache_inputs(model)
    if args.decode and (not caches or 3 * args.decode // 2 >= windows.shape[1]):
        raise SystemExit("plugin_graph_ppl: --decode N needs a model with a KV cache and windows longer than 1.5 N")
    plugin_runs = []  # (name, outputs of a feed) of the plugin graph: references first, then kernels

    def row(name: str, outputs_of, plugin_graph: bool = True) -> None:
        start = time.time()
        if plugin_graph:
            plugin_runs.append((name, outputs_of))
        ppl = perplexity_of(lambda f: outputs_of(f)[0], feeds)
        print(f"| {name} | {ppl:.4f} | {time.time() - start:.0f} |", flush=True)

    print(f"# Perplexity of the plugin graph, {len(windows)} x {windows.shape[1]} tokens\n")
    if args.model:
        nbits, plugin, summary = plugin_graphs(model, args.group_size, args.max_seq_len)
        print(f"Passes: {summary}\n")
        print("| graph | ppl | s |\n|---|---|---|")
        row("fp32, ONNX Runtime", _ort(model), plugin_graph=False)
        row(f"INT4 g{args.group_size} MatMulNBits, ONNX Runtime", _ort(nbits), plugin_graph=False)
        if args.save_plugin_graph:
            save_model(plugin, args.save_plugin_graph)
    else:
        plugin = model
        print("| graph | ppl | s |\n|---|---|---|")
    row("plugin graph, numpy references (float64)", lambda f: run_plugin_graph(plugin, f))
    for spec in filter(None, args.kernels.split(",")):
        int4_tactic, attention_tactic, w8a8_tactic = (spec.split(":") + ["large"])[:3]
        ops = kernel_ops(int4_tactic, attention_tactic, w8a8_tactic=w8a8_tactic)
        row(f"plugin graph, kernels {spec} (float16)", lambda f, ops=ops: run_plugin_graph(plugin, f, ops))
    if args.padded:
        print("\n| graph | left-padded batch vs each prefix alone | each prefix alone vs the references |\n"
              "|---|---|---|")
        prefixes = [max(1, windows.shape[1] * quarters // 4) for quarters in (4, 3, 2, 1)]
        reference = None
        for name, outputs_of in plugin_runs:
            batch, alone = padded_batch(lambda f, run=outputs_of: run(f)[0], windows[0], prefixes)
            reference = reference or alone
            print(f"| {name} | {_worst(batch, alone):.2e} | {_worst(alone, reference):.2e} |", flush=True)
    if args.decode:
        print(f"\n| graph | prefill + chunk of {args.decode // 2} + {args.decode} decode steps vs one prefill |\n|---|---|")
        for name, outputs_of in plugin_runs:
            steps, whole = cached_steps(outputs_of, feeds[0], caches, args.decode)
            print(f"| {name} | {_worst([steps], [whole]):.2e} |", flush=True)


def cached_steps(outputs_of, feed: dict[str, np.ndarray], caches: list[str], decode: int) -> tuple[np.ndarray, np.ndarray]:
    """Logits of the window's last ``decode + decode // 2`` tokens: through the KV cache (a prefill of the rest,
    a chunk of ``decode // 2``, then ``decode`` one-token steps), and from one prefill of the whole window."""
    seq = feed["input_ids"].shape[1]
    start = seq - decode - decode // 2
    bounds = sorted({0, start, start + decode // 2, *range(start + decode // 2 + 1, seq + 1)})
    return logits_through_cache(outputs_of, feed, caches, bounds)[0, start:], outputs_of(feed)[0][0, start:]


def padded_batch(logits_of, window: np.ndarray, lengths: list[int]) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """Logits at the real tokens of the window's prefixes of ``lengths``: left-padded into one batch, and each alone."""
    seq = len(window)
    ids, mask = np.zeros((len(lengths), seq), np.int64), np.zeros((len(lengths), seq), np.int64)
    for row, length in enumerate(lengths):
        ids[row, seq - length:], mask[row, seq - length:] = window[:length], 1
    batch = logits_of({"input_ids": ids, "attention_mask": mask})
    alone = [logits_of({"input_ids": window[None, :length], "attention_mask": np.ones((1, length), np.int64)})[0]
             for length in lengths]
    return [batch[row, seq - length:] for row, length in enumerate(lengths)], alone


def _worst(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """The largest |logit difference| over the largest |logit|, over the prefixes."""
    return max(float(np.abs(g - w).max() / np.abs(w).max()) for g, w in zip(got, want, strict=True))


if __name__ == "__main__":
    main()
