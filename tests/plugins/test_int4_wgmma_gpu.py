"""The CUDA C++ wgmma INT4 kernel on the GPU (``pytest -m gpu``, sm_90): every tactic and code path on awkward
shapes through the torch wrapper (which launches the plugin's own PTX through CuPy), against the fp32 reference.

Accuracy bar as for the mma kernel: within 1.5x (+1e-4) of the same-precision torch baseline (weights
dequantized to fp16/bf16, cuBLAS): both round the weight once, then accumulate in fp32.
"""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("cupy")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or
                                                  torch.cuda.get_device_capability() != (9, 0),
                                                  reason="needs an sm_90 GPU (wgmma)")]

from qcompiler.plugins.int4_gemm_wgmma import INT4_WGMMA_TACTICS, Int4WgmmaConfig, supports  # noqa: E402

CONFIGS = list(INT4_WGMMA_TACTICS.values()) + [Int4WgmmaConfig(1, 64, 3), Int4WgmmaConfig(2, 192, 3)]
# dtype, N, K, block_size, symmetric, bias: ragged K with 2 groups per K step and zero points; an N that is not a
# multiple of 8 (scalar stores); per-channel; K not a multiple of 64 (odd step count); a padded last group; one K step.
CASES = [(torch.float16, 300, 1000, 32, False, True), (torch.bfloat16, 333, 4096, 128, True, True),
         (torch.float16, 256, 11008, 128, True, False), (torch.bfloat16, 200, 4096, 4096, False, False),
         (torch.float16, 128, 520, 64, False, True), (torch.bfloat16, 136, 2056, 256, False, False),
         (torch.float16, 128, 64, 64, False, False)]


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe().replace(" ", "-").replace(",", ""))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{str(c[0])[6:]}-N{c[1]}-K{c[2]}-g{c[3]}-s{int(c[4])}-b{int(c[5])}")
def test_int4_wgmma_matches_reference(cfg, case):
    from qcompiler.plugins.int4_gemm import int4_gemm, int4_gemm_reference
    from qcompiler.plugins.ops import pack_int4_matmulnbits

    dtype, N, K, block, sym, has_bias = case
    if not supports(cfg, N, K, block):
        pytest.skip(f"{cfg.describe()} needs N >= {cfg.rows}")
    torch.manual_seed(N + K + block)
    b, s, z = pack_int4_matmulnbits(torch.randn(N, K, device="cuda") * 0.05, block, symmetric=sym, scale_dtype=dtype)
    bias = torch.randn(N, device="cuda", dtype=dtype) if has_bias else None
    for M in (1, 17, 100, 300, 515):
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        y = int4_gemm(x, b, s, z, bias, block_size=block, config=cfg)
        torch.cuda.synchronize()
        ref = int4_gemm_reference(x, b, s, z, bias)
        base = int4_gemm_reference(x, b, s, z, bias, compute_dtype=dtype)
        assert torch.isfinite(y).all(), M
        err, berr = rel(y, ref), rel(base, ref)
        assert err <= 1.5 * berr + 1e-4, (M, err, berr)


def test_int4_wgmma_ignores_padding_nibbles():
    """K padded to the group: whatever the padding nibbles hold, x is zero there and they add nothing."""
    from qcompiler.plugins.int4_gemm import int4_gemm, int4_gemm_reference
    from qcompiler.plugins.ops import pack_int4_matmulnbits

    N, K, block = 128, 1000, 64  # 1024 packed: the last 24 k are padding
    cfg = INT4_WGMMA_TACTICS["wgmma_64x128"]
    torch.manual_seed(3)
    b, s, z = pack_int4_matmulnbits(torch.randn(N, K, device="cuda") * 0.05, block, symmetric=True,
                                    scale_dtype=torch.float16)
    x = torch.randn(130, K, device="cuda", dtype=torch.float16)
    clean = int4_gemm(x, b, s, z, block_size=block, config=cfg)
    noisy_b = b.clone()
    noisy_b.view(N, -1)[:, K // 2:] = 0xF0  # q = 0 / 15 in the padding: far from the zero point 8
    noisy = int4_gemm(x, noisy_b, s, z, block_size=block, config=cfg)
    assert torch.equal(clean, noisy)
    assert rel(clean, int4_gemm_reference(x, b, s, z)) < 2e-3
