"""The MLA latent cache: per token and layer only the compressed KV latent and the shared rope key.

That is kv_lora_rank + qk_rope_head_dim values per token per layer (576 for DeepSeek-V3) instead of
num_heads * (qk_head_dim + v_head_dim) for a per-head K/V cache (40,960 for DeepSeek-V3).
Buffers are preallocated for `max_len` tokens and written in place: no reallocation per decode step.
"""

from __future__ import annotations

import torch

from ..config import ModelConfig


class LatentCache:
    """kv: (n_layers, B, max_len, kv_lora_rank + qk_rope_head_dim): per slot the normalised latent
    followed by the rotated rope key, one contiguous row so decode scores are a single matmul.

    `length` slots are filled for every batch row; `valid` marks padding slots (False) of left-padded
    batches. Layers 0..L-1 are the main blocks; MTP blocks follow.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_len: int, *, with_mtp: bool = True,
                 device=None, dtype=torch.float32):
        n_layers = config.num_hidden_layers + (config.num_nextn_predict_layers if with_mtp else 0)
        self.kv_lora_rank = config.kv_lora_rank
        self.kv = torch.zeros(n_layers, batch_size, max_len, config.kv_lora_rank + config.qk_rope_head_dim,
                              device=device, dtype=dtype)
        self.valid = torch.ones(batch_size, max_len, device=device, dtype=torch.bool)
        self.padded = False
        self.length = 0
        self.max_len = max_len

    @property
    def latent(self) -> torch.Tensor:
        return self.kv[..., : self.kv_lora_rank]

    @property
    def rope_key(self) -> torch.Tensor:
        return self.kv[..., self.kv_lora_rank:]

    @property
    def batch_size(self) -> int:
        return self.kv.shape[1]

    def write(self, layer: int, start: int, latent: torch.Tensor, rope_key: torch.Tensor) -> torch.Tensor:
        """Store (B, T, r) / (B, T, d_rope) in slots start..start+T; return the filled rows (B, S, r + d_rope)."""
        end = start + latent.shape[1]
        if end > self.max_len:
            raise ValueError(f"LatentCache overflow: {end} tokens exceed max_len={self.max_len}")
        rows = self.kv[layer, :, start:end]
        rows[..., : self.kv_lora_rank] = latent
        rows[..., self.kv_lora_rank:] = rope_key
        return self.kv[layer, :, :end]

    def mark(self, start: int, attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
        """Record which of slots start..start+length hold real tokens (attention_mask (B, T): 1 real,
        0 padding). Returns the key-validity mask (B, start+length) or None if nothing is padding."""
        end = start + length
        if attention_mask is not None:
            self.valid[:, start:end] = attention_mask.bool()
            self.padded = self.padded or not bool(attention_mask.all())
        else:
            self.valid[:, start:end] = True
        return self.valid[:, :end] if self.padded else None

    def bytes_per_token(self) -> int:
        return self.kv.shape[0] * self.kv.shape[-1] * self.kv.element_size()
