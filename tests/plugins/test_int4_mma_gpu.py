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
from tests.plugins.cuda_kernels import check_against_reference, check_padding_nibbles_ignored  # noqa: E402

CONFIGS = list(INT4_MMA_TACTICS.values()) + [Int4MmaConfig(4, 1), Int4MmaConfig(1, 4, L2_256B=False), Int4MmaConfig(8, 2),
                                             Int4MmaConfig(2, 8, WN=2, DEPTH=3), Int4MmaConfig(4, 4, WN=4, DEPTH=4),
                                             Int4MmaConfig(1, 16, WN=4, DEPTH=3), Int4MmaConfig(4, 4, SWAP=True),
                                             Int4MmaConfig(2, 8, WN=2, DEPTH=3, SWAP=True), Int4MmaConfig(8, 2, SWAP=True)]
# dtype, N, K, block_size, symmetric, bias (see test_int4_mma_ptx.py for the code path each one takes)
CASES = [(torch.float16, 300, 1000, 32, False, True), (torch.bfloat16, 333, 4096, 128, True, True),
         (torch.float16, 256, 11008, 128, True, False), (torch.bfloat16, 200, 4096, 4096, False, False),
         (torch.float16, 64, 520, 64, False, True), (torch.float16, 96, 2048, 256, False, False)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe().replace(" ", "-"))
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{str(c[0])[6:]}-N{c[1]}-K{c[2]}-g{c[3]}-s{int(c[4])}-b{int(c[5])}")
def test_int4_mma_matches_reference(cfg, case):
    if not supports(cfg, *case[1:4]):
        pytest.skip(f"{cfg.describe()} needs N >= {cfg.rows}")
    check_against_reference(cfg, case, (1, 3, 16, 17, 40))


def test_int4_mma_ignores_padding_nibbles():
    check_padding_nibbles_ignored(Int4MmaConfig(4, 8), 5)


@pytest.mark.parametrize("tactic", list(INT4_MMA_TACTICS))
@pytest.mark.parametrize("M", [1, 9])  # one row of CTAs, second token half at 9
def test_programmatic_chain_equals_plain_launches(tactic, M):
    """Eight calls, each reading the one before's output, in one CUDA graph. Launched programmatically a call may
    start while the one before still runs, so a kernel reading x before griddepcontrol.wait would read memory its
    producer has not written yet (the kernel without its wait failed this on the H100, gpu_notes session 17)."""
    from qcompiler.plugins.int4_gemm import int4_gemm
    from qcompiler.plugins.ops import pack_int4_matmulnbits

    torch.manual_seed(M)
    N = K = 4096
    b, s, _ = pack_int4_matmulnbits(torch.randn(N, K, device="cuda") * 0.02, 128, scale_dtype=torch.float16)
    x0 = torch.randn(M, K, device="cuda", dtype=torch.float16)

    def chain(programmatic: bool) -> torch.Tensor:
        def run():
            y = x0
            for _ in range(8):
                y = int4_gemm(y, b, s, block_size=128, config=INT4_MMA_TACTICS[tactic], programmatic_launch=programmatic)
            return y

        run()  # loads the module outside the capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            y = run()  # each output in fresh graph memory, so a read before its producer ends finds no result
        graph.replay()
        torch.cuda.synchronize()
        return y.clone()

    plain, programmatic = chain(False), chain(True)
    assert plain.abs().max() > 1  # eight products of a random weight, far from what a stale read would give
    assert torch.equal(plain, programmatic)
