"""A compiled decode step: one token per running row through the whole model as one torch.compile graph.

Decoding on a CPU is dispatch-bound: an eager bench-8m token is ~480 top-level torch ops, most of
them tiny, and their per-op overhead, not the bytes of weights read, sets the tokens/s. `decode_step`
is the engine's decode forward (`Transformer.forward_cached` of one token per row, absorbed MLA over
the latent cache) written without host syncs, data-dependent shapes or complex numbers, so inductor
traces it whole and fuses the elementwise work between the matmuls:

- RoPE in real arithmetic on the interleaved pairs (the complex product's formula);
- the cache write at slot `length` (a 0-d tensor: a new step is no new graph) in place, and
  attention over every allocated slot with the rows' validity mask and `slot <= length` (the slot
  count is a dynamic dimension: the cache growing is no new graph either);
- the routed experts as an indirect-indexed reduction over each (token, slot)'s chosen expert
  (`routed_gathered`): inductor reads the chosen experts' rows in place, no gathered copy, no sort,
  no `.tolist()` (RoutedExperts.forward is eager-only: its dispatch depends on the data). Where that
  re-reads too many experts from memory (bench-192m at batch 8) RoutedExperts runs eagerly between
  two graphs;
- Linears of one or two rows as reductions fused with their neighbours (`dense`).

`CompiledDecode` holds a model's graphs, one per batch bucket (1, 2, 4, ..., max_batch: a step of n
rows runs padded to the next bucket); `compiled_for` keeps one per model for the engines that come and
go over it (`nanoseek.generate` builds one per call). Whether the engine uses it: `compile_setting`
(Engine(compile=...), else NANOSEEK_COMPILE=1/0/auto, else off; auto: buckets of at most AUTO_MAX_BUCKET
rows whose cached probe measured the graph MIN_SPEEDUP x faster than eager). Off by default: each
process pays 15-30 s of compiling per bucket on a 2-core CPU (4-7 s from inductor's disk cache), a
stall a short chat or a serving process's first requests would feel; opt in where decoding runs long.) The eager engine stays the reference:
tests/test_compiled_decode.py checks the tokens are its tokens.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import statistics
import time
import warnings
import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..model import LatentCache, Transformer
from ..model.attention import MLA
from ..model.moe import ALL_EXPERTS_MAX_BYTES, MLP, MoE
from ..precision import cached_probe, machine_key

COMPILE_ENV = "NANOSEEK_COMPILE"  # "1": compile wherever it can, "auto": where the probe says, "0"/unset: never
MIN_SPEEDUP = 1.1  # auto compiles a batch bucket only where the probe measured at least this over eager
# auto probes (and compiles) buckets of at most this many rows: the per-op dispatch a graph removes is
# what bounds small batches; larger ones stay eager without paying a compile
AUTO_MAX_BUCKET = 8
# the routed experts run gathered in the graph for up to this many (token, expert) pairs per step, or
# when a layer's experts fit in cache (re-reading an expert per pair is then cheap): bench-8m at batch 8
# (32 pairs, 6 MiB of experts) 2.1x faster than RoutedExperts' eager dispatch; bench-192m at batch 8
# (48 pairs, 96 MiB read from memory) 0.8x, where the dispatch reads each chosen expert once
GATHERED_MAX_PAIRS = 16
GATHERED_MAX_BYTES = ALL_EXPERTS_MAX_BYTES
# one or two rows: Linears as reductions inside the graph (fused with their neighbours: no extern GEMV
# call each), ~10% of a bench-8m step at batch 1; on bench-192m the same as MKL's GEMV (measured with
# every Linear reduced, with those under 1 MiB, and with none)
REDUCED_MAX_ROWS = 2
PROBE_SLOTS = 64  # the probe's cache: this many slots, half of them filled


def dense(linear: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    """linear(x) for x (N, in); up to REDUCED_MAX_ROWS rows as a multiply-and-sum that inductor fuses
    into one reduction kernel with the ops around it."""
    if x.shape[0] > REDUCED_MAX_ROWS:
        return linear(x)
    y = (x[:, None, :] * linear.weight).sum(-1)
    return y if linear.bias is None else y + linear.bias


def mlp_forward(mlp: MLP, x: torch.Tensor) -> torch.Tensor:
    """MLP.forward through `dense`."""
    return dense(mlp.down_proj, F.silu(dense(mlp.gate_proj, x)) * dense(mlp.up_proj, x))


def rope_cos_sin(model: Transformer, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """positions (B,) -> amplitude * cos, amplitude * sin of each pair's angle, (B, rope/2) fp32 (the
    real and imaginary parts of `RotaryEmbedding`'s polar form)."""
    angles = positions.to(torch.float32)[:, None] * model.rotary.inv_freq.float()
    amp = model.rotary.amplitude
    return amp * torch.cos(angles), amp * torch.sin(angles)


def rope_real(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """`apply_rope` without complex numbers: x (..., d) interleaved pairs, cos/sin broadcastable to
    (..., d/2); (a + ib)(c + is) = (ac - bs) + i(as + bc) in fp32."""
    pairs = x.float().unflatten(-1, (-1, 2))
    a, b = pairs[..., 0], pairs[..., 1]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).to(x.dtype)


def attention(mla: MLA, x: torch.Tensor, cos, sin, kv: torch.Tensor, visible: torch.Tensor,
              length: torch.Tensor) -> torch.Tensor:
    """One new token per row through MLA's absorbed path: x (B, D) -> (B, D). Writes the token's
    latent and rope key into kv (B, S, W) at slot `length`; attends to the `visible` (B, S) slots."""
    B = x.shape[0]
    H, r, nope, rope = mla.n_heads, mla.kv_lora_rank, mla.nope_dim, mla.rope_dim
    if mla.q_lora_rank is None:
        q = dense(mla.q_proj, x)
    else:
        q = dense(mla.q_b_proj, mla.q_a_layernorm(dense(mla.q_a_proj, x)))
    q = q.view(B, H, mla.qk_dim)
    q_nope, q_pe = q.split([nope, rope], dim=-1)
    q_pe = rope_real(q_pe, cos[:, None], sin[:, None])
    latent, k_pe = dense(mla.kv_a_proj_with_mqa, x).split([r, rope], dim=-1)
    row = torch.cat([mla.kv_a_layernorm(latent), rope_real(k_pe, cos, sin)], dim=-1)  # (B, W)
    kv.index_copy_(1, length.view(1), row[:, None].to(kv.dtype))
    w = mla.kv_b_proj.weight.view(H, nope + mla.v_dim, r)
    w_uk, w_uv = w[:, :nope], w[:, nope:]  # (H, nope, r), (H, v, r)
    q_latent = torch.bmm(q_nope.transpose(0, 1), w_uk).transpose(0, 1)  # (B, H, r)
    query = torch.cat([q_latent, q_pe], dim=-1).to(kv.dtype)  # (B, H, W)
    scores = torch.bmm(query, kv.transpose(1, 2)) * mla.scale  # (B, H, S)
    scores = scores.masked_fill(~visible[:, None], float("-inf"))
    probs = scores.float().softmax(dim=-1).to(kv.dtype)
    out_latent = torch.bmm(probs, kv[..., :r])  # (B, H, r)
    out = torch.bmm(out_latent.transpose(0, 1).to(w_uv.dtype), w_uv.transpose(1, 2))  # (H, B, v)
    return dense(mla.o_proj, out.transpose(0, 1).reshape(B, H * mla.v_dim))


def routed_gathered(moe: MoE, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """x (N, D), indices/weights (N, k) -> (N, D) = sum_k weight * expert_k(x), each (token, slot)
    reading its expert's weights by index inside the reduction (inductor fuses the gather into the
    matmul-vector loop: nothing of the chosen experts is copied)."""
    experts = moe.experts
    I = experts.intermediate_size
    h = (x[:, None, None, :] * experts.gate_up[indices]).sum(-1)  # (N, k, 2I)
    act = F.silu(h[..., :I]) * h[..., I:]  # (N, k, I)
    y = (act[:, :, None, :] * experts.down[indices]).sum(-1)  # (N, k, D)
    return (y * weights.to(y.dtype)[..., None]).sum(1)


def feed_forward(mlp, x: torch.Tensor) -> torch.Tensor:
    """The block's FFN for x (N, D): a dense MLP; an MoE's routed experts `routed_gathered` for few
    (token, expert) pairs or cache-resident experts (GATHERED_MAX_PAIRS, GATHERED_MAX_BYTES), else
    RoutedExperts' own dispatch (eager: a graph break), which reads each chosen expert once."""
    if not isinstance(mlp, MoE):
        return mlp_forward(mlp, x)
    weights, indices, _ = mlp.gate(x)
    if indices.numel() <= GATHERED_MAX_PAIRS or mlp.experts._bytes() <= GATHERED_MAX_BYTES:
        y = routed_gathered(mlp, x, indices, weights)
    else:
        y = mlp.experts(x, indices, weights)
    if mlp.shared_experts is not None:
        y = y + mlp_forward(mlp.shared_experts, x)
    return y


def decode_step(model: Transformer, ids: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor,
                valid: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
    """One token per row: ids, positions (B,) -> logits (B, vocab) in fp32. The tokens' cache rows go
    into kv (layers, B, S, W) at slot `length` (0-d long); a row attends to its `valid` (B, S) slots
    up to `length` and always to `length` itself (as `attention_mask` lets every query see itself: a
    padding row never has an empty softmax)."""
    slots = torch.arange(kv.shape[2], device=kv.device)
    visible = (valid | (slots == length)[None]) & (slots <= length)[None]  # (B, S)
    cos, sin = rope_cos_sin(model, positions)
    x = model.embed_tokens(ids)  # (B, D)
    for i, block in enumerate(model.layers):
        x = x + attention(block.self_attn, block.input_layernorm(x), cos, sin, kv[i], visible, length)
        x = x + feed_forward(block.mlp, block.post_attention_layernorm(x))
    return dense(model.lm_head, model.norm(x)).float()


def eager_step(model: Transformer, ids: torch.Tensor, positions: torch.Tensor, cache: LatentCache) -> torch.Tensor:
    """The engine's eager decode forward of one token per row (the reference `decode_step` matches):
    ids, positions (B,) -> logits (B, vocab) fp32."""
    return model.forward_cached(ids[:, None], cache, positions[:, None], last_only=True).logits[:, 0].float()


def compilable(model: Transformer) -> bool:
    """Whether `decode_step` computes this model: fp32 weights on a CPU, plain tensors (not sharded
    DTensors), not int8-quantized (quant.py's layers run their own kernels)."""
    from .quant import is_quantized
    return model.device.type == "cpu" and model.dtype == torch.float32 and not is_quantized(model) and \
        all(type(p.data) is torch.Tensor for p in model.parameters())


def buckets(max_batch: int) -> list[int]:
    """The batch sizes graphs are compiled for: powers of two below max_batch, and max_batch; a step of
    n rows runs the smallest bucket >= n, padded with rows whose output is dropped."""
    out, b = [], 1
    while b < max_batch:
        out.append(b)
        b *= 2
    return out + [max_batch]


class CompiledDecode:
    """`decode_step` of one model under torch.compile: one graph per batch bucket (its batch size is
    static: the kernels are specialised to it), with the cache's slot count dynamic (the cache grows by
    doubling: no new graph). The model is held weakly (this object lives in a per-model table).
    `compiled` names the buckets compiled so far, `compile_seconds` what each first call took."""

    def __init__(self, model: Transformer):
        ref = weakref.ref(model)
        self.model_ref = ref
        # cpp_wrapper: the graph's kernels are called from generated C++, not Python (~10% of a bench-8m
        # step at batch 1, ~4% at bench-192m batch 8; a longer first compile)
        self.fn = torch.compile(lambda *args: decode_step(ref(), *args), dynamic=None,
                                options={"cpp_wrapper": True})
        self.compile_seconds: dict[int, float] = {}
        limit = torch._dynamo.config.recompile_limit  # every model's buckets share the step's code object
        torch._dynamo.config.recompile_limit = max(limit, 64)

    def __call__(self, ids: torch.Tensor, positions: torch.Tensor, kv: torch.Tensor, valid: torch.Tensor,
                 length: int) -> torch.Tensor:
        """ids, positions (B,) of the bucket's batch size; kv (layers, B, S, W) and valid (B, S) views of
        the cache -> logits (B, vocab)."""
        B = ids.shape[0]
        torch._dynamo.mark_dynamic(kv, 2)
        torch._dynamo.mark_dynamic(valid, 1)
        for t, dim in ((ids, 0), (positions, 0), (kv, 1), (valid, 0)):
            torch._dynamo.mark_static(t, dim)
        first = B not in self.compile_seconds
        t0 = time.perf_counter()
        out = self.fn(ids, positions, kv, valid, torch.tensor(length, device=ids.device))
        if first:
            self.compile_seconds[B] = time.perf_counter() - t0
        return out


_COMPILED: "weakref.WeakKeyDictionary[Transformer, CompiledDecode]" = weakref.WeakKeyDictionary()


def compiled_for(model: Transformer) -> CompiledDecode:
    """The model's CompiledDecode, made once (engines come and go over one model: `nanoseek.generate`
    builds one per call)."""
    if model not in _COMPILED:
        _COMPILED[model] = CompiledDecode(model)
    return _COMPILED[model]


# ---- whether to compile ----------------------------------------------------------------------------
def compile_setting(requested: bool | None = None) -> str:
    """on | off | auto: `requested` when given, else NANOSEEK_COMPILE (1 on, 0 off, auto), else off.
    An unknown NANOSEEK_COMPILE value is a ConfigError naming it."""
    if requested is not None:
        return "on" if requested else "off"
    forced = os.environ.get(COMPILE_ENV, "0")
    settings = {"1": "on", "0": "off", "auto": "auto"}
    if forced not in settings:
        raise ConfigError(f"{COMPILE_ENV}={forced!r}: expected 1 (on), 0 (off) or auto")
    return settings[forced]


def compile_pays(model: Transformer, batch: int) -> bool:
    """auto's verdict for a bucket of `batch` rows of `model`: at most AUTO_MAX_BUCKET rows and the
    cached probe's compiled / eager speed >= MIN_SPEEDUP."""
    return batch <= AUTO_MAX_BUCKET and probe_speedup(model, batch) >= MIN_SPEEDUP


def probe_speedup(model: Transformer, batch: int) -> float:
    """Compiled over eager decode-step speed for `model`'s shapes at `batch` rows on this machine: timed
    once (the compile is kept for the engine) and cached with machine_key() and the config's shapes.
    A compile that fails here (no C++ compiler, an unsupported backend) is recorded as no speed-up."""
    key = f"{machine_key()}|decode_compile|config={config_signature(model)}|batch={batch}"
    return cached_probe(key, "speedup", lambda: _speedup_or_none(model, batch))


def _speedup_or_none(model: Transformer, batch: int) -> float:
    try:
        return _time_speedup(model, batch)
    except Exception as e:  # torch.compile's failures have many types (BackendCompilerFailed, OSError, ...)
        warnings.warn(f"compiled decoding disabled here: torch.compile of the decode step failed ({e!r:.300})")
        return 1e-6


def config_signature(model: Transformer) -> str:
    """A short hash of the model's config (what the step's shapes and kernels depend on)."""
    text = json.dumps(dataclasses.asdict(model.config), sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@torch.inference_mode()
def _time_speedup(model: Transformer, batch: int, steps: int = 8, rounds: int = 5) -> float:
    """Median over `rounds` of (eager seconds / compiled seconds) for `steps` decode steps each, on a
    scratch cache of PROBE_SLOTS slots half filled with random latents (after one compiled warm-up)."""
    cfg = model.config
    g = torch.Generator().manual_seed(0)
    cache = LatentCache(cfg, batch, PROBE_SLOTS, with_mtp=False, device=model.device)
    cache.kv.normal_(generator=g)
    cache.length = PROBE_SLOTS // 2
    kv, valid = cache.kv.clone(), cache.valid.clone()
    ids = torch.randint(0, cfg.vocab_size, (batch,), generator=g)
    step = compiled_for(model)
    ratios = []
    for r in range(rounds + 1):
        pos = torch.full((batch,), PROBE_SLOTS // 2)
        t0 = time.perf_counter()
        for i in range(steps):
            step(ids, pos + i, kv, valid, PROBE_SLOTS // 2 + i)
        t1 = time.perf_counter()
        cache.length = PROBE_SLOTS // 2
        for i in range(steps):
            eager_step(model, ids, pos + i, cache)
        t2 = time.perf_counter()
        if r:  # round 0 compiles
            ratios.append((t2 - t1) / max(t1 - t0, 1e-9))
    return max(statistics.median(ratios), 1e-6)
