"""Block, Transformer and the multi-token-prediction (MTP) modules.

Parameter names follow the HF DeepseekV3 layout (`layers.N.self_attn.q_a_proj.weight`, ...) so the
checkpoint mapping is a prefix, except for stacked routed experts and MTP modules (see checkpoint.py).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..config import ModelConfig
from .attention import MLA, segment_mask
from .attention import attention_mask as attention_mask_for
from .cache import LatentCache
from .loss import linear_cross_entropy
from .moe import MLP, MoE
from .norm import RMSNorm
from .rope import RotaryEmbedding


class CachedForward(NamedTuple):
    """What `Transformer.forward_cached` returns."""

    logits: torch.Tensor  # (B, T, vocab), or (B, 1, vocab) for the last position only
    hidden: torch.Tensor  # (B, T, D) final hidden states before the output norm
    mask: torch.Tensor | None  # (B, T, start + T) the attention mask it used (None: causal)


class Block(nn.Module):
    """Pre-norm residual block: x + MLA(norm(x)), then h + FFN(norm(h)); FFN is dense or MoE."""

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config, layer_idx)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = MoE(config) if config.is_moe_layer(layer_idx) else MLP(config.hidden_size,
                                                                          config.intermediate_size)

    def forward(self, x, freqs, cache=None, start=0, mask=None):
        x = x + self.self_attn(self.input_layernorm(x), freqs, cache, start, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class SharedHead(nn.Module):
    """The MTP module's output norm; the projection itself is the main model's lm_head."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)


class MTPModule(nn.Module):
    """Predicts token i+k+1 from the depth-(k-1) hidden state at i and the embedding of token i+k.

    h'_i = eh_proj([enorm(emb(t_{i+k})); hnorm(h_i)]) -> Block -> shared_head.norm -> lm_head
    (DeepSeek-V3 Sec. 2.2; the concatenation order is the one vLLM uses with DeepSeek's weights).
    """

    def __init__(self, config: ModelConfig, layer_idx: int):
        super().__init__()
        self.enorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.hnorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.eh_proj = nn.Linear(2 * config.hidden_size, config.hidden_size, bias=False)
        self.block = Block(config, layer_idx)
        self.shared_head = SharedHead(config)

    def forward(self, hidden, next_embeds, freqs, cache=None, start=0, mask=None):
        """hidden, next_embeds: (B, T, D) -> (B, T, D) hidden state of this depth (before the head norm)."""
        return self.block(self.block_input(hidden, next_embeds), freqs, cache, start, mask)

    def block_input(self, hidden: torch.Tensor, next_embeds: torch.Tensor) -> torch.Tensor:
        return self.eh_proj(torch.cat([self.enorm(next_embeds), self.hnorm(hidden)], dim=-1))


class Transformer(nn.Module):
    """DeepSeek-V3/V2 decoder. `model(input_ids) -> logits` (B, T, vocab) in the model's dtype.

    `activation_checkpointing` (a training setting, off by default): each block's activations are
    recomputed in the backward instead of kept, for forwards with gradients and without a cache."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        self.activation_checkpointing = False
        L = config.num_hidden_layers
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(Block(config, i) for i in range(L))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.mtp = nn.ModuleList(MTPModule(config, L + k) for k in range(config.num_nextn_predict_layers))
        self.rotary = RotaryEmbedding(config)
        if not any(p.is_meta for p in self.parameters()):
            self.init_weights()

    @torch.no_grad()
    def init_weights(self, std: float | None = None):
        """Normal(0, initializer_range) for matrices, ones for norms, zeros for biases (as HF)."""
        std = self.config.initializer_range if std is None else std
        for m in self.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, 0.0, std)
                if getattr(m, "bias", None) is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)
            elif isinstance(m, MoE):
                nn.init.normal_(m.gate.weight, 0.0, std)
                nn.init.normal_(m.experts.gate_up, 0.0, std)
                nn.init.normal_(m.experts.down, 0.0, std)
                if m.gate.e_score_correction_bias is not None:
                    nn.init.zeros_(m.gate.e_score_correction_bias)

    def hidden_states(self, input_ids: torch.Tensor, positions: torch.Tensor, cache: LatentCache | None = None,
                      start: int = 0, mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions: (B or 1, T) -> final hidden states (B, T, D) before the output norm."""
        freqs = self.rotary(positions)
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = self._run_block(layer, x, freqs, cache, start, mask)
        return x

    def _run_block(self, block: nn.Module, x, freqs, cache=None, start=0, mask=None):
        """block(x, ...), under activation checkpointing when it is on and applies (see the class)."""
        if self.activation_checkpointing and cache is None and torch.is_grad_enabled():
            # non-reentrant: keeps autocast, works with unused inputs (mask None) and FSDP2's hooks;
            # the MoE's routing statistics are set again, to the same values, by the recompute
            return checkpoint(block, x, freqs, None, start, mask, use_reentrant=False)
        return block(x, freqs, cache, start, mask)

    def forward(self, input_ids: torch.Tensor, *, cache: LatentCache | None = None, start: int | None = None,
                positions: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                segment_ids: torch.Tensor | None = None, return_mtp: bool = False, mtp_detach_trunk: bool = False,
                labels: list[tuple[torch.Tensor, torch.Tensor]] | None = None):
        """Logits (B, T, vocab).

        cache: tokens go into cache slots start..start+T (default start = cache.length) and the cache
        advances by T (see `forward_cached`). positions: (B, T) rotary positions (default: the slot
        numbers); pass them for left-padded or packed batches. attention_mask: (B, T) 1 for real tokens,
        0 for padding (remembered by the cache for later steps). segment_ids: (B, T) packed examples (no
        cache): tokens attend only within their segment. return_mtp: also a list of MTP logits, depth k
        giving (B, T - k, vocab) where position i predicts token i + k + 1. mtp_detach_trunk: the MTP
        logits' gradient stops at the MTP modules (see `mtp_logits`).
        labels (training, no cache): [(targets, weights)] for the main head, then MTP depths 1, 2, ...
        ((B, T - k) each, weights per target: mask / count for a masked mean) -> instead of logits, the
        list of weighted cross-entropy sums (fp32 scalars), each fused with lm_head in chunks so the
        logits of the whole vocabulary never sit in memory (model/loss.py).
        """
        if labels is not None:
            return self._losses(input_ids, positions, segment_ids, labels)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, seq), got shape {tuple(input_ids.shape)}")
        T = input_ids.shape[1]
        if start is None:
            start = cache.length if cache is not None else 0
        if positions is None:
            positions = torch.arange(start, start + T, device=input_ids.device)[None]
        if cache is not None:
            if segment_ids is not None:
                raise ValueError("segment_ids are for packed training batches, not with a cache")
            logits, h, _ = self.forward_cached(input_ids, cache, positions, start=start,
                                               attention_mask=attention_mask)
        else:
            h = self.hidden_states(input_ids, positions, mask=self._mask(T, attention_mask, segment_ids))
            logits = self.lm_head(self.norm(h))
        if not return_mtp:
            return logits
        return logits, self.mtp_logits(h, input_ids, positions, segment_ids, detach_trunk=mtp_detach_trunk)

    def forward_cached(self, input_ids: torch.Tensor, cache: LatentCache, positions: torch.Tensor | None = None, *,
                       start: int | None = None, attention_mask: torch.Tensor | None = None,
                       last_only: bool = False) -> CachedForward:
        """T new tokens (B, T) through the model into cache slots start..start+T (default start =
        cache.length); the cache records which slots hold real tokens and advances to start + T.

        positions: (B or 1, T) rotary positions (default: the slot numbers). attention_mask: (B, T) 1 for
        real tokens, 0 for padding. last_only: logits of the last position only (B, 1, vocab), all a
        sampler needs. Returns the logits, the final hidden states (B, T, D), from which an MTP module
        drafts (`mtp_draft`), and the attention mask used.
        """
        T = input_ids.shape[1]
        if start is None:
            start = cache.length
        if positions is None:
            positions = torch.arange(start, start + T, device=input_ids.device)[None]
        mask = self._cache_mask(cache.mark(start, attention_mask, T), cache, start, T)
        h = self.hidden_states(input_ids, positions, cache, start, mask)
        cache.length = start + T
        out = h[:, -1:] if last_only else h
        return CachedForward(self.lm_head(self.norm(out)), h, mask)

    def mtp_draft(self, main: CachedForward, next_ids: torch.Tensor, positions: torch.Tensor, cache: LatentCache,
                  start: int, *, revalidated: bool = False) -> torch.Tensor:
        """MTP module 1 over the cache slots start..start+T that the main forward `main` filled:
        (h_i, emb(t_{i+1})) -> its hidden state (B, T, D) (logits: `mtp_head`). It writes its own cache
        layer (num_hidden_layers) and attends as the main forward did, or, `revalidated`, to the slots
        the cache holds as valid now (after the caller invalidated a rejected draft's slot)."""
        T = next_ids.shape[1]
        if revalidated:
            mask = self._cache_mask(cache.valid[:, : start + T] if cache.padded else None, cache, start, T)
        else:
            mask = main.mask
        return self.mtp[0](main.hidden, self.embed_tokens(next_ids), self.rotary(positions), cache, start, mask)

    def mtp_head(self, hidden: torch.Tensor, depth: int = 1) -> torch.Tensor:
        """MTP hidden states (..., D) of `depth` -> logits (..., vocab): its own norm, the shared lm_head."""
        return self.lm_head(self.mtp[depth - 1].shared_head.norm(hidden))

    @staticmethod
    def _mask(T, attention_mask, segment_ids) -> torch.Tensor | None:
        """(B, T, T) attention mask without a cache, or None for plain causal attention."""
        if segment_ids is not None:
            return segment_mask(segment_ids)
        if attention_mask is not None:
            return attention_mask_for(attention_mask.bool(), 0, T)
        return None

    @staticmethod
    def _cache_mask(key_valid: torch.Tensor | None, cache: LatentCache, start: int, T: int) -> torch.Tensor | None:
        """(B, T, start + T) mask for T tokens in cache slots start.., shared by all layers. key_valid:
        (B, start + T) the cache's valid slots when it holds padding (what `LatentCache.mark` returns).
        None where causal attention over every slot is exact: a prefill without padding, or one token
        that may see every slot (decode then builds and applies no mask per layer)."""
        if key_valid is not None:
            if T == 1 and bool(key_valid.all()):
                return None
            return attention_mask_for(key_valid, start, T)
        if T == 1 or start == 0:
            return None
        return attention_mask_for(cache.valid[:, : start + T], start, T)

    def mtp_logits(self, hidden: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                   segment_ids: torch.Tensor | None = None, detach_trunk: bool = False) -> list[torch.Tensor]:
        """Sequential MTP over a full sequence (training): depth k sees tokens shifted by k.
        detach_trunk: the main model's hidden states, token embeddings and output head enter as
        constants, so a loss on these logits trains the MTP modules only (GRPO keeps the policy's
        gradient its own; pretraining lets it reach the trunk, as DeepSeek-V3 does)."""
        head = self.lm_head.weight.detach() if detach_trunk else self.lm_head.weight
        return [F.linear(h, head) for h in self.mtp_hidden(hidden, input_ids, positions, segment_ids,
                                                            detach_trunk=detach_trunk)]

    def mtp_hidden(self, hidden: torch.Tensor, input_ids: torch.Tensor, positions: torch.Tensor | None = None,
                   segment_ids: torch.Tensor | None = None, depths: int | None = None,
                   detach_trunk: bool = False) -> list[torch.Tensor]:
        """The normed hidden states (B, T - k, D) that lm_head turns into MTP depth k's logits, for the
        first `depths` depths (default all); detach_trunk as in `mtp_logits`."""
        out = []
        T = input_ids.shape[1]
        if detach_trunk:
            hidden = hidden.detach()
        for k, module in enumerate(self.mtp[:depths], start=1):
            if T - k <= 0:
                break
            pos = positions[:, : T - k] if positions is not None and positions.shape[1] == T else \
                torch.arange(T - k, device=input_ids.device)[None]
            mask = segment_mask(segment_ids[:, : T - k]) if segment_ids is not None else None
            embeds = self.embed_tokens(input_ids[:, k:])
            h = module.block_input(hidden[:, : T - k], embeds.detach() if detach_trunk else embeds)
            hidden = self._run_block(module.block, h, self.rotary(pos), mask=mask)
            out.append(module.shared_head.norm(hidden))
        return out

    def _losses(self, input_ids, positions, segment_ids, labels) -> list[torch.Tensor]:
        """forward(labels=...): the main hidden states, then as many MTP depths as labels has after the
        first, each through `linear_cross_entropy` with lm_head."""
        T = input_ids.shape[1]
        if positions is None:
            positions = torch.arange(T, device=input_ids.device)[None]
        h = self.hidden_states(input_ids, positions, mask=self._mask(T, None, segment_ids))
        heads = [self.norm(h)]
        if len(labels) > 1:
            heads += self.mtp_hidden(h, input_ids, positions, segment_ids, depths=len(labels) - 1)
        return [linear_cross_entropy(x, self.lm_head.weight, targets, weights)
                for x, (targets, weights) in zip(heads, labels)]

    # ---- balancing statistics -----------------------------------------------------------
    def moe_layers(self) -> list[MoE]:
        return [m for m in self.modules() if isinstance(m, MoE)]

    def aux_loss(self) -> torch.Tensor | None:
        losses = [m.aux_loss for m in self.moe_layers() if m.aux_loss is not None]
        return torch.stack(losses).sum() if losses else None

    @property
    def dtype(self) -> torch.dtype:
        return self.embed_tokens.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.embed_tokens.weight.device
