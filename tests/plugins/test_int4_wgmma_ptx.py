"""The CUDA C++ wgmma INT4 kernel (int4_gemm_wgmma.py) compiled on the CPU: NVRTC -> PTX -> Triton's bundled ptxas
for sm_90a. No GPU: test_int4_wgmma_gpu.py and test_aot_launch_gpu.py check results and the AOT launch. Here: every
tactic compiles for every code path, the PTX declares the parameters the plugin launches with, and the SASS keeps
the two properties the kernel's speed and correctness rest on, both of which ptxas broke in earlier versions of
the loop (session 7): the MMAs of a K step stay asynchronous (one wait for all MMAs, after the last one), and
nothing reads the accumulators before that wait.
"""

import re

import pytest

from qcompiler.plugins.int4_gemm_wgmma import INT4_WGMMA_TACTICS, Int4WgmmaConfig, kernel_source, supports
from tests.plugins.cuda_kernels import assemble, check_register_handover, ptxas_or_skip

# dtype, N, K, block_size, zero points, bias: even K (loop form), ragged K with two groups per K step, an N that is
# not a multiple of 8 (scalar stores) with a short unrolled K, per-channel.
PATHS = [("float16", 4096, 4096, 128, False, False), ("bfloat16", 300, 1000, 32, True, True),
         ("float16", 200, 520, 64, True, False), ("bfloat16", 256, 4096, 4096, False, True)]


@pytest.mark.parametrize("tactic", list(INT4_WGMMA_TACTICS))
@pytest.mark.parametrize("path", PATHS, ids=lambda p: "-".join(map(str, p)))
def test_every_tactic_compiles_with_asynchronous_mmas(tactic, path, tmp_path):
    from qcompiler.plugins import aot

    ptxas_or_skip()
    cfg = INT4_WGMMA_TACTICS[tactic]
    if not supports(cfg, *path[1:4]):
        pytest.skip(f"{tactic} needs N >= {cfg.rows}")
    kern = aot.build(aot.Int4GemmPlugin(*path, tactic=tactic))
    assert re.search(r"^\.version 8\.0$", kern.ptx, re.M) and re.search(r"^\.target sm_90a$", kern.ptx, re.M)
    entry = re.search(r"\.entry\s+" + re.escape(kern.kernel_name) + r"\s*\((.*?)\)", kern.ptx, re.S)
    assert entry and entry.group(1).count(".param") == len(kern.params)
    assert [k for _, k, _ in kern.params] == ["in"] * (3 + path[4] + path[5]) + ["i32", "out"]
    assert kern.num_warps == 4 * (cfg.WG * cfg.KS + cfg.WS) and kern.shared_mem == cfg.shared_bytes <= 227 * 1024
    assert not kern.programmatic and "griddepcontrol" not in kern.ptx  # plain launches only
    log, sass = assemble(kern.ptx, "sm_90a", tmp_path)
    assert "0 bytes spill stores" in log, log
    assert "serialized" not in log, log  # C7513-C7515: ptxas waiting after every wgmma
    hgmma = [m.start() for m in re.finditer(r"HGMMA\.64x\d+x16\.F32", sass)]
    assert len(hgmma) >= 4
    drains = [m.start() for m in re.finditer(r"WARPGROUP\.DEPBAR\.LE gsb0, 0x0", sass)]
    assert len(drains) == 1 and drains[0] > hgmma[-1], "a full MMA drain inside the K loop"
    assert "WARPGROUP.DEPBAR.LE gsb0, 0x1" in sass  # the previous step's MMAs retire while this step's run
    first_read = re.search(r"F2FP\.(BF16|F16)\.F32", sass)
    assert first_read and first_read.start() > drains[0], "accumulators read before the last MMAs retire"
    if cfg.WS and cfg.WG * cfg.KS > 1:
        check_register_handover(log, sass, kern.num_warps)


def test_plugin_tactics_offer_the_wgmma_kernel_only_where_it_applies():
    from qcompiler.plugins import aot
    from qcompiler.plugins.tensorrt_plugins import TACTIC_NAMES

    assert set(INT4_WGMMA_TACTICS) <= set(aot.tactics(aot.Int4GemmPlugin("float16", 4096, 4096, 128)))
    assert set(INT4_WGMMA_TACTICS) <= set(TACTIC_NAMES("Int4Gemm"))
    assert not set(INT4_WGMMA_TACTICS) & set(aot.tactics(aot.Int4GemmPlugin("float16", 4096, 4096, 16)))  # g16
    small_n = aot.tactics(aot.Int4GemmPlugin("float16", 100, 4096, 128))
    assert [n for n in small_n if n in INT4_WGMMA_TACTICS] == [n for n, c in INT4_WGMMA_TACTICS.items() if c.rows <= 100]


def test_refusals_are_one_line_errors():
    with pytest.raises(ValueError, match="N >= 128"):
        kernel_source(Int4WgmmaConfig(2, 128), "float16", 100, 4096, 128, False, False)
    with pytest.raises(ValueError, match="block_size % 32"):
        kernel_source(Int4WgmmaConfig(1, 128), "float16", 256, 4096, 16, False, False)
    with pytest.raises(ValueError, match="dtype"):
        kernel_source(Int4WgmmaConfig(1, 128), "float32", 256, 4096, 128, False, False)
    with pytest.raises(ValueError, match="shared memory"):
        Int4WgmmaConfig(2, 256, 8)
    with pytest.raises(ValueError, match="MT in"):
        Int4WgmmaConfig(1, 96)
    with pytest.raises(ValueError, match="KS > 1 needs WS"):
        Int4WgmmaConfig(1, 128, 6, KS=2)
    with pytest.raises(ValueError, match="KS > 1 needs WS"):
        Int4WgmmaConfig(1, 128, 6, WS=True, KS=4)  # 104 registers for 64 accumulators
    with pytest.raises(ValueError, match="KS > 1 needs WS"):
        Int4WgmmaConfig(1, 64, 4, WS=True, KS=3)  # too few stages


def test_pick_takes_the_wgmma_kernel_only_on_hopper_with_the_toolchain(monkeypatch):
    torch = pytest.importorskip("torch")
    pytest.importorskip("triton")
    from qcompiler.plugins import int4_gemm as mod

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(mod, "sm90a_kernels_available", lambda device: True)
    assert mod.pick_int4_config(256, 4096, 11008, 128) == INT4_WGMMA_TACTICS["wgmma_64x128_k2"]
    assert mod.pick_int4_config(256, 4096, 4096, 128) == INT4_WGMMA_TACTICS["wgmma_64x128_k2"]
    assert mod.pick_int4_config(256, 11008, 4096, 128) == INT4_WGMMA_TACTICS["wgmma_128x256"]
    assert mod.pick_int4_config(1024, 4096, 4096, 128) == INT4_WGMMA_TACTICS["wgmma_128x256"]
    assert not isinstance(mod.pick_int4_config(256, 4096, 4096, 16), Int4WgmmaConfig)  # g16: Triton
    assert not isinstance(mod.pick_int4_config(64, 4096, 4096, 128), Int4WgmmaConfig)  # Triton's m16_n64 won
    assert mod.pick_int4_config(64, 28672, 8192, 128) == INT4_WGMMA_TACTICS["wgmma_64x64"]
    assert not isinstance(mod.pick_int4_config(32, 28672, 8192, 128), Int4WgmmaConfig)
    assert not mod.takes_dequant_path(1024, 4096, 4096, 128) and not mod.takes_dequant_path(4096, 4096, 4096, 128)
    assert mod.takes_dequant_path(1024, 4096, 4096, 16)  # no wgmma for g16: the two-kernel path from 1024
    monkeypatch.setattr(mod, "sm90a_kernels_available", lambda device: False)  # not sm_90, or no NVRTC / CuPy
    assert not isinstance(mod.pick_int4_config(256, 11008, 4096, 128), Int4WgmmaConfig)
    assert mod.takes_dequant_path(1024, 4096, 4096, 128)
