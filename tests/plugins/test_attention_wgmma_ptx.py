"""The CUDA C++ wgmma attention kernel (flash_attention_wgmma.py) compiled on the CPU: NVRTC -> PTX -> Triton's
bundled ptxas for sm_90a. No GPU: test_attention_wgmma_gpu.py and test_aot_launch_gpu.py check results and the AOT
launch. Here: every tactic compiles for every code path with the parameters the plugin launches with, nothing
spills, the MMAs stay asynchronous, and the register hand-over between the warpgroups adds up: ``setmaxnreg.inc``
waits until the registers it asks for are free, so the kernel must start with exactly the count the consumer
figure was computed from, or the consumers wait forever.
"""

import re

import pytest

from qcompiler.plugins.flash_attention_wgmma import ATTN_WGMMA_TACTICS, AttnWgmmaConfig, kernel_source
from tests.plugins.cuda_kernels import assemble, check_register_handover, nvrtc_or_skip

# dtype, Hq, Hkv, causal, masking ("", "seqlens_k", "key_mask")
PATHS = [("float16", 32, 8, False, ""), ("bfloat16", 8, 8, True, "seqlens_k"), ("float16", 4, 1, True, ""),
         ("float16", 8, 2, True, "key_mask"), ("bfloat16", 4, 4, False, "key_mask")]


@pytest.mark.parametrize("tactic", list(ATTN_WGMMA_TACTICS))
@pytest.mark.parametrize("path", PATHS, ids=lambda p: "-".join(map(str, p)))
def test_every_tactic_compiles_without_spills(tactic, path, tmp_path):
    from qcompiler.plugins import aot

    nvrtc_or_skip()
    cfg = ATTN_WGMMA_TACTICS[tactic]
    dtype, hq, hkv, causal, masking = path
    kern = aot.build(aot.FlashAttentionPlugin(dtype, hq, hkv, cfg.D, causal, 0.0, masking == "seqlens_k", tactic,
                                              has_key_mask=masking == "key_mask"))
    assert re.search(r"^\.version 8\.0$", kern.ptx, re.M) and re.search(r"^\.target sm_90a$", kern.ptx, re.M)
    entry = re.search(r"\.entry\s+" + re.escape(kern.kernel_name) + r"\s*\((.*?)\)", kern.ptx, re.S)
    assert entry and entry.group(1).count(".param") == len(kern.params)
    assert [k for _, k, _ in kern.params] == ["in"] * (3 + bool(masking)) + ["i32", "i32", "out", "out"]
    assert kern.num_warps == 4 * (cfg.WG + 1) and kern.shared_mem == cfg.dynamic_shared_bytes <= 227 * 1024
    log, sass = assemble(kern.ptx, "sm_90a", tmp_path)
    assert "0 bytes spill stores" in log, log
    assert "serialized" not in log, log  # C7513-C7515: ptxas waiting after every wgmma
    check_register_handover(log, sass, kern.num_warps)
    # The QK^T MMAs of a block and the PV MMAs of the one before are issued back to back, and only then waited for.
    seq = [("pv" if ".tnspB" in ln else "qk") if "HGMMA" in ln else "wait"
           for ln in sass.splitlines() if "HGMMA" in ln or "WARPGROUP.DEPBAR" in ln]
    assert any(seq[i:i + 2] == ["qk", "pv"] for i in range(len(seq))), "S and PV MMAs not issued together"


def test_configs_refuse_what_cannot_run():
    with pytest.raises(ValueError, match="shared memory"):
        AttnWgmmaConfig(128, 2, 128, 4)
    with pytest.raises(ValueError, match="D in"):
        AttnWgmmaConfig(96, 2, 128, 2)
    with pytest.raises(ValueError, match="scale"):
        kernel_source(ATTN_WGMMA_TACTICS["wgmma_d64"], "float16", 4, 4, False, -1.0, False)
    with pytest.raises(ValueError, match="multiple"):
        kernel_source(ATTN_WGMMA_TACTICS["wgmma_d64"], "float16", 6, 4, False, 0.0, False)
