"""Pure math: smoothing factors, int8/weight quantization, GPTQ, packing (no graph code)."""
