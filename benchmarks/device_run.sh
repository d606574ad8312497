#!/bin/bash
# One device call: environment facts, GPU tests, then the benchmark tables. Tables go to $OUT/*.md, every
# script's stderr to $OUT/log.txt (the device tool returns at most 8 files).
# Usage (on the GPU machine, repo root): bash benchmarks/device_run.sh [tests|sweep|full]
set -u
MODE=${1:-full}
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
LOG=$OUT/log.txt
export PYTHONUNBUFFERED=1
# qcompiler.plugins / qcompiler.passes map to ./plugins, ./passes (pyproject package-dir): install editable.
[ -d .whl ] && python3 -m pip install -q --no-index --no-deps .whl/*.whl >>$LOG 2>&1
python3 -m pip install -q --no-deps --no-build-isolation -e . >>$LOG 2>&1 || { echo "editable install failed"; tail $LOG; }
{ nvidia-smi --query-gpu=name,clocks.sm,clocks.mem,memory.used --format=csv
  python3 -c "import torch, triton, cupy; print('torch', torch.__version__, 'triton', triton.__version__, 'cupy', cupy.__version__, torch.cuda.get_device_name())"
  nvcc --version | tail -1; } 2>&1 | tee $OUT/env.txt
# SM clock every second for the whole call (a throttled clock would skew the ratios).
nvidia-smi --query-gpu=timestamp,clocks.sm,power.draw,temperature.gpu --format=csv,noheader -l 1 >$OUT/clocks.txt 2>&1 &
SMI=$!
tests() {
  timeout ${TEST_TIMEOUT:-240} python3 -m pytest -q -n 8 -m "gpu" tests/plugins 2>&1 | tail -30 | tee $OUT/pytest.txt
}
case $MODE in
  tests)
    tests
    ;;
  sweep)
    # Candidates beyond the tactic tables (gpu_notes.md says why each is there), then the tests and a
    # hardware-counter look at the small-M INT4 kernels.
    timeout 200 python3 benchmarks/bench_int4_gemm.py --sweep --jobs 16 --passes 1 --ms ${INT4_MS:-1,16} \
      --shapes ${INT4_SHAPES:-11008:4096,4096:11008,4096:4096} --out $OUT/int4_sweep.md 2>>$LOG | tail -12
    timeout 90 python3 benchmarks/bench_w8a8_gemm.py --sweep --ms 1024 --out $OUT/w8a8_sweep.md 2>>$LOG
    timeout 110 python3 benchmarks/bench_attention.py --sweep --seqs 2048,8192 --dims 128 --out $OUT/attn_sweep.md 2>>$LOG
    TEST_TIMEOUT=130 tests
    timeout 50 ncu --clock-control none -k regex:int4_gemm --metrics gpu__time_duration.sum,dram__bytes_read.sum,\
lts__t_bytes.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed,lts__throughput.avg.pct_of_peak_sustained_elapsed,\
smsp__issue_active.avg.pct_of_peak_sustained_active,sm__warps_active.avg.pct_of_peak_sustained_active \
      --csv python3 benchmarks/bench_int4_gemm.py --profile-once --ms 1,16 --shapes 11008:4096 >$OUT/ncu.txt 2>>$LOG
    ;;
  full)
    tests
    python3 benchmarks/bench_int4_gemm.py --jobs 16 --out $OUT/int4.md 2>>$LOG
    python3 benchmarks/bench_w8a8_gemm.py --out $OUT/w8a8.md 2>>$LOG
    python3 benchmarks/bench_attention.py --out $OUT/attn.md 2>>$LOG
    ;;
esac
kill $SMI 2>/dev/null
