"""`nanoseek.generate`: batched generation of token ids (a static batch on the continuous-batching Engine),
and `generate_batches`, the same over consecutive seeded batches; `check_generation` checks their
settings before any work."""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import ConfigError
from ..model import Transformer
from .compute import compute_models
from .engine import Engine
from .sampling import SamplingParams


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


def generate(model: Transformer, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
             top_p: float = 1.0, top_k: int = 0, seed: int | None = None,
             eos_token_id: int | list[int] | None = None,
             generator: torch.Generator | list[torch.Generator] | None = None, precision=None,
             prefix_reuse: bool = True) -> list[list[int]]:
    """Generate up to max_new_tokens for each prompt (lists of token ids, any lengths).

    Returns the generated ids per prompt, ending at (and including) an eos token if one is produced.
    Greedy when temperature is 0; otherwise temperature / top_k / top_p sampling; with `seed`, the
    batch draws from one generator seeded with it (the same call gives the same tokens). `generator`
    instead: one generator for the batch, or a list with one per prompt; prompts that share one draw
    together from it, so what they sample does not depend on the rest of the batch (GRPO seeds a
    generator per group this way: its rollouts do not depend on how prompts are split over ranks).
    Runs on `Engine`: one left-padded prefill, then one token per step over the latent cache. With
    `prefix_reuse` (default) identical prompts (GRPO's groups, eval's k samples) are prefilled once and
    their cache copied to each; the tokens drawn are those of prefix_reuse=False, each prompt prefilled
    for itself (see docs/inference.md, "Prefix reuse").
    precision: auto | fp32 | bf16 (or what `Engine` accepts); None computes in the model's own dtype.
    A precision other than the model's dtype casts a copy of the weights per call (`generate_batches`
    casts once for all its batches).
    """
    cfg = model.config
    _check_prompts(prompts, cfg.vocab_size, max_new_tokens)
    eos = (eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id or ())
    longest = max(len(p) for p in prompts)
    engine = Engine(model, max_batch=len(prompts), max_model_len=longest + max_new_tokens + 1,
                    prefill_chunk=sum(len(p) for p in prompts), eos_ids=(), precision=precision,
                    prefix_reuse=prefix_reuse)
    params = SamplingParams(max_tokens=max_new_tokens, temperature=temperature, top_p=top_p, top_k=top_k,
                            stop_token_ids=eos)
    if generator is not None and seed is not None:
        raise ValueError("pass seed or generator, not both")
    if isinstance(generator, list) and len(generator) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(generator)} generators")
    if seed is not None:
        generator = torch.Generator(device=model.device).manual_seed(seed)
    was_training = model.training
    model.eval()
    try:
        requests = engine.generate([list(p) for p in prompts], params, generator=generator)
    finally:
        model.train(was_training)
    return [r.output_ids for r in requests]


def generate_batches(model: Transformer, prompts: list[list[int]], *, max_new_tokens: int, temperature: float,
                     top_p: float, seed: int, eos_id: int, batch_size: int,
                     on_batch: Callable[[int], None] | None = None, precision=None) -> list[list[int]]:
    """`generate` over consecutive batches of `batch_size` prompts, batch b seeded with seed + b (so the
    result does not depend on how many batches came before in another call); `on_batch(n)` after each.
    `precision` as in `generate`; the weights are cast once for all batches."""
    # the option goes on only when given, so a stand-in for `generate` need not know it
    options = {} if precision is None else {"precision": compute_models(model, precision)}
    out: list[list[int]] = []
    for b, start in enumerate(range(0, len(prompts), batch_size)):
        batch = prompts[start:start + batch_size]
        out += generate(model, batch, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                        seed=seed + b, eos_token_id=eos_id, **options)
        if on_batch is not None:
            on_batch(len(batch))
    return out


def check_generation(*, temperature: float, top_p: float, max_new_tokens: int | None, batch_size: int) -> None:
    """Reject bad sampling settings of an evaluation or a rejection-sampling run before any work:
    temperature and top_p by SamplingParams' own checks, positive max_new_tokens (None: the task's
    default) and batch_size. ConfigError names the field."""
    try:
        SamplingParams(temperature=temperature, top_p=top_p)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    for name, value in (("max_new_tokens", max_new_tokens), ("batch_size", batch_size)):
        if value is None and name == "max_new_tokens":
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")
