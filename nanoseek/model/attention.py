"""Multi-head Latent Attention (DeepSeek-V2 Sec. 2.1).

Keys and values are compressed into one latent c_kv (kv_lora_rank) plus a shared decoupled rope key
k_pe (qk_rope_head_dim). Two paths compute the same function:

- full (training, prefill): up-project c_kv through kv_b_proj into per-head k_nope and v, then SDPA.
- absorbed (decode over the cache): fold kv_b_proj's key half into the query and its value half into
  the output, so attention runs directly against the cached latent; nothing per-head is materialised
  for past tokens (DeepSeek-V3 inference code, attn_impl="absorb").
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .cache import LatentCache
from .norm import RMSNorm
from .rope import apply_rope


class MLA(nn.Module):
    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.n_heads = config.num_attention_heads
        self.q_lora_rank = config.q_lora_rank
        self.kv_lora_rank = config.kv_lora_rank
        self.nope_dim = config.qk_nope_head_dim
        self.rope_dim = config.qk_rope_head_dim
        self.qk_dim = config.qk_head_dim
        self.v_dim = config.v_head_dim
        self.scale = config.softmax_scale
        bias = config.attention_bias
        D, H = config.hidden_size, self.n_heads
        if self.q_lora_rank is None:
            self.q_proj = nn.Linear(D, H * self.qk_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(D, self.q_lora_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_lora_rank, eps=1e-6)
            self.q_b_proj = nn.Linear(self.q_lora_rank, H * self.qk_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(D, self.kv_lora_rank + self.rope_dim, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.kv_lora_rank, eps=1e-6)
        self.kv_b_proj = nn.Linear(self.kv_lora_rank, H * (self.nope_dim + self.v_dim), bias=False)
        self.o_proj = nn.Linear(H * self.v_dim, D, bias=bias)

    def project_query(self, x: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, D) -> q_nope (B, T, H, nope), q_pe (B, T, H, rope) with RoPE applied."""
        B, T, _ = x.shape
        if self.q_lora_rank is None:
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q = q.view(B, T, self.n_heads, self.qk_dim)
        q_nope, q_pe = q.split([self.nope_dim, self.rope_dim], dim=-1)
        return q_nope, apply_rope(q_pe, freqs[:, :, None])

    def compress_kv(self, x: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x: (B, T, D) -> latent (B, T, kv_lora_rank) normalised, rope key (B, T, rope) rotated."""
        kv = self.kv_a_proj_with_mqa(x)
        latent, k_pe = kv.split([self.kv_lora_rank, self.rope_dim], dim=-1)
        return self.kv_a_layernorm(latent), apply_rope(k_pe, freqs)

    def forward(self, x: torch.Tensor, freqs: torch.Tensor, cache: LatentCache | None = None, start: int = 0,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """x: (B, T, D); freqs: complex (B or 1, T, rope/2) for these tokens' positions.

        With a cache, the tokens occupy cache slots start..start+T. mask: (B, T, S) bool, True where
        query t may attend key s (S = T without a cache, start + T with one); None means causal.
        """
        q_nope, q_pe = self.project_query(x, freqs)
        latent, k_pe = self.compress_kv(x, freqs)
        if cache is None:
            out = self._full(q_nope, q_pe, latent, k_pe, mask)
        else:
            rows = cache.write(self.layer_idx, start, latent, k_pe)
            if start == 0:  # prefill: the whole context is new, the full path is cheaper
                out = self._full(q_nope, q_pe, latent, k_pe, mask)
            else:
                out = self._absorbed(q_nope, q_pe, rows, mask)
        return self.o_proj(out.flatten(2))

    def _full(self, q_nope, q_pe, latent, k_pe, mask=None) -> torch.Tensor:
        """Attention among T new tokens (causal unless `mask` says otherwise). Returns (B, T, H, v_dim)."""
        B, T = latent.shape[:2]
        kv = self.kv_b_proj(latent).view(B, T, self.n_heads, self.nope_dim + self.v_dim)
        k_nope, v = kv.split([self.nope_dim, self.v_dim], dim=-1)
        q = torch.cat([q_nope, q_pe], dim=-1).transpose(1, 2)  # (B, H, T, qk)
        k = torch.cat([k_nope, k_pe[:, :, None].expand(-1, -1, self.n_heads, -1)], dim=-1).transpose(1, 2)
        if self.v_dim < self.qk_dim:  # fused SDPA kernels want equal head dims: pad v, slice the output
            v = F.pad(v, (0, self.qk_dim - self.v_dim))
        out = sdpa(q, k, v.transpose(1, 2), None if mask is None else mask[:, None], self.scale)
        return out.transpose(1, 2)[..., : self.v_dim]

    def _absorbed(self, q_nope, q_pe, rows, mask=None) -> torch.Tensor:
        """T new queries against the S cached rows (B, S, r + rope) that end with them.

        scores = [q_nope W_uk ; q_pe] . [latent ; k_pe]  (one matmul against the cache rows)
        out    = (probs . latent) W_uv                     (per head, never expanded per token)
        Returns (B, T, H, v_dim). mask None: every cached row is visible (a single new token).
        The scores and the latent output run in the cache's dtype, the projections in the weights':
        only the per-token query and output are cast where the two differ (a bf16 model over an fp32
        cache, or the reverse), never the cache.
        """
        B, T, H, _ = q_nope.shape
        r = self.kv_lora_rank
        w = self.kv_b_proj.weight.view(H, self.nope_dim + self.v_dim, r)
        w_uk, w_uv = w[:, : self.nope_dim], w[:, self.nope_dim:]  # (H, nope, r), (H, v, r)
        q_latent = torch.matmul(q_nope.permute(2, 0, 1, 3).reshape(H, B * T, self.nope_dim), w_uk)
        q_latent = q_latent.view(H, B, T, r).permute(1, 2, 0, 3)  # (B, T, H, r)
        query = torch.cat([q_latent, q_pe], dim=-1).reshape(B, T * H, r + self.rope_dim).to(rows.dtype)
        scores = torch.matmul(query, rows.transpose(1, 2)).mul_(self.scale)  # (B, T*H, S)
        if mask is not None:
            scores = scores.view(B, T, H, -1).masked_fill(~mask[:, :, None], float("-inf")).view(B, T * H, -1)
        probs = scores.float().softmax(dim=-1).to(rows.dtype)
        out_latent = torch.matmul(probs, rows[..., :r])  # (B, T*H, r)
        out_latent = out_latent.view(B * T, H, r).transpose(0, 1).to(w_uv.dtype)  # (H, B*T, r)
        out = torch.matmul(out_latent, w_uv.transpose(1, 2))  # (H, B*T, v)
        return out.transpose(0, 1).reshape(B, T, H, self.v_dim)


def sdpa(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Scaled dot-product attention, causal when mask is None. bf16 inputs on a CPU run the fp32
    kernel (output cast back): torch 2.13's CPU flash attention measured ~1.7x slower in bf16 than in
    fp32 (bench-8m training step, forward + backward); CUDA keeps bf16."""
    dtype = q.dtype
    if q.device.type == "cpu" and dtype == torch.bfloat16:
        q, k, v = q.float(), k.float(), v.float()
    with torch.autocast(q.device.type, enabled=False):  # the dtype chosen above, not autocast's
        if mask is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.to(dtype)


def attention_mask(key_valid: torch.Tensor, start: int, T: int) -> torch.Tensor:
    """key_valid (B, S) -> (B, T, S) bool: query t (slot start + t) sees valid keys up to itself, and
    always itself, so a padding query never has an empty row (its output is unused)."""
    S = key_valid.shape[1]
    slots = torch.arange(S, device=key_valid.device)
    query_slots = start + torch.arange(T, device=key_valid.device)
    causal = slots[None, :] <= query_slots[:, None]  # (T, S)
    own = slots[None, :] == query_slots[:, None]
    return (causal[None] & key_valid[:, None, :]) | own[None]


def segment_mask(segment_ids: torch.Tensor) -> torch.Tensor:
    """segment_ids (B, T) -> (B, T, T) bool: causal within each packed example, never across."""
    T = segment_ids.shape[1]
    causal = torch.ones(T, T, dtype=torch.bool, device=segment_ids.device).tril()
    return (segment_ids[:, :, None] == segment_ids[:, None, :]) & causal
