#!/bin/bash
# One device call: environment facts, GPU tests, then the benchmark tables. Logs go to $OUT.
# Usage (on the GPU machine, repo root): bash benchmarks/device_run.sh [quick|sweep|full]
set -u
MODE=${1:-full}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# qcompiler.plugins / qcompiler.passes map to ./plugins, ./passes (pyproject package-dir): install editable.
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps .whl/*.whl >$OUT/whl.txt 2>&1
python3 -m pip install -q --no-deps --no-build-isolation -e . >$OUT/pip.txt 2>&1 || { echo "editable install failed"; cat $OUT/pip.txt; }
{ nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv
  python3 -c "import torch, triton, cupy; print('torch', torch.__version__, 'triton', triton.__version__, 'cupy', cupy.__version__, torch.cuda.get_device_name())"
  nvcc --version | tail -1; } 2>&1 | tee $OUT/env.txt
case $MODE in
  sweep)
    timeout 300 python3 -m pytest -q -m "gpu" tests/plugins 2>&1 | tail -40 | tee $OUT/pytest.txt
    python3 benchmarks/bench_int4_gemm.py --sweep --ms ${INT4_MS:-1,16,256,4096} --out $OUT/int4_sweep.md 2>$OUT/int4_sweep.err
    [ -n "${ONLY_INT4:-}" ] && exit 0
    python3 benchmarks/bench_w8a8_gemm.py --sweep --ms 1024,4096 --out $OUT/w8a8_sweep.md 2>$OUT/w8a8_sweep.err
    python3 benchmarks/bench_attention.py --sweep --seqs 2048,8192 --dims 128 --out $OUT/attn_sweep.md 2>$OUT/attn_sweep.err
    ;;
  tests)
    python3 -m pytest -q -x -m "gpu" tests/plugins 2>&1 | tail -30 | tee $OUT/pytest.txt
    ;;
  full)
    python3 -m pytest -q -m "gpu" tests/plugins 2>&1 | tail -30 | tee $OUT/pytest.txt
    python3 benchmarks/bench_int4_gemm.py --out $OUT/int4.md 2>$OUT/int4.err
    python3 benchmarks/bench_w8a8_gemm.py --out $OUT/w8a8.md 2>$OUT/w8a8.err
    python3 benchmarks/bench_attention.py --out $OUT/attn.md 2>$OUT/attn.err
    [ -n "${EXTRA_SWEEP:-}" ] && python3 benchmarks/bench_int4_gemm.py --sweep --ms 1 --shapes 11008:4096,4096:11008 --out $OUT/int4_m1_sweep.md 2>$OUT/int4_m1_sweep.err
    ;;
esac
