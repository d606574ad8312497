"""What the tests of the hand-written CUDA C++ kernels share: the CPU toolchain (NVRTC, Triton's bundled ptxas and
cuobjdump), the relative error, the attention kernels' key masks and GPU check against the fp32 reference, and the
INT4 kernels' GPU checks against the fp32 reference."""

import os
import re
import subprocess

import pytest


def nvrtc_or_skip() -> None:
    from qcompiler.plugins.nvrtc import NvrtcError, nvrtc_version

    try:
        nvrtc_version()
    except NvrtcError as err:
        pytest.skip(f"NVRTC not installed ({err}); pip install 'nvidia-cuda-nvrtc==13.0.*'")


def ptxas_or_skip() -> str:
    """Path of Triton's bundled ptxas; skips the test without NVRTC or that ptxas."""
    nvrtc_or_skip()
    triton = pytest.importorskip("triton")
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(path):
        pytest.skip("Triton's bundled ptxas not found")
    return path


def assemble(ptx: str, arch: str, tmp_path) -> tuple[str, str]:
    """(ptxas -v log, SASS) of the PTX for ``arch``; asserts that ptxas succeeded."""
    ptxas = ptxas_or_skip()
    (tmp_path / "k.ptx").write_text(ptx)
    res = subprocess.run([ptxas, f"-arch={arch}", "-v", str(tmp_path / "k.ptx"), "-o", str(tmp_path / "k.cubin")],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-2000:]
    sass = subprocess.run([os.path.join(os.path.dirname(ptxas), "cuobjdump"), "-sass", str(tmp_path / "k.cubin")],
                          capture_output=True, text=True).stdout
    return res.stderr, sass


def check_register_handover(log: str, sass: str, num_warps: int) -> None:
    """A warp-specialised kernel (``setmaxnreg`` once down in the producer, once up in the consumers) must start with
    exactly the launch allocation ``cuda_source.consumer_registers`` assumes, or ``setmaxnreg.inc`` waits forever."""
    used = int(re.search(r"Used (\d+) registers", log).group(1))
    assert used == min(255, 65536 // (32 * num_warps)) // 8 * 8, log
    assert sass.count("USETMAXREG.TRY_ALLOC") == 1 and sass.count("USETMAXREG.DEALLOC") == 1


def rel(a, b) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def check_against_reference(cfg, case, ms) -> None:
    """Runs ``cfg`` through the torch wrapper for every M in ``ms`` on the weight ``case`` = (dtype, N, K,
    block_size, symmetric, bias) and asserts an error within 1.5x (+1e-4) of the same-precision torch
    baseline's (weights dequantized to fp16/bf16, cuBLAS): these kernels round the weight once, like it."""
    import torch

    from qcompiler.plugins.int4_gemm import int4_gemm, int4_gemm_reference
    from qcompiler.plugins.ops import pack_int4_matmulnbits

    dtype, N, K, block, sym, has_bias = case
    torch.manual_seed(N + K + block)
    b, s, z = pack_int4_matmulnbits(torch.randn(N, K, device="cuda") * 0.05, block, symmetric=sym, scale_dtype=dtype)
    bias = torch.randn(N, device="cuda", dtype=dtype) if has_bias else None
    for M in ms:
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        y = int4_gemm(x, b, s, z, bias, block_size=block, config=cfg)
        torch.cuda.synchronize()
        ref = int4_gemm_reference(x, b, s, z, bias)
        base = int4_gemm_reference(x, b, s, z, bias, compute_dtype=dtype)
        assert torch.isfinite(y).all(), M
        err, berr = rel(y, ref), rel(base, ref)
        assert err <= 1.5 * berr + 1e-4, (M, err, berr)


def check_padding_nibbles_ignored(cfg, M: int) -> None:
    """K padded to the group: whatever the padding nibbles hold, x is zero there and they add nothing."""
    import torch

    from qcompiler.plugins.int4_gemm import int4_gemm, int4_gemm_reference
    from qcompiler.plugins.ops import pack_int4_matmulnbits

    N, K, block = 128, 1000, 64  # 1024 packed: the last 24 k are padding
    torch.manual_seed(3)
    b, s, z = pack_int4_matmulnbits(torch.randn(N, K, device="cuda") * 0.05, block, symmetric=True,
                                    scale_dtype=torch.float16)
    x = torch.randn(M, K, device="cuda", dtype=torch.float16)
    clean = int4_gemm(x, b, s, z, block_size=block, config=cfg)
    noisy_b = b.clone()
    noisy_b.view(N, -1)[:, K // 2:] = 0xF0  # q = 0 / 15 in the padding: far from the zero point 8
    noisy = int4_gemm(x, noisy_b, s, z, block_size=block, config=cfg)
    assert torch.equal(clean, noisy)
    assert rel(clean, int4_gemm_reference(x, b, s, z)) < 2e-3


KEY_PADDINGS = ("left", "right", "holes", "none kept", "all kept")


def key_padding(batch: int, keys: int, first: int = 0):
    """An int32 CUDA key mask [batch, keys] whose rows take the KEY_PADDINGS in turn from ``first``: a third of the
    keys (at least one) padded on the left or the right (one run of kept keys: the kernels' key-range path), 30% random
    holes (their per-block mask path), no key kept (O = 0 and LSE = -inf), every key kept."""
    import torch

    pad = max(1, keys // 3)
    position = torch.arange(keys, device="cuda")
    holes = torch.rand(batch, keys, device="cuda") > 0.3
    rows = []
    for b in range(batch):
        kind = KEY_PADDINGS[(b + first) % len(KEY_PADDINGS)]
        rows.append({"left": position >= pad, "right": position < keys - pad, "holes": holes[b],
                     "none kept": torch.zeros_like(holes[b]), "all kept": torch.ones_like(holes[b])}[kind])
    return torch.stack(rows).int()


def check_attention_tactic(cfg, dtype, causal: bool, masking: str, shapes) -> None:
    """``flash_attention(..., config=cfg)`` against the fp32 reference on each (B, Hq, Hkv, Sq, Sk) of ``shapes``, with
    the error bar of the Triton kernel's tests (2x the same-precision torch baseline + 1e-3). ``masking`` "key_mask" takes
    every kind of padding over the shapes; "seqlens_k" fills the keys past each batch entry's length with NaN, which must
    never reach the product. Rows that see no key must be 0 with LSE -inf."""
    import torch

    from qcompiler.plugins.flash_attention import flash_attention, flash_attention_reference

    for B, HQ, HKV, SQ, SK in shapes:
        torch.manual_seed(SQ + SK + cfg.D)
        q = torch.randn(B, HQ, SQ, cfg.D, device="cuda", dtype=dtype)
        k = torch.randn(B, HKV, SK, cfg.D, device="cuda", dtype=dtype)
        v = torch.randn(B, HKV, SK, cfg.D, device="cuda", dtype=dtype)
        lens = keep = None
        if masking == "key_mask":
            keep = key_padding(B, SK, first=SQ + SK)
        if masking == "seqlens_k":
            lens = torch.randint(0, SK + 1, (B,), device="cuda", dtype=torch.int32)
            lens[0] = SK // 2
            for b in range(B):
                k[b, :, int(lens[b]):] = float("nan")
                v[b, :, int(lens[b]):] = float("nan")
        o, lse = flash_attention(q, k, v, causal=causal, seqlens_k=lens, key_mask=keep, config=cfg)
        ro, rlse = flash_attention_reference(q.float(), k.float().nan_to_num(), v.float().nan_to_num(), causal=causal,
                                             seqlens_k=lens, key_mask=keep)
        base = flash_attention_reference(q, k.nan_to_num(), v.nan_to_num(), causal=causal, seqlens_k=lens,
                                         key_mask=keep, dtype=dtype)[0]
        rows = torch.isfinite(rlse)
        shape = (B, HQ, HKV, SQ, SK)
        assert torch.equal(torch.isfinite(lse), rows), shape
        assert not torch.isnan(o).any(), shape
        if rows.any():
            err, berr = rel(o[rows], ro[rows]), rel(base[rows], ro[rows])
            assert err <= 2 * berr + 1e-3, (shape, err, berr)
            assert torch.allclose(lse[rows], rlse[rows], atol=2e-2 if dtype == torch.bfloat16 else 5e-3), shape
        assert (o.float()[~rows] == 0).all(), shape  # rows that see no key: zero output
