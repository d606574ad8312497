"""GPTQ cost: our sequential GPTQ pass vs ONNX Runtime's GPTQ (``matmul_nbits_quantizer``), side by side.

Both quantize the same model with the same calibration windows (cut from a text file with the model's
tokenizer), the same group size, symmetry, damping and act-order setting, 4 bits, LM head left in
float. Each method runs in its own subprocess, so its peak memory (RSS high-water mark, ru_maxrss) is
its own; the table shows wall time, peak RSS, peak RSS over the fp32 model size, and our speed-up.

ORT's GPTQ runs the whole model once per distinct GEMM input and calibration batch (no sequential
reuse), so on an LLM it takes hours at 128 windows; ``--ort-windows`` runs it (and our pass again) on
fewer windows for the side-by-side ratio, while ``--windows`` sets our full-size run.

    python benchmarks/bench_gptq.py MODEL.onnx [--tokenizer tokenizer.json] [--text FILE]
        [--windows 128] [--ort-windows 8] [--seq-len 512] [--group-size 128] [--no-act-order]
        [--threads 2] [--out results.md]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_TEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "austen_all.txt"


def _rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _windows(args) -> np.ndarray:  # noqa: F821 - numpy imported in the worker
    from qcompiler.tokenization import text_windows

    return text_windows(args.text, args.tokenizer, args.seq_len, max_windows=args.n)


def _lm_head_names(model) -> set[str]:
    outputs = {o.name for o in model.graph.output}
    return {n.name for n in model.graph.node if n.op_type in ("MatMul", "Gemm") and set(n.output) & outputs}


def worker_ours(args) -> dict:
    from qcompiler.calibration import iterate_feeds
    from qcompiler.config import GPTQConfig, WeightLowering
    from qcompiler.graph import export_graph, import_graph, load_model
    from qcompiler.pass_manager import PassContext
    from qcompiler.passes.gptq import GPTQ

    ids = _windows(args)
    model = load_model(args.model)
    graph = import_graph(model)
    loaded = _rss_mb()
    start = time.perf_counter()
    config = GPTQConfig(bits=4, group_size=args.group_size, symmetric=True, act_order=args.act_order,
                        damp=0.01, block_size=128, lowering=WeightLowering.MATMUL_NBITS)
    result = GPTQ(config).run(graph, PassContext(calibration_feeds=iterate_feeds({"input_ids": ids}, batch=1)))
    graph.cleanup().toposort()
    seconds = time.perf_counter() - start
    if args.save:
        from qcompiler.graph import save_model

        save_model(export_graph(graph), args.save)
    return {"seconds": seconds, "peak_mb": _peak_mb(), "loaded_mb": loaded, "gemms": len(result.details),
            "summary": result.summary}


def ort_gptq(model, windows, *, group_size: int, act_order: bool):
    """ONNX Runtime's GPTQ (what ``MatMulNBitsQuantizer`` with ``GPTQWeightOnlyQuantConfig`` runs) on the
    token ``windows`` [n, seq], 4-bit symmetric, damp 0.01, block 128, LM head left in float; returns
    (quantized ModelProto, number of GEMMs it quantized). ``model`` is consumed."""
    from onnxruntime.quantization.neural_compressor import gptq_quantize

    def dataloader():
        for row in windows:
            yield {"input_ids": row[None, :].astype("int64")}, None

    # The LM head is marked "fp32": ORT's GPTQ path ignores nodes_to_exclude.
    head = _lm_head_names(model)
    initializers = {t.name for t in model.graph.initializer}
    weight_config = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) > 1 and node.input[1] in initializers:
            weight_config[node.name] = "fp32" if node.name in head else {
                "bits": 4, "group_size": group_size, "scheme": "sym"}
    quantized = gptq_quantize(model=model, dataloader=dataloader(), weight_config=weight_config, percdamp=0.01,
                              blocksize=128, actorder=act_order, mse=False, perchannel=True, n_samples=-1,
                              accuracy_level=4)
    return quantized.model, sum(1 for v in weight_config.values() if v != "fp32")


def worker_ort(args) -> dict:
    import onnx

    ids = _windows(args)
    model = onnx.load(args.model)
    loaded = _rss_mb()
    start = time.perf_counter()
    _, gemms = ort_gptq(model, ids, group_size=args.group_size, act_order=args.act_order)
    seconds = time.perf_counter() - start
    return {"seconds": seconds, "peak_mb": _peak_mb(), "loaded_mb": loaded, "gemms": gemms, "summary": ""}


def _run_worker(kind: str, args, n: int) -> dict:
    cmd = [sys.executable, __file__, args.model, "--worker", kind, "--n", str(n), "--tokenizer", str(args.tokenizer),
           "--text", str(args.text), "--seq-len", str(args.seq_len), "--group-size", str(args.group_size)]
    if not args.act_order:
        cmd.append("--no-act-order")
    env = dict(os.environ)
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{kind} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[len("RESULT "):])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("model")
    ap.add_argument("--tokenizer", default=None, help="tokenizer.json (default: beside the model)")
    ap.add_argument("--text", default=str(DEFAULT_TEXT))
    ap.add_argument("--windows", type=int, default=128)
    ap.add_argument("--ort-windows", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--no-act-order", dest="act_order", action="store_false")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--skip-ort", action="store_true")
    ap.add_argument("--out", default=None)
    ap.add_argument("--save", default=None, help="(worker) write our quantized model here")
    ap.add_argument("--worker", choices=["ours", "ort"], default=None, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.tokenizer = args.tokenizer or str(Path(args.model).with_name("tokenizer.json"))
    if args.worker:
        args.n = args.n or args.windows
        result = (worker_ours if args.worker == "ours" else worker_ort)(args)
        print("\nRESULT " + json.dumps(result))  # ORT's GPTQ draws a progress bar on stdout without newlines
        return 0

    import onnx

    model = onnx.load(args.model, load_external_data=True)
    fp32_mb = sum(t.ByteSize() for t in model.graph.initializer) / 2**20
    del model
    runs = [("ours", args.windows)]
    if not args.skip_ort:
        if args.ort_windows != args.windows:
            runs.append(("ours", args.ort_windows))
        runs.append(("ort", args.ort_windows))
    lines = [f"# GPTQ cost: {Path(args.model).name} (fp32 weights {fp32_mb:.0f} MiB), {args.seq_len}-token windows, "
             f"g{args.group_size} sym, act-order {'on' if args.act_order else 'off'}, "
             f"{os.cpu_count()} CPUs", "",
             "| method | windows | GEMMs | wall s | s / window | peak RSS MiB | peak / fp32 size |",
             "|---|---|---|---|---|---|---|"]
    print("\n".join(lines), flush=True)
    results = {}
    for kind, n in runs:
        r = _run_worker(kind, args, n)
        results[kind, n] = r
        name = "qcompiler GPTQ" if kind == "ours" else "ORT matmul_nbits_quantizer GPTQ"
        line = (f"| {name} | {n} | {r['gemms']} | {r['seconds']:.1f} | {r['seconds'] / n:.2f} | "
                f"{r['peak_mb']:.0f} | {r['peak_mb'] / fp32_mb:.2f}x |")
        lines.append(line)
        print(line, flush=True)
    for (kind, n), r in results.items():
        if r["summary"]:
            lines.append(f"- {kind} at {n} windows: {r['summary']}")
            print(lines[-1])
    if ("ort", args.ort_windows) in results:
        ratio = results["ort", args.ort_windows]["seconds"] / results["ours", args.ort_windows]["seconds"]
        lines += ["", f"speed-up over ORT GPTQ at {args.ort_windows} windows: {ratio:.1f}x"]
        print(lines[-1])
    if args.out:
        Path(args.out).write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
