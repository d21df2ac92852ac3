"""Batched generation: left-padded prefill through the full MLA path, then one token per step through
the absorbed path over a preallocated latent cache (no per-step reallocation, minimal Python per token).
"""

from __future__ import annotations

import torch

from ..model import LatentCache, Transformer


def sample_next(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0, top_k: int = 0,
                generator: torch.Generator | None = None) -> torch.Tensor:
    """logits: (B, vocab) -> next token ids (B,). temperature 0 is greedy (argmax)."""
    if temperature <= 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        drop = cumulative - sorted_logits.softmax(dim=-1) >= top_p  # keep the smallest set reaching top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
    probs = logits.softmax(dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def _check_prompts(prompts, vocab_size: int, max_new_tokens: int):
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    for i, p in enumerate(prompts):
        if not isinstance(p, (list, tuple)) or not p:
            raise ValueError(f"prompt {i} must be a non-empty list of token ids")
        bad = [t for t in p if not isinstance(t, int) or not 0 <= t < vocab_size]
        if bad:
            raise ValueError(f"prompt {i} has token id {bad[0]!r} outside the vocabulary [0, {vocab_size})")
    if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")


@torch.no_grad()
def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             eos_token_id: int | list[int] | None = None) -> list[list[int]]:
    """Generate up to max_new_tokens for each prompt (lists of token ids, any lengths).

    Returns the generated ids per prompt, ending at (and including) an eos token if one is produced.
    Greedy when temperature is 0; otherwise temperature / top_k / top_p sampling from `seed`.
    """
    cfg = model.config
    _check_prompts(prompts, cfg.vocab_size, max_new_tokens)
    device = model.device
    B, P = len(prompts), max(len(p) for p in prompts)
    ids = torch.zeros(B, P, dtype=torch.long)
    mask = torch.zeros(B, P, dtype=torch.long)
    for i, p in enumerate(prompts):  # left padding: every row's last prompt token sits in slot P-1
        ids[i, P - len(p):] = torch.tensor(p)
        mask[i, P - len(p):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(dim=1) - 1).clamp(min=0)
    padded = not bool(mask.all())
    eos = {eos_token_id} if isinstance(eos_token_id, int) else set(eos_token_id or ())
    eos_ids = torch.tensor(sorted(eos), device=device, dtype=torch.long)
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    was_training = model.training
    model.eval()
    cache = LatentCache(cfg, B, P + max_new_tokens, with_mtp=False, device=device, dtype=model.dtype)
    logits = model(ids, cache=cache, positions=positions, attention_mask=mask if padded else None)[:, -1]
    next_pos = positions[:, -1:] + 1
    out = torch.empty(B, max_new_tokens, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    steps = 0
    for step in range(max_new_tokens):
        token = sample_next(logits, temperature, top_p, top_k, generator)
        out[:, step] = token
        steps = step + 1
        if len(eos_ids):
            done |= torch.isin(token, eos_ids)
            if bool(done.all()):
                break
        if step + 1 < max_new_tokens:
            logits = model(token[:, None], cache=cache, positions=next_pos)[:, -1]
            next_pos = next_pos + 1
    model.train(was_training)
    return [_cut_at_eos(row, eos) for row in out[:, :steps].tolist()]


def _cut_at_eos(row: list[int], eos: set[int]) -> list[int]:
    for i, t in enumerate(row):
        if t in eos:
            return row[: i + 1]
    return row
