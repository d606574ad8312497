"""The CUDA C++ INT4 kernel on the GPU (``pytest -m gpu``): every tactic and code path on awkward shapes, through
the torch wrapper (which launches the plugin's own PTX through CuPy), against the fp32 reference.

Accuracy bar: within 1.5x (+1e-4) of the same-precision torch baseline (weights dequantized to fp16/bf16,
cuBLAS): tighter than the Triton tactics' bar, since this kernel rounds no more than that baseline does.
"""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("cupy")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

from qcompiler.plugins.int4_gemm_mma import INT4_MMA_TACTICS, Int4MmaConfig, supports  # noqa: E402

CONFIGS = list(INT4_MMA_TACTICS.values()) + [Int4MmaConfig(4, 1), Int4MmaConfig(1, 4, L2_256B=False), Int4MmaConfig(8, 2),
                                             Int4MmaConfig(2, 8, WN=2, DEPTH=3), Int4MmaConfig(4, 4, WN=4, DEPTH=4),
                                             Int4MmaConfig(1, 16, WN=4, DEPTH=3)]
# dtype, N, K, block_size, symmetric, bias (see test_int4_mma_ptx.py for the code path each one takes)
CASES = [(torch.float16, 300, 1000, 32, False, True), (torch.bfloat16, 333, 4096, 128, True, True),
         (torch.float16, 256, 11008, 128, True, False), (torch.bfloat16, 200, 4096, 4096, False, False),
         (torch.float16, 64, 520, 64, False, True), (torch.float16, 96, 2048, 256, False, False)]


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe().replace(" ", "-"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{str(c[0])[6:]}-N{c[1]}-K{c[2]}-g{c[3]}-s{int(c[4])}-b{int(c[5])}")
def test_int4_mma_matches_reference(cfg, case):
    from qcompiler.plugins.int4_gemm import int4_gemm, int4_gemm_reference
    from qcompiler.plugins.ops import pack_int4_matmulnbits

    dtype, N, K, block, sym, has_bias = case
    if not supports(cfg, N, K, block):
        pytest.skip(f"{cfg.describe()} needs N >= {cfg.rows}")
    torch.manual_seed(N + K + block)
    b, s, z = pack_int4_matmulnbits(torch.randn(N, K, device="cuda") * 0.05, block, symmetric=sym, scale_dtype=dtype)
    bias = torch.randn(N, device="cuda", dtype=dtype) if has_bias else None
    for M in (1, 3, 16, 17, 40):
        x = torch.randn(M, K, device="cuda", dtype=dtype)
        y = int4_gemm(x, b, s, z, bias, block_size=block, config=cfg)
        torch.cuda.synchronize()
        ref = int4_gemm_reference(x, b, s, z, bias)
        base = int4_gemm_reference(x, b, s, z, bias, compute_dtype=dtype)
        assert torch.isfinite(y).all(), M
        err, berr = rel(y, ref), rel(base, ref)
        assert err <= 1.5 * berr + 1e-4, (M, err, berr)


def test_int4_mma_ignores_padding_nibbles():
    """K padded to the group: whatever the padding nibbles hold, x is zero there and they add nothing."""
    from qcompiler.plugins.int4_gemm import int4_gemm, int4_gemm_reference
    from qcompiler.plugins.ops import pack_int4_matmulnbits

    N, K, block = 128, 1000, 64  # 1024 packed: the last 24 k are padding
    torch.manual_seed(3)
    b, s, z = pack_int4_matmulnbits(torch.randn(N, K, device="cuda") * 0.05, block, symmetric=True,
                                    scale_dtype=torch.float16)
    x = torch.randn(5, K, device="cuda", dtype=torch.float16)
    clean = int4_gemm(x, b, s, z, block_size=block, config=Int4MmaConfig(4, 8))
    noisy_b = b.clone()
    noisy_b.view(N, -1)[:, K // 2:] = 0xF0  # q = 0 / 15 in the padding: far from the zero point 8
    noisy = int4_gemm(x, noisy_b, s, z, block_size=block, config=Int4MmaConfig(4, 8))
    assert torch.equal(clean, noisy)
    ref = int4_gemm_reference(x, b, s, z)
    assert rel(clean, ref) < 2e-3
