"""The cluster decode attention kernel (flash_decode.py) compiled on the CPU: NVRTC -> PTX -> Triton's bundled ptxas for
sm_90. No GPU: test_attention_decode_gpu.py and test_aot_launch_gpu.py check results and the AOT launch. Here: every
tactic compiles for every code path with the parameters the plugin launches with, the cluster shape is compiled into
the entry (so a plain launch, as TensorRT's, forms the clusters the merge relies on), and nothing spills.
"""

import re

import pytest

from qcompiler.plugins.flash_decode import ATTN_DECODE_TACTICS, AttnDecodeConfig, kernel_source, supports
from tests.plugins.cuda_kernels import assemble, nvrtc_or_skip

# dtype, Hq, Hkv, causal, masking ("", "seqlens_k", "key_mask")
PATHS = [("float16", 32, 8, True, ""), ("bfloat16", 8, 8, False, "seqlens_k"), ("float16", 16, 1, True, "key_mask"),
         ("bfloat16", 9, 3, True, "key_mask")]


@pytest.mark.parametrize("tactic", list(ATTN_DECODE_TACTICS))
@pytest.mark.parametrize("path", PATHS, ids=lambda p: "-".join(map(str, p)))
def test_every_tactic_compiles_without_spills(tactic, path, tmp_path):
    from qcompiler.plugins import aot

    nvrtc_or_skip()
    cfg = ATTN_DECODE_TACTICS[tactic]
    dtype, hq, hkv, causal, masking = path
    if not supports(cfg, cfg.D, 0.0, hq // hkv):
        pytest.skip(f"{cfg.describe()} does not take {hq // hkv} query heads per KV head")
    config = aot.FlashAttentionPlugin(dtype, hq, hkv, cfg.D, causal, 0.0, masking == "seqlens_k", tactic,
                                      has_key_mask=masking == "key_mask")
    assert tactic in aot.tactics(config)
    kern = aot.build(config)
    assert re.search(r"^\.target sm_90$", kern.ptx, re.M)
    entry = re.search(r"\.entry\s+" + re.escape(kern.kernel_name) + r"\s*\((.*?)\)\s*(.*?)\{", kern.ptx, re.S)
    assert entry and entry.group(1).count(".param") == len(kern.params)
    assert re.search(rf"\.reqnctapercluster\s+{cfg.CLUSTER}, 1, 1", entry.group(2)), entry.group(2)
    assert [k for _, k, _ in kern.params] == ["in"] * (3 + bool(masking)) + ["i32", "i32", "out", "out"]
    grid = [int(g.evaluate({"B": 3, "SQ": 1})) for g in kern.grid]
    assert grid == [cfg.CLUSTER, 1, 3 * hkv]  # clusters along x: every CTA of one shares a KV head
    assert kern.shared_mem == cfg.dynamic_shared_bytes(hq // hkv) <= 227 * 1024
    log, _ = assemble(kern.ptx, "sm_90", tmp_path)
    assert "0 bytes spill stores" in log, log


def test_configs_refuse_what_cannot_run():
    with pytest.raises(ValueError, match="CLUSTER in"):
        AttnDecodeConfig(128, 16)  # beyond the portable cluster size: a plain launch could not form it
    with pytest.raises(ValueError, match="at most 16 rows"):
        kernel_source(ATTN_DECODE_TACTICS["decode_d64"], "float16", 32, 1, False, 0.0, False)
    with pytest.raises(ValueError, match="scale"):
        kernel_source(ATTN_DECODE_TACTICS["decode_d64"], "float16", 4, 4, False, -1.0, False)
    with pytest.raises(ValueError, match="exclude"):
        kernel_source(ATTN_DECODE_TACTICS["decode_d64"], "float16", 4, 4, False, 0.0, True, True)


def test_tensorrt_tactic_ids_cover_every_attention_tactic():
    """TensorRT tactic ids index one fixed table per attention plugin; every tactic aot offers must be in it."""
    from qcompiler.plugins import aot
    from qcompiler.plugins.ops import MASKED_ATTENTION_PLUGINS
    from qcompiler.plugins.tensorrt_plugins import TACTIC_NAMES

    for op_type in ("FlashAttention", *MASKED_ATTENTION_PLUGINS.values()):
        names = TACTIC_NAMES(op_type)
        assert len(set(names)) == len(names) and set(ATTN_DECODE_TACTICS) <= set(names)
        for hq, hkv, d in ((32, 8, 128), (9, 3, 64), (8, 8, 64), (32, 1, 128)):
            assert set(aot.tactics(aot.FlashAttentionPlugin("float16", hq, hkv, d))) <= set(names), (op_type, hq, hkv, d)
