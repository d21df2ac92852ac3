"""RMSNorm, computed in fp32 and cast back (as transformers and DeepSeek's reference do)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype == torch.float32 and self.weight.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused kernel, same numbers
        # x * rsqrt(mean(x^2) + eps) in fp32, rounded to x's dtype, then the weight: the fused kernel
        # gives bitwise the numbers of the five-op form (bf16 latents under autocast take this path)
        h = F.rms_norm(x.float(), self.weight.shape, None, self.eps)
        return self.weight * h.to(x.dtype)
