"""Training cost: what training a config would cost (estimation) and what a run has cost (accounting).

    from nanoseek.cost import estimate, format_cost_table, PUBLISHED
    est = estimate(ModelConfig.preset("deepseek-v3"), 14.8e12, gpu="h800", n_gpus=2048)
    print(format_cost_table(est, published=PUBLISHED["deepseek-v3"]))   # beside DeepSeek-V3's figures

    meter = CostMeter(config, "runs/x/cost.json", device="cpu")        # in a trainer
    meter.update(tokens, wall_seconds)                                  # writes cost.json atomically

estimation.py: the device table, FLOPs per token (the counting convention is in its docstring),
published figures, estimates and their Markdown table (a CPU's peak: nanoseek.precision's cached
matmul probe, re-exported here).
accounting.py: RunCost and CostMeter (cost.json), built on estimation; estimation never imports it.
"""

from .accounting import CostMeter, RunCost, flops_convention
from ..precision import CACHE_ENV, PROBE_FILE, cache_dir, cpu_model, measure_matmul_peak, probe_key
from .estimation import (DEEPSEEK_V3, DEEPSEEK_V3_TOTAL_USD, DEFAULT_MFU, DEFAULT_SEQ_LEN, DEFAULT_USD_PER_HOUR, GPUS,
                         PUBLISHED, SECONDS_PER_HOUR, CostEstimate, Device, FlopsPerToken, PublishedCost,
                         attention_flops_per_token, deepseek_llm_flops_per_token, device_peak, estimate,
                         flops_per_token, format_cost_table, gpu_key_for_name, implied_mfu, lookup_gpu, six_nd)

__all__ = ["Device", "GPUS", "lookup_gpu", "gpu_key_for_name", "device_peak", "FlopsPerToken", "flops_per_token",
           "attention_flops_per_token", "six_nd", "deepseek_llm_flops_per_token", "PublishedCost", "DEEPSEEK_V3",
           "DEEPSEEK_V3_TOTAL_USD", "PUBLISHED", "implied_mfu", "DEFAULT_MFU", "CostEstimate", "estimate",
           "format_cost_table", "measure_matmul_peak", "probe_key", "cache_dir", "cpu_model", "RunCost",
           "flops_convention", "CostMeter", "DEFAULT_SEQ_LEN", "DEFAULT_USD_PER_HOUR", "CACHE_ENV", "PROBE_FILE",
           "SECONDS_PER_HOUR"]
