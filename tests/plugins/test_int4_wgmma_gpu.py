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
from tests.plugins.cuda_kernels import check_against_reference, check_padding_nibbles_ignored  # noqa: E402

# + the warp-specialised form (a producer warpgroup) with one and two multiplying warpgroups, along N or
# along K.
CONFIGS = list(INT4_WGMMA_TACTICS.values()) + [Int4WgmmaConfig(1, 64, 3), Int4WgmmaConfig(2, 192, 3),
                                               Int4WgmmaConfig(2, 256, 4, True), Int4WgmmaConfig(1, 128, 4, True),
                                               Int4WgmmaConfig(1, 64, 3, True), Int4WgmmaConfig(2, 128, 5, True),
                                               Int4WgmmaConfig(1, 64, 4, True, KS=2), Int4WgmmaConfig(1, 256, 4, True, KS=2),
                                               Int4WgmmaConfig(1, 128, 5, True, KS=3), Int4WgmmaConfig(1, 64, 6, True, KS=4)]
# dtype, N, K, block_size, symmetric, bias: ragged K with 2 groups per K step and zero points; an N that is not a
# multiple of 8 (scalar stores); per-channel; K not a multiple of 64 (odd step count); a padded last group; one K step.
CASES = [(torch.float16, 300, 1000, 32, False, True), (torch.bfloat16, 333, 4096, 128, True, True),
         (torch.float16, 256, 11008, 128, True, False), (torch.bfloat16, 200, 4096, 4096, False, False),
         (torch.float16, 128, 520, 64, False, True), (torch.bfloat16, 136, 2056, 256, False, False),
         (torch.float16, 128, 64, 64, False, False)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe().replace(" ", "-").replace(",", ""))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{str(c[0])[6:]}-N{c[1]}-K{c[2]}-g{c[3]}-s{int(c[4])}-b{int(c[5])}")
def test_int4_wgmma_matches_reference(cfg, case):
    if not supports(cfg, *case[1:4]):
        pytest.skip(f"{cfg.describe()} needs N >= {cfg.rows}")
    check_against_reference(cfg, case, (1, 17, 100, 300, 515))


def test_int4_wgmma_ignores_padding_nibbles():
    check_padding_nibbles_ignored(INT4_WGMMA_TACTICS["wgmma_64x128"], 130)
