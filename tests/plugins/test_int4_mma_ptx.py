"""The CUDA C++ INT4 kernel (int4_gemm_mma.py) compiled on the CPU: NVRTC -> PTX -> Triton's bundled ptxas for
sm_90. No GPU: the GPU tests (test_int4_mma_gpu.py, test_aot_launch_gpu.py) check results and the AOT launch.
Here: every tactic compiles for every code path (fp16/bf16, even / ragged K, scale in the weight / after the
MMA, zero points, bias), the PTX declares the parameters the plugin launches with, the lowered PTX ISA stamp
assembles, and the SASS has no spills and no barrier inside the K loop (the point of the design).
"""

import re

import pytest

from qcompiler.plugins.int4_gemm_mma import INT4_MMA_TACTICS, Int4MmaConfig, kernel_source, supports
from tests.plugins.cuda_kernels import assemble, nvrtc_or_skip, ptxas_or_skip

# dtype, N, K, block_size, zero points, bias: even K with the scale after the MMA, ragged K (padded last group,
# partial last span) with the scale in the weight, per-channel, and an odd group count with zero points.
PATHS = [("float16", 4096, 4096, 128, False, False), ("bfloat16", 300, 1000, 32, True, True),
         ("float16", 200, 4096, 4096, True, False), ("bfloat16", 96, 520, 64, True, False)]


def _build(tactic, path):
    from qcompiler.plugins import aot

    return aot.build(aot.Int4GemmPlugin(*path, tactic=tactic))


@pytest.mark.parametrize("tactic", list(INT4_MMA_TACTICS))
@pytest.mark.parametrize("path", PATHS, ids=lambda p: "-".join(map(str, p)))
def test_every_tactic_compiles_without_spills_or_loop_barriers(tactic, path, tmp_path):
    ptxas_or_skip()
    cfg = INT4_MMA_TACTICS[tactic]
    if not supports(cfg, path[1], path[2], path[3]):
        pytest.skip(f"{tactic} needs N >= {cfg.rows}")
    kern = _build(tactic, path)
    assert re.search(r"^\.version 7\.8$", kern.ptx, re.M)
    assert "mma.sync.aligned.m16n8k16.row.col.f32" in kern.ptx
    assert "ld.global.nc.L1::no_allocate" in kern.ptx
    entry = re.search(r"\.entry\s+" + re.escape(kern.kernel_name) + r"\s*\((.*?)\)", kern.ptx, re.S)
    assert entry and entry.group(1).count(".param") == len(kern.params)
    assert [k for _, k, _ in kern.params] == ["in"] * (3 + path[4] + path[5]) + ["i32", "out"]
    # Declared PDL-safe, so it must wait for the grids before it ahead of its first load or store.
    assert kern.programmatic
    wait = kern.ptx.index("griddepcontrol.wait")
    assert kern.ptx.index("griddepcontrol.launch_dependents") < wait
    assert wait < min(kern.ptx.index(op) for op in ("ld.global", "st.global"))
    log, sass = assemble(kern.ptx, "sm_90", tmp_path)
    assert "0 bytes spill stores" in log, log
    # Shared memory and the CTA barrier appear once, in the cross-warp reduction after the K loop.
    assert sass.count("HMMA.16816.F32") >= 8 * cfg.NT
    assert sass.count("BAR.SYNC") == (1 if cfg.WARPS > 1 else 0)
    first_hmma, first_bar = sass.index("HMMA.16816"), sass.find("BAR.SYNC")
    assert first_bar == -1 or first_bar > sass.rindex("HMMA.16816") > first_hmma


def test_plugin_tactics_offer_the_mma_kernel_only_where_it_applies():
    from qcompiler.plugins import aot

    assert set(INT4_MMA_TACTICS) <= set(aot.tactics(aot.Int4GemmPlugin("float16", 4096, 4096, 128)))
    assert not set(INT4_MMA_TACTICS) & set(aot.tactics(aot.Int4GemmPlugin("float16", 4096, 4096, 16)))  # g16
    assert not set(INT4_MMA_TACTICS) & set(aot.tactics(aot.Int4GemmPlugin("float16", 4096, 777, 784)))  # K % 8
    small_n = aot.tactics(aot.Int4GemmPlugin("float16", 24, 4096, 128))  # fewer rows than most tactics' CTA
    assert [n for n in small_n if n in INT4_MMA_TACTICS] == [n for n, c in INT4_MMA_TACTICS.items() if c.rows <= 24]


def test_tensorrt_tactic_ids_cover_the_mma_tactics():
    """TensorRT tactic ids index one fixed table; every tactic aot offers for a weight must be in it."""
    from qcompiler.plugins import aot
    from qcompiler.plugins.tensorrt_plugins import TACTIC_NAMES

    names = TACTIC_NAMES("Int4Gemm")
    assert len(set(names)) == len(names) and set(INT4_MMA_TACTICS) <= set(names)
    for shape in ((4096, 4096, 128), (300, 1000, 32), (4096, 777, 784)):
        assert set(aot.tactics(aot.Int4GemmPlugin("float16", *shape, True, True))) <= set(names)


def test_refusals():
    with pytest.raises(ValueError, match="block_size % 32"):
        kernel_source(Int4MmaConfig(4, 8), "float16", 256, 4096, 16, False, False)
    with pytest.raises(ValueError, match="N >= 64"):
        kernel_source(Int4MmaConfig(8, 8), "float16", 48, 4096, 128, False, False)
    with pytest.raises(ValueError, match="float16/bfloat16"):
        kernel_source(Int4MmaConfig(4, 8), "float32", 256, 4096, 128, False, False)
    with pytest.raises(ValueError, match="NT in"):
        Int4MmaConfig(3, 8)
    with pytest.raises(ValueError, match="NT must be even"):
        Int4MmaConfig(1, 8, SWAP=True)
    with pytest.raises(ValueError, match="shared memory"):
        Int4MmaConfig(8, 16)


def test_programmatic_launch_is_refused_for_kernels_that_do_not_wait():
    from qcompiler.plugins.aot import AotKernel, Expr
    from qcompiler.plugins.launch import launch

    plain = AotKernel("plain_kernel", ".version 7.8", 4, 0, (), (Expr(1), Expr(1), Expr(1)))
    with pytest.raises(ValueError, match="plain_kernel: reads its inputs without griddepcontrol.wait"):
        launch(plain, {}, {}, programmatic=True)


def test_torch_wrapper_refuses_a_programmatic_launch_of_other_kernels():
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from qcompiler.plugins.int4_gemm import INT4_TACTICS, int4_gemm
    from qcompiler.plugins.int4_gemm_wgmma import INT4_WGMMA_TACTICS

    x = torch.zeros(1, 4096, dtype=torch.float16)
    b = torch.zeros(256, 32, 64, dtype=torch.uint8)
    s = torch.ones(256, 32, dtype=torch.float16)
    with pytest.raises(ValueError, match=r"programmatic_launch needs a CUDA C\+\+ plugin kernel"):
        int4_gemm(x, b, s, block_size=128, config=INT4_TACTICS["gemv"], programmatic_launch=True)
    nvrtc_or_skip()  # the wgmma kernel is compiled, then refused by its AotKernel before any launch
    with pytest.raises(ValueError, match="reads its inputs without griddepcontrol.wait"):
        int4_gemm(x, b, s, block_size=128, config=next(iter(INT4_WGMMA_TACTICS.values())), programmatic_launch=True)


def test_compile_error_carries_the_nvrtc_log():
    nvrtc_or_skip()
    from qcompiler.plugins.nvrtc import NvrtcError, compile_to_ptx

    with pytest.raises(NvrtcError, match="broken.cu: NVRTC failed: .*error"):
        compile_to_ptx('extern "C" __global__ void k() { undeclared_name = 1; }', "broken.cu")


def test_missing_nvrtc_is_a_clear_error(monkeypatch):
    from qcompiler.plugins import nvrtc

    monkeypatch.setattr(nvrtc, "_candidates", lambda: [])
    nvrtc._library.cache_clear()
    try:
        with pytest.raises(nvrtc.NvrtcError, match="NVRTC not found: pip install"):
            nvrtc.nvrtc_version()
    finally:
        nvrtc._library.cache_clear()


def test_torch_wrapper_refuses_a_weight_the_tactic_cannot_take():
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from qcompiler.plugins.int4_gemm import int4_gemm

    x = torch.zeros(1, 4096, dtype=torch.float16)
    b = torch.zeros(48, 32, 64, dtype=torch.uint8)  # N = 48 rows, g128: fewer rows than the tactic's CTA
    s = torch.ones(48, 32, dtype=torch.float16)
    with pytest.raises(ValueError, match="N >= 64"):
        int4_gemm(x, b, s, block_size=128, config=Int4MmaConfig(8, 8))


def test_pick_takes_the_mma_kernel_only_when_it_can_run(monkeypatch):
    pytest.importorskip("triton")
    from qcompiler.plugins import int4_gemm as mod

    monkeypatch.setattr(mod, "cuda_kernels_available", lambda: True)
    assert mod.pick_int4_config(1, 11008, 4096, 128) == INT4_MMA_TACTICS["mma_n32_w4_sw"]
    assert mod.pick_int4_config(16, 4096, 11008, 128) == INT4_MMA_TACTICS["mma_n32_w16_sw"]
    assert mod.pick_int4_config(16, 11008, 4096, 128) == INT4_MMA_TACTICS["mma_n32_w4_sw"]
    assert not isinstance(mod.pick_int4_config(16, 28672, 8192, 128), Int4MmaConfig)  # Triton won there
    assert mod.pick_int4_config(4, 28672, 8192, 128) == INT4_MMA_TACTICS["mma_n32_w16_sw"]
    assert not isinstance(mod.pick_int4_config(1, 4096, 4096, 16), Int4MmaConfig)  # g16: not supported
    monkeypatch.setattr(mod, "cuda_kernels_available", lambda: False)  # no NVRTC or no CuPy: the Triton tactics
    assert not isinstance(mod.pick_int4_config(1, 11008, 4096, 128), Int4MmaConfig)
