"""Flash attention forward vs SDPA's FlashAttention-2, cuDNN and memory-efficient backends (fp16).

s in {512, 2048, 8192, 16384}, d in {64, 128}, causal and not; B*s = 16384 tokens, H*d = 2048. Prints
µs and TFLOPS (4*B*H*s*s*d, halved when causal) per backend and our ratio to each. "ours" is the fastest
of the plugin's tactics for the head dim (what TensorRT's autotuner keeps): the Triton kernel's and the
CUDA C++ wgmma kernel's; "triton" is the Triton kernel alone (the kernel before the wgmma one).

    python benchmarks/bench_attention.py [--seqs 2048,8192] [--dims 128] [--sweep] [--key-mask] [--decode]
                                         [--skip-dense] [--out results.md]

``--key-mask`` adds a table for padded batches: the kernel with a key_mask (every batch entry left-padded
by a random share of up to half its length, as an attention_mask holds it) against itself without one, and
against SDPA's memory-efficient and cuDNN backends given the same padding as a [B, 1, 1, s] boolean mask
(the FlashAttention-2 backend takes no mask); and the kernel with a key_mask that has holes (10% of the keys
dropped at random: no single run of kept keys, so every key block reads the mask). Each column is the fastest
of the plugin's tactics for the head dim (Triton and wgmma), as TensorRT's autotuner would keep.

``--decode`` adds a table for one-token decode steps over a KV cache of s keys (Sq = 1, 32 query heads over
8 KV heads, batch 1, 16 and 64 up to 2^20 cached tokens), every call timed as a CUDA-graph replay: the fastest of every tactic (the cluster
decode kernel's included) in µs, the K/V
bytes read per µs (TB/s), SDPA's backends given the same GQA tensors (``enable_gqa=True``; a backend that
refuses them has no figure), the fastest of the prefill tactics alone (what the plugin had before
flash_decode.py), and every tactic's fastest with a key_mask that left-pads every entry by half its keys.
"""

# ruff: noqa: B023  (each lambda is timed inside the iteration that defines it)
from __future__ import annotations

import argparse
import itertools
import sys

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from qcompiler.plugins.flash_attention import AttnConfig, flash_attention, pick_attn_config
from qcompiler.plugins.flash_attention_wgmma import ATTN_WGMMA_TACTICS, AttnWgmmaConfig
from qcompiler.plugins.flash_decode import ATTN_DECODE_TACTICS, AttnDecodeConfig
from qcompiler.plugins.flash_decode import supports as supports_decode

SEQS = [512, 2048, 8192, 16384]
DIMS = [64, 128]
BACKENDS = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
            "efficient": SDPBackend.EFFICIENT_ATTENTION}
SWEEP = [AttnConfig(128, 64, 8, 3), AttnConfig(128, 128, 8, 3), AttnConfig(128, 64, 4, 3),
         AttnConfig(64, 64, 4, 3), AttnConfig(128, 128, 8, 2), AttnConfig(128, 64, 8, 4), AttnConfig(128, 32, 4, 3),
         AttnConfig(128, 64, 8, 2), AttnConfig(64, 128, 4, 2), AttnConfig(64, 64, 4, 2),
         AttnWgmmaConfig(128, 2, 128, 3), AttnWgmmaConfig(128, 2, 176, 2), AttnWgmmaConfig(128, 2, 64, 2),
         AttnWgmmaConfig(128, 1, 128, 2),
         AttnWgmmaConfig(64, 2, 128, 2), AttnWgmmaConfig(64, 2, 192, 2), AttnWgmmaConfig(64, 2, 64, 4),
         AttnWgmmaConfig(64, 2, 128, 4)]


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e3


def graph_bench(fn):
    """Median µs of a CUDA-graph replay of fn: a decode step's kernel runs for less time than a Python launch
    takes, so timed launch by launch the figure would be the launcher's."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return bench(graph.replay)


def sdpa_times(backends, run, timer=bench) -> dict[str, float]:
    """µs of ``run`` (an SDPA call) under each named backend; NaN where the backend refuses it."""
    times = {}
    for name in backends:
        try:
            with sdpa_kernel([BACKENDS[name]]):
                times[name] = timer(run)
        except RuntimeError as err:
            print(f"  {name} unavailable: {str(err).splitlines()[0][:80]}", file=sys.stderr)
            times[name] = float("nan")
    return times


def _desc(cfg):
    if isinstance(cfg, (AttnWgmmaConfig, AttnDecodeConfig)):
        return cfg.describe()
    return f"{cfg.BLOCK_M}x{cfg.BLOCK_N} w{cfg.num_warps} s{cfg.num_stages}"


def _fits(cfg, d: int) -> bool:
    return not isinstance(cfg, AttnWgmmaConfig) or cfg.D == d


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--seqs", default=",".join(map(str, SEQS)))
    ap.add_argument("--dims", default=",".join(map(str, DIMS)))
    ap.add_argument("--sweep", action="store_true")
    ap.add_argument("--key-mask", action="store_true")
    ap.add_argument("--decode", action="store_true")
    ap.add_argument("--skip-dense", action="store_true", help="leave out the first table (dense prefill)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    head = "| d | s | causal | ours µs | ours TFLOPS | " + " | ".join(f"{n} TFLOPS" for n in BACKENDS) + " | " + \
        " | ".join(f"vs {n}" for n in BACKENDS) + " | tactic | triton TFLOPS | vs triton |"
    lines = [f"# Attention forward (fp16) vs SDPA backends on {torch.cuda.get_device_name()}", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    print("\n".join(lines), flush=True)
    detail = ["", "## Every timed tactic", "", "| d | s | causal | config | µs | TFLOPS |", "|---|---|---|---|---|---|"]
    for d, s, causal in itertools.product([int(x) for x in args.dims.split(",")],
                                          [] if args.skip_dense else [int(x) for x in args.seqs.split(",")], (False, True)):
        B, H = max(1, 16384 // s), 2048 // d
        q, k, v = (torch.randn(B, H, s, d, device="cuda", dtype=torch.float16) for _ in range(3))
        flops = 4 * B * H * s * s * d / (2 if causal else 1)
        times = sdpa_times(BACKENDS, lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal))
        triton_cfg = pick_attn_config(d, s)
        candidates = [triton_cfg] + [c for c in ATTN_WGMMA_TACTICS.values() if c.D == d]
        if args.sweep:
            candidates += [c for c in SWEEP if _fits(c, d) and c not in candidates]
        best, t_triton = None, float("nan")
        for cfg in candidates:
            try:
                t = bench(lambda: flash_attention(q, k, v, causal=causal, config=cfg))
            except Exception as err:
                print(f"  skip {cfg}: {type(err).__name__}: {str(err)[:100]}", file=sys.stderr)
                continue
            detail.append(f"| {d} | {s} | {int(causal)} | {_desc(cfg)} | {t:.0f} | {flops / t / 1e6:.0f} |")
            if cfg == triton_cfg:
                t_triton = t
            if best is None or t < best[0]:
                best = (t, cfg)
        t, cfg = best
        row = (f"| {d} | {s} | {int(causal)} | {t:.0f} | {flops / t / 1e6:.0f} | "
               + " | ".join(f"{flops / times[n] / 1e6:.0f}" for n in BACKENDS) + " | "
               + " | ".join(f"{times[n] / t:.2f}x" for n in BACKENDS)
               + f" | {_desc(cfg)} | {flops / t_triton / 1e6:.0f} | {t_triton / t:.2f}x |")
        lines.append(row)
        print(row, flush=True)
    if args.key_mask:
        lines += key_mask_table([int(x) for x in args.dims.split(",")], [int(x) for x in args.seqs.split(",")])
    if args.decode:
        lines += decode_table([int(x) for x in args.dims.split(",")], [int(x) for x in args.seqs.split(",")])
    if args.out:
        with open(args.out, "w") as f:
            f.write("\n".join(lines + detail) + "\n")


def key_mask_table(dims: list[int], seqs: list[int]) -> list[str]:
    """Padded batches: ours with key_mask vs ours dense, and vs SDPA's masked backends (µs, one run)."""
    masked = ("efficient", "cudnn")
    head = ("| d | s | causal | dense µs | key_mask µs | key_mask / dense | "
            + " | ".join(f"{n} (mask) µs" for n in masked) + " | " + " | ".join(f"vs {n}" for n in masked)
            + " | holes µs | holes / dense | tactics (dense, key_mask, holes) |")
    lines = ["", "## Padded batches (key_mask)", "", head, "|" + "---|" * (head.count("|") - 1)]
    print("\n".join(lines), flush=True)
    for d, s, causal in itertools.product(dims, seqs, (False, True)):
        B, H = max(1, 16384 // s), 2048 // d
        q, k, v = (torch.randn(B, H, s, d, device="cuda", dtype=torch.float16) for _ in range(3))
        pads = torch.randint(0, s // 2 + 1, (B, 1), device="cuda")
        keep = (torch.arange(s, device="cuda")[None] >= pads).int()
        holes = (torch.rand(B, s, device="cuda") > 0.1).int()
        tactics = [pick_attn_config(d, s)] + [c for c in ATTN_WGMMA_TACTICS.values() if c.D == d]

        def fastest(mask):
            return min((bench(lambda: flash_attention(q, k, v, causal=causal, key_mask=mask, config=c)), _desc(c))
                       for c in tactics)
        (dense, dense_cfg), (ours, ours_cfg), (holey, holes_cfg) = fastest(None), fastest(keep), fastest(holes)
        mask = keep.bool()[:, None, None, :]
        if causal:
            mask = mask & torch.ones(s, s, dtype=torch.bool, device="cuda").tril()
        times = sdpa_times(masked, lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask))
        row = (f"| {d} | {s} | {int(causal)} | {dense:.0f} | {ours:.0f} | {ours / dense:.2f}x | "
               + " | ".join(f"{times[n]:.0f}" for n in masked) + " | "
               + " | ".join(f"{times[n] / ours:.2f}x" for n in masked) + f" | {holey:.0f} | {holey / dense:.2f}x | "
               f"{dense_cfg}, {ours_cfg}, {holes_cfg} |")
        lines.append(row)
        print(row, flush=True)
    return lines


def decode_table(dims: list[int], seqs: list[int]) -> list[str]:
    """One-token decode steps over a cache of s keys: ours vs SDPA's backends (µs, K/V TB/s, one run)."""
    hq, hkv = 32, 8
    head = ("| d | keys | batch | ours µs | ours K/V TB/s | " + " | ".join(f"{n} µs" for n in BACKENDS) + " | "
            + " | ".join(f"vs {n}" for n in BACKENDS) + " | tactic | prefill kernels µs | vs prefill kernels |"
            + " half left-padded (key_mask) µs | / dense |")
    lines = ["", f"## Decode steps (1 query, {hq} query heads over {hkv} KV heads)", "", head,
             "|" + "---|" * (head.count("|") - 1)]
    print("\n".join(lines), flush=True)
    for d, s, batch in itertools.product(dims, seqs, (1, 16, 64)):
        if batch * s > 1 << 20:
            continue
        q = torch.randn(batch, hq, 1, d, device="cuda", dtype=torch.float16)
        k, v = (torch.randn(batch, hkv, s, d, device="cuda", dtype=torch.float16) for _ in range(2))
        kv_bytes = 2 * k.numel() * k.element_size()
        prefill = [pick_attn_config(d, s)] + [c for c in ATTN_WGMMA_TACTICS.values() if c.D == d]
        decode = [c for c in ATTN_DECODE_TACTICS.values() if supports_decode(c, d, 0.0, hq // hkv)]
        (pre, pre_cfg), (ours, cfg) = (min((graph_bench(lambda: flash_attention(q, k, v, causal=True, config=c)), _desc(c))
                                           for c in tactics) for tactics in (prefill, prefill + decode))
        half = (torch.arange(s, device="cuda") >= s // 2).int().expand(batch, s).contiguous()  # left-padded by half
        padded, _ = min((graph_bench(lambda: flash_attention(q, k, v, causal=True, key_mask=half, config=c)), _desc(c))
                        for c in prefill + decode)
        times = sdpa_times(BACKENDS, lambda: torch.nn.functional.scaled_dot_product_attention(q, k, v, enable_gqa=True),
                           graph_bench)
        row = (f"| {d} | {s} | {batch} | {ours:.1f} | {kv_bytes / ours / 1e6:.2f} | "
               + " | ".join(f"{times[n]:.1f}" for n in BACKENDS) + " | "
               + " | ".join(f"{times[n] / ours:.2f}x" for n in BACKENDS) + f" | {cfg} | {pre:.1f} ({pre_cfg}) | {pre / ours:.2f}x |"
               + f" {padded:.1f} | {padded / ours:.2f}x |")
        lines.append(row)
        print(row, flush=True)
    return lines


if __name__ == "__main__":
    main()
