"""The swap-AB INT4 tactics compiled for sm_90 on the CPU (no GPU): their PTX must feed the dequantized weight
to wgmma from registers, so neither the async-proxy fence of the plain 2-D tile (dequantized tile stored to
shared memory for wgmma) nor a weight descriptor appears. The GPU tests (test_kernels_gpu.py,
test_aot_launch_gpu.py) check their results and their AOT launch.
"""

import re
from dataclasses import replace

import pytest

pytest.importorskip("torch")
pytest.importorskip("triton")


def _ptx(cfg, monkeypatch, dtype):
    from qcompiler.plugins import aot
    from qcompiler.plugins.int4_gemm import INT4_TACTICS

    monkeypatch.setitem(INT4_TACTICS, "_under_test", cfg)
    return aot.build(aot.Int4GemmPlugin(dtype, 512, 4096, 128, False, False, "_under_test")).ptx


def _a_operands(ptx):
    """wgmma's A operand per instruction: "{%r..}" (registers) or a 64-bit descriptor "%rd.." (shared memory)."""
    return re.findall(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k16\.f32\.(?:f16\.f16|bf16\.bf16)\s+\{[^}]*\},\s*(\S+)",
                      ptx)


def _swap_tactics():
    from qcompiler.plugins.int4_gemm import INT4_TACTICS

    return [name for name, cfg in INT4_TACTICS.items() if cfg.SWAP_AB]


@pytest.mark.parametrize("name", _swap_tactics())
@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_swap_ab_weight_operand_comes_from_registers(name, dtype, monkeypatch):
    from qcompiler.plugins.int4_gemm import INT4_TACTICS

    swap = _ptx(INT4_TACTICS[name], monkeypatch, dtype)
    plain = _ptx(replace(INT4_TACTICS[name], SWAP_AB=False), monkeypatch, dtype)
    assert _a_operands(swap) and all(a.startswith("{") for a in _a_operands(swap))
    assert _a_operands(plain) and all(a.startswith("%rd") for a in _a_operands(plain))
    assert "fence.proxy.async" in plain and "fence.proxy.async" not in swap
    assert "cp.async.cg.shared.global" in swap  # 16-byte asynchronous copies still feed shared memory


def test_swap_ab_config_rules():
    from qcompiler.plugins.int4_gemm import Int4GemmConfig

    with pytest.raises(ValueError, match="SWAP_AB"):
        Int4GemmConfig(128, 128, 64, 8, 4, SPLIT_X=True, SWAP_AB=True)
    with pytest.raises(ValueError, match="SWAP_AB"):
        Int4GemmConfig(16, 32, 512, 4, 3, KSPLIT=4, SWAP_AB=True)
    assert "swapab" in Int4GemmConfig(128, 128, 64, 8, 4, SWAP_AB=True).describe()
