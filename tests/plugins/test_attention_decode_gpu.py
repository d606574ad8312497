"""The cluster decode attention kernel (flash_decode.py) on the GPU (``pytest -m gpu``, sm_90): every tactic plus
other cluster sizes, dtypes, masks and GQA groups, on decode steps, chunks and awkward key counts, through the torch
wrapper (which launches the plugin's own PTX through CuPy), against the fp32 reference, with the error bar of the
other attention kernels' tests (2x the same-precision torch baseline + 1e-3)."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("cupy")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or
                                                  torch.cuda.get_device_capability() != (9, 0),
                                                  reason="needs an sm_90 GPU (thread-block clusters)")]

from qcompiler.plugins.flash_attention import flash_attention  # noqa: E402
from qcompiler.plugins.flash_decode import ATTN_DECODE_TACTICS, AttnDecodeConfig, supports  # noqa: E402
from tests.plugins.cuda_kernels import check_attention_tactic  # noqa: E402

# + clusters of 4, 3 stages at d128, two queries per CTA
CONFIGS = list(ATTN_DECODE_TACTICS.values()) + [AttnDecodeConfig(64, 4, 2), AttnDecodeConfig(128, 4, 3),
                                                AttnDecodeConfig(128, 8, 2, QT=2)]
# B, Hq, Hkv, Sq, Sk: a decode step over a ragged cache (Llama-3 heads); over fewer keys than the cluster has CTAs;
# over one key; MQA with a GQA group of 16; a chunk of 5 queries (more rows than one CTA takes at QT=1); more
# queries than keys (causal rows that see nothing)
SHAPES = [(2, 32, 8, 1, 4097), (3, 9, 3, 1, 77), (2, 4, 4, 1, 1), (1, 16, 1, 1, 1025), (2, 8, 2, 5, 300),
          (2, 6, 3, 9, 5)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe().replace(" ", "-"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("masking", ["", "seqlens_k", "key_mask"], ids=["dense", "padded", "key_mask"])
def test_attention_decode_matches_reference(cfg, dtype, causal, masking):
    # a CTA takes at most 16 rows (query heads per KV head x QT), within the shared memory there is for them
    check_attention_tactic(cfg, dtype, causal, masking, [shape for shape in SHAPES if supports(cfg, cfg.D, 0.0, shape[1] // shape[2])])


def test_attention_decode_refusals():
    q = torch.randn(1, 32, 1, 64, device="cuda", dtype=torch.float16)
    k = torch.randn(1, 1, 10, 64, device="cuda", dtype=torch.float16)
    with pytest.raises(ValueError, match="at most 16 query rows"):  # a GQA group of 32 is more rows than a CTA takes
        flash_attention(q, k, k, config=ATTN_DECODE_TACTICS["decode_d64"])
    with pytest.raises(ValueError, match="head dim 128"):
        flash_attention(q, k, k, config=ATTN_DECODE_TACTICS["decode_d128"])
