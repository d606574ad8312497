"""The CUDA C++ wgmma attention kernel on the GPU (``pytest -m gpu``, sm_90): every tactic, dtype, mask and batch
form on awkward shapes through the torch wrapper (which launches the plugin's own PTX through CuPy), against the
fp32 reference, with the error bar of the Triton kernel's tests (2x the same-precision torch baseline + 1e-3)."""

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("cupy")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available() or
                                                  torch.cuda.get_device_capability() != (9, 0),
                                                  reason="needs an sm_90 GPU (wgmma)")]

from qcompiler.plugins.flash_attention import flash_attention, flash_attention_reference  # noqa: E402
from qcompiler.plugins.flash_attention_wgmma import ATTN_WGMMA_TACTICS, AttnWgmmaConfig  # noqa: E402
from tests.plugins.cuda_kernels import check_attention_tactic, rel  # noqa: E402

# + one consumer warpgroup (no ping-pong, no register hand-over), 192-key blocks, 3 consumer warpgroups, 64-key blocks,
# FA3's 176-key blocks (not a multiple of 64).
CONFIGS = list(ATTN_WGMMA_TACTICS.values()) + [AttnWgmmaConfig(64, 1, 192, 3), AttnWgmmaConfig(128, 1, 64, 3),
                                               AttnWgmmaConfig(64, 3, 128, 3), AttnWgmmaConfig(128, 2, 64, 4),
                                               AttnWgmmaConfig(128, 2, 176, 2)]
# B, Hq, Hkv, Sq, Sk: a ragged single block; two blocks of queries over 9 key blocks with MQA; one query (decode)
# over a ragged key tail; more queries than keys (causal rows that see nothing); a handful of each.
SHAPES = [(2, 4, 4, 97, 97), (1, 4, 1, 1025, 1025), (2, 8, 2, 1, 300), (2, 6, 3, 200, 77), (3, 2, 2, 3, 5)]


@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: c.describe().replace(" ", "-"))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=["f16", "bf16"])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("masking", ["", "seqlens_k", "key_mask"], ids=["dense", "padded", "key_mask"])
def test_attention_wgmma_matches_reference(cfg, dtype, causal, masking):
    check_attention_tactic(cfg, dtype, causal, masking, SHAPES)


def test_attention_wgmma_scale_and_refusals():
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 4, 130, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    o, _ = flash_attention(q, k, v, scale=0.3, config=ATTN_WGMMA_TACTICS["wgmma_d64"])
    ro, _ = flash_attention_reference(q, k, v, scale=0.3)
    assert rel(o, ro) < 5e-3
    with pytest.raises(ValueError, match="contiguous"):
        flash_attention(q.transpose(1, 2).contiguous().transpose(1, 2), k, v, config=ATTN_WGMMA_TACTICS["wgmma_d64"])
    with pytest.raises(ValueError, match="head dim 128"):
        flash_attention(q, k, v, config=ATTN_WGMMA_TACTICS["wgmma_d128"])


def test_default_at_d128_is_the_wgmma_kernel():
    from qcompiler.plugins.flash_attention import pick_attn_config

    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 4, 300, 128, device="cuda", dtype=torch.float16) for _ in range(3))
    default, _ = flash_attention(q, k, v, causal=True)
    wgmma, _ = flash_attention(q, k, v, causal=True, config=ATTN_WGMMA_TACTICS["wgmma_d128"])
    triton, _ = flash_attention(q, k, v, causal=True, config=pick_attn_config(128, 300))
    assert torch.equal(default, wgmma) and not torch.equal(default, triton)
