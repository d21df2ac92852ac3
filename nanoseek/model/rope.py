"""Rotary position embedding with YaRN, on DeepSeek's interleaved pair layout.

DeepSeek checkpoints rotate adjacent pairs (x0, x1), (x2, x3), ... (the complex form); we keep that layout,
so weights load as they are stored. transformers de-interleaves on the fly; the dot products are the same.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from ..config import ModelConfig, yarn_mscale


def rope_frequencies(config: ModelConfig) -> tuple[torch.Tensor, float]:
    """Inverse frequencies (qk_rope_head_dim / 2,) and the cos/sin amplitude (YaRN's attention factor).

    YaRN (Peng et al. 2023): high-frequency dims extrapolate, low-frequency dims interpolate by `factor`,
    with a linear ramp between the dims that complete beta_fast and beta_slow rotations over the
    original context. Matches transformers' `_compute_yarn_parameters` with truncation.
    """
    dim, base = config.qk_rope_head_dim, config.rope_theta
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    inv_freq = 1.0 / (base ** exponents)
    y = config.yarn
    if y is None:
        return inv_freq, 1.0
    factor, original = y["factor"], y["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

    low = max(math.floor(correction_dim(y["beta_fast"])), 0)
    high = min(math.ceil(correction_dim(y["beta_slow"])), dim - 1)
    if low == high:
        high += 0.001  # avoid a zero-width ramp
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    extrapolate = 1 - ramp  # 1 for fast-rotating dims, kept as they are
    inv_freq = inv_freq / factor * ramp + inv_freq * extrapolate
    if y["mscale"] and y["mscale_all_dim"]:
        amplitude = yarn_mscale(factor, y["mscale"]) / yarn_mscale(factor, y["mscale_all_dim"])
    else:
        amplitude = yarn_mscale(factor)
    return inv_freq, float(amplitude)


class RotaryEmbedding(nn.Module):
    """Produces the rotation e^{i * position * inv_freq} * amplitude as complex64 (..., T, rope_dim / 2)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        inv_freq, amplitude = rope_frequencies(config)
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        self.amplitude = amplitude

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        angles = positions.to(torch.float32)[..., None] * self.inv_freq.float()  # (..., T, rope_dim/2)
        return torch.polar(torch.full_like(angles, self.amplitude), angles)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x0, x1), (x2, x3), ... of the last dim as complex numbers.

    x: (..., T, d); freqs: complex, broadcastable to (..., T, d/2). Computed in fp32.
    """
    pairs = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(pairs * freqs).flatten(-2).to(x.dtype)
