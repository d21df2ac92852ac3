"""DeepSeekMoE: a gate, fine-grained routed experts stored as stacked tensors, and shared experts.

Routing (DeepSeek-V3 Sec. 2.1.2, V2 Sec. 2.2):
  scores = sigmoid(x W^T) (V3) or softmax(x W^T) (V2), in fp32
  choice = scores + e_score_correction_bias   (V3 noaux_tc; the bias picks experts, never weighs them)
  group-limited: group score = sum of the top-2 choices (noaux_tc) or the max (group_limited_greedy);
                 keep topk_group groups, the others are masked with -inf (DeepSeek's reference)
  weights = scores gathered at the top-k choices, / sum if norm_topk_prob, * routed_scaling_factor
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from .loss import compute_dtype


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x)). Dense layers and shared experts."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """Scores every routed expert and picks num_experts_per_tok of them per token.

    `weight` and `e_score_correction_bias` stay fp32 whatever the model dtype, and the scores are
    computed in fp32 also under bf16 autocast (as DeepSeek-V3 does): selection is a discrete choice
    that small rounding differences would flip.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.n_experts = config.n_routed_experts
        self.top_k = config.num_experts_per_tok
        self.n_group = config.n_group
        self.topk_group = config.topk_group
        self.topk_method = config.topk_method
        self.scoring_func = config.scoring_func
        self.norm_topk_prob = config.norm_topk_prob
        self.scaling = config.routed_scaling_factor
        self.weight = nn.Parameter(torch.empty(self.n_experts, config.hidden_size))
        if self.topk_method == "noaux_tc":
            self.register_buffer("e_score_correction_bias", torch.zeros(self.n_experts))
        else:
            self.e_score_correction_bias = None

    def _apply(self, fn, recurse=True):
        kept = {n: getattr(self, n).data for n in ("weight", "e_score_correction_bias")
                if getattr(self, n) is not None}
        super()._apply(fn, recurse)
        for name, before in kept.items():  # a dtype cast must not round routing through bf16
            t = getattr(self, name)
            if t.dtype != torch.float32:
                t.data = before.to(device=t.device, dtype=torch.float32)
        return self

    def scores(self, x: torch.Tensor) -> torch.Tensor:
        """x: (N, D) -> affinity scores (N, E) in fp32 (autocast off: it would run the linear in bf16)."""
        with torch.autocast(x.device.type, enabled=False):
            logits = F.linear(x.float(), self.weight.float())
        return logits.sigmoid() if self.scoring_func == "sigmoid" else logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (N, D) -> weights (N, k) fp32, expert indices (N, k), scores (N, E)."""
        scores = self.scores(x)
        choice = scores if self.e_score_correction_bias is None else scores + self.e_score_correction_bias
        if self.n_group > 1 and self.topk_method != "greedy":
            choice = self._mask_groups(choice)
        indices = choice.topk(self.top_k, dim=-1, sorted=False).indices
        weights = scores.gather(1, indices)
        if self.norm_topk_prob and self.top_k > 1:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * self.scaling, indices, scores

    def _mask_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Keep the topk_group best groups of experts; the rest can never be selected."""
        N = choice.shape[0]
        grouped = choice.view(N, self.n_group, -1)
        if self.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1).values.sum(dim=-1)
        else:
            group_scores = grouped.amax(dim=-1)
        keep = group_scores.topk(self.topk_group, dim=-1, sorted=False).indices
        mask = torch.ones_like(group_scores, dtype=torch.bool).scatter_(1, keep, False)
        return grouped.masked_fill(mask[..., None], float("-inf")).view(N, -1)


# Running every expert pays off only while all their weights are cheap to read (cache-resident) and
# the FLOPs spent on unselected experts cost less than the ~5 ops per expert they save: at ~100
# GFLOP/s, 40 MFLOPs of waste take ~0.4 ms, the overhead of dispatching ~16 experts one by one.
ALL_EXPERTS_MAX_BYTES = 16 * 2**20
ALL_EXPERTS_MAX_WASTED_FLOPS = 40e6
# Up to this many (token, expert) pairs an inference batch runs pair by pair (`_few_pairs`): measured
# faster than the sorted dispatch for bench-192m at batch 1 and 2 (6 and 12 pairs), slower at 4.
FEW_PAIRS = 12
# bf16 expert matmuls on a CPU run on rows padded to a multiple of this (see RoutedExperts._padded_loop)
ROW_BUCKET = 32


def expert_counts(flat: torch.Tensor, n_experts: int) -> torch.Tensor:
    """How many entries of `flat` name each expert: (n_experts,) int64. bincount with a static shape
    (bincount's output size depends on the data, which torch.compile cannot trace)."""
    return torch.zeros(n_experts, dtype=torch.long, device=flat.device).index_add_(0, flat, torch.ones_like(flat))


_GROUPED_MM: dict[tuple, bool] = {}


def use_grouped_mm(x: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether the experts take torch._grouped_mm for x's device and `dtype` (default x's): where it
    runs (`grouped_mm_works`), except bf16 on a CPU: there the per-expert loop's bf16 matmuls (oneDNN,
    AMX) measured faster than _grouped_mm's CPU bf16 kernel, whose weight gradient over uneven groups
    is the slow part (bench-8m training step, interleaved: 1.5x the loop's time). Without gradients
    (inference) _grouped_mm's bf16 forward is the faster one (bench-192m prefill of 256 tokens through
    a bf16 copy: 1.45x fp32 with it, 0.94x with the loop; bench/perf.py --only-bf16-inference)."""
    dtype = dtype or x.dtype
    if x.device.type == "cpu" and dtype == torch.bfloat16 and torch.is_grad_enabled():
        return False
    return grouped_mm_works(x, dtype)


def grouped_mm_works(x: torch.Tensor, dtype: torch.dtype | None = None) -> bool:
    """Whether torch._grouped_mm runs (forward and backward) for x's device and `dtype` (default x's):
    probed once on tiny tensors (CPU fp32 and bf16 in torch 2.13 do; CUDA wants bf16 on recent GPUs)."""
    key = (x.device.type, dtype or x.dtype)
    if key not in _GROUPED_MM:
        ok = hasattr(torch, "_grouped_mm")
        if ok:
            try:  # outside inference mode (the engine decodes in it): the probe needs autograd
                with torch.inference_mode(False), torch.enable_grad(), \
                        torch.autocast(x.device.type, enabled=False):
                    a = torch.randn(4, 16, device=x.device, dtype=key[1], requires_grad=True)
                    b = torch.randn(2, 16, 16, device=x.device, dtype=key[1], requires_grad=True)
                    offs = torch.tensor([1, 4], device=x.device, dtype=torch.int32)
                    y = torch._grouped_mm(a, b, offs=offs)
                    y.backward(torch.ones_like(y))
                    ref = torch.cat([a[:1] @ b[0], a[1:] @ b[1]])
                    ok = torch.allclose(y, ref, atol=1e-2, rtol=1e-2)
            except (RuntimeError, NotImplementedError, TypeError):
                ok = False
        _GROUPED_MM[key] = ok
    return _GROUPED_MM[key]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous (torch._grouped_mm's backward
    rejects the expanded gradients that, e.g., a .sum() produces)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad.contiguous()


class _Dispatch(torch.autograd.Function):
    """x (N, D) -> (N*k, D): row i is token order[i] // k (each token's row k times, grouped by expert).

    Same as x.index_select(0, order // k), whose backward on a CPU is a scatter_add with a (N*k, D)
    index (~30 ms per bench-192m layer, the largest routing cost). Here the backward gathers each
    token's k gradient rows and adds them in the order that scatter_add did (ascending row), so the
    gradient is bitwise the same."""

    @staticmethod
    def forward(ctx, x, order, inverse, k):
        ctx.save_for_backward(inverse)
        ctx.k = k
        return x.index_select(0, order // k)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        rows = inverse.view(-1, ctx.k).sort(dim=1).values  # (N, k) each token's rows, ascending
        parts = grad.index_select(0, rows.flatten()).view(rows.shape[0], ctx.k, -1)
        total = parts[:, 0].float()  # the sum in fp32 also for bf16 rows (parts is ours to overwrite)
        for j in range(1, ctx.k):
            total += parts[:, j]
        return total.to(grad.dtype), None, None, None


class _Permute(torch.autograd.Function):
    """x.index_select(0, perm) for a permutation, whose backward is the inverse gather (`inverse`)
    instead of index_select's scatter_add: bitwise the same, a fraction of the time."""

    @staticmethod
    def forward(ctx, x, perm, inverse):
        ctx.save_for_backward(inverse)
        return x.index_select(0, perm)

    @staticmethod
    def backward(ctx, grad):
        (inverse,) = ctx.saved_tensors
        return grad.index_select(0, inverse), None, None


class _Bf16Buffers:
    """Buffers a RoutedExperts keeps between training steps for `_PaddedExperts`: bf16 copies of its
    fp32 master weights (refreshed with copy_ at every forward) and its bf16 weight gradients.

    A fresh (E, 2I, D) tensor per step costs more than the cast into it: on a CPU the allocator hands
    back new pages that the kernel zeroes on first touch (bench-192m: `w.to(bf16)` of a 16.7M-element
    expert stack 12.6 ms, `copy_` into a kept buffer 4.0 ms). The weight copies are in use from a
    forward until its backward has run; a forward that finds them in use (a second forward before the
    first one's backward, activation checkpointing's recompute) casts into new tensors instead."""

    def __init__(self):
        self.weights: tuple[torch.Tensor, torch.Tensor] | None = None
        self.grads: dict[int, torch.Tensor] = {}
        self.owner = None  # weakref to the autograd ctx that reads `weights`, until its backward ran

    def __deepcopy__(self, memo):  # a copied model (GRPO's reference, a dense twin) keeps buffers of its own
        return _Bf16Buffers()

    def cast(self, ctx, gate_up: torch.Tensor, down: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """bf16 copies of the masters for the forward of `ctx` (kept ones when free, else new)."""
        bf16 = torch.bfloat16
        if self.owner is not None and self.owner() is not None:
            return gate_up.to(bf16), down.to(bf16)
        if self.weights is None or any(w.shape != m.shape or w.device != m.device
                                       for w, m in zip(self.weights, (gate_up, down))):
            self.weights = (torch.empty_like(gate_up, dtype=bf16), torch.empty_like(down, dtype=bf16))
        for w, m in zip(self.weights, (gate_up, down)):
            w.copy_(m)
        self.owner = weakref.ref(ctx)
        return self.weights

    def release(self, ctx):
        """`ctx`'s backward has run: its weight copies may be overwritten by the next forward."""
        if self.owner is not None and self.owner() is ctx:
            self.owner = None

    def grad(self, i: int, weight: torch.Tensor, blocks: list[tuple[int, int, int]]) -> torch.Tensor:
        """A kept bf16 gradient buffer like `weight` (E, ...), zeroed for the experts without rows
        (its values are cast out before the backward returns, so one buffer serves every step)."""
        g = self.grads.get(i)
        if g is None or g.shape != weight.shape or g.device != weight.device:
            g = self.grads[i] = torch.empty_like(weight)
        hit = torch.zeros(weight.shape[0], dtype=torch.bool)
        hit[[e for e, _, _ in blocks]] = True
        if not hit.all():
            g[~hit.to(g.device)] = 0
        return g


class _PaddedExperts(torch.autograd.Function):
    """The routed experts in bf16 on a CPU, forward and backward written out: x (R, D) grouped by
    expert (counts[e] rows each), gate_up (E, 2I, D), down (E, D, I) masters in any dtype -> (R, D) bf16.

    Each expert's rows are padded with zero rows to a multiple of ROW_BUCKET: oneDNN compiles a bf16
    matmul kernel per new shape (~20-40 ms each, measured) and the row counts change every step, so
    without padding nearly every expert matmul, and its two gradient matmuls, paid a compilation;
    padded, the few shapes hit its cache (zero rows give zero outputs and add nothing to the weight
    gradients). The six matmuls per expert write into preallocated buffers and the elementwise SwiGLU
    runs once over all rows: the autograd graph of the per-expert loop (chunk, unbind, its stacking
    and cat backwards, ~5 nodes per expert) cost more than the bf16 matmuls saved (bench-192m).
    The bf16 weight copies and weight gradients live in `buffers` (_Bf16Buffers) between steps; the
    gradients are cast once to the masters' dtype."""

    @staticmethod
    def forward(ctx, x, counts, gate_up, down, buffers):
        bf16 = torch.bfloat16
        padded = (counts + ROW_BUCKET - 1) // ROW_BUCKET * ROW_BUCKET
        rows = torch.arange(x.shape[0], device=x.device)
        first = (counts.cumsum(0) - counts).repeat_interleave(counts, output_size=x.shape[0])
        slot = (padded.cumsum(0) - padded).repeat_interleave(counts, output_size=x.shape[0]) + rows - first
        padded = padded.tolist()
        blocks = _blocks(padded)
        I = down.shape[-1]
        with torch.autocast(x.device.type, enabled=False):
            xp = x.new_zeros(sum(padded), x.shape[1], dtype=bf16).index_copy_(0, slot, x.to(bf16))
            w_gu, w_d = buffers.cast(ctx, gate_up, down) if gate_up.dtype != bf16 else (gate_up, down)
            h = xp.new_empty(xp.shape[0], 2 * I)  # (P, 2I) = [gate | up]
            for e, a, b in blocks:
                torch.mm(xp[a:b], w_gu[e].t(), out=h[a:b])
            act = F.silu(h[:, :I]) * h[:, I:]  # (P, I)
            y = xp.new_empty(xp.shape)
            for e, a, b in blocks:
                torch.mm(act[a:b], w_d[e].t(), out=y[a:b])
        # the weight copies are ctx attributes, not saved tensors: the next step's copy_ into the kept
        # buffers must not trip autograd's version check (buffers.cast never hands out ones in use)
        ctx.save_for_backward(xp, h, act, slot)
        ctx.weights, ctx.buffers = (w_gu, w_d), buffers
        ctx.blocks, ctx.x_dtype = blocks, x.dtype
        ctx.dtypes = gate_up.dtype, down.dtype
        return y.index_select(0, slot)

    @staticmethod
    def backward(ctx, grad):
        xp, h, act, slot = ctx.saved_tensors
        (w_gu, w_d), buffers = ctx.weights, ctx.buffers
        blocks, I = ctx.blocks, act.shape[1]
        need_x, need_gu, need_d = ctx.needs_input_grad[0], ctx.needs_input_grad[2], ctx.needs_input_grad[3]
        with torch.autocast(xp.device.type, enabled=False):
            gy = xp.new_zeros(xp.shape).index_copy_(0, slot, grad.to(xp.dtype))  # (P, D)
            g_act = act.new_empty(act.shape)
            g_d = buffers.grad(1, w_d, blocks) if need_d else None
            for e, a, b in blocks:
                torch.mm(gy[a:b], w_d[e], out=g_act[a:b])
                if need_d:
                    torch.mm(gy[a:b].t(), act[a:b], out=g_d[e])
            gate, up = h[:, :I], h[:, I:]
            g_h = torch.cat([torch.ops.aten.silu_backward(g_act * up, gate), g_act * F.silu(gate)], dim=1)
            g_x = xp.new_empty(xp.shape) if need_x else None
            g_gu = buffers.grad(0, w_gu, blocks) if need_gu else None
            for e, a, b in blocks:
                if need_x:
                    torch.mm(g_h[a:b], w_gu[e], out=g_x[a:b])
                if need_gu:
                    torch.mm(g_h[a:b].t(), xp[a:b], out=g_gu[e])
        out = (g_x.index_select(0, slot).to(ctx.x_dtype) if need_x else None, None,
               g_gu.to(ctx.dtypes[0], copy=True) if need_gu else None,
               g_d.to(ctx.dtypes[1], copy=True) if need_d else None, None)
        buffers.release(ctx)
        return out


def _blocks(padded: list[int]) -> list[tuple[int, int, int]]:
    """(expert, first row, end row) of each expert with rows, from the padded row counts."""
    out, start = [], 0
    for e, n in enumerate(padded):
        if n:
            out.append((e, start, start + n))
        start += n
    return out


class RoutedExperts(nn.Module):
    """E SwiGLU experts as stacked weights: gate_up (E, 2I, D) = [gate; up], down (E, D, I).

    Dropless dispatch: the N*k (token, expert) pairs are sorted by expert so each expert reads one
    contiguous block; experts that received no token do no work. Inference takes two shortcuts with
    the same numbers: one or two tokens run pair by pair (`_few_pairs`), and small batches whose
    experts fit in cache run every expert at once (`_all_experts`).
    """

    def __init__(self, n_experts: int, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.n_experts = n_experts
        self.intermediate_size = intermediate_size
        self.gate_up = nn.Parameter(torch.empty(n_experts, 2 * intermediate_size, hidden_size))
        self.down = nn.Parameter(torch.empty(n_experts, hidden_size, intermediate_size))
        self._bf16_buffers = _Bf16Buffers()  # CPU bf16 training's kept weight copies (_PaddedExperts)

    @torch.compiler.disable  # data-dependent dispatch (and _grouped_mm's meta wants bf16): eager under compile
    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """x: (N, D), indices/weights: (N, k) -> (N, D) = sum_k weight * expert_k(x)."""
        N, k = indices.shape
        if not torch.is_grad_enabled():
            if self._all_experts_pays(N, k):
                return self._all_experts(x, indices, weights)
            if N * k <= FEW_PAIRS:
                return self._few_pairs(x, indices, weights)
        flat = indices.flatten()
        order = flat.argsort(stable=True)  # (N*k,) pair ids grouped by expert
        inverse = order.argsort()  # (N*k,) each pair's row in the sorted order
        counts = expert_counts(flat, self.n_experts)
        # rows in the matmuls' dtype before they are copied k times (bf16 autocast: half the bytes)
        x_sorted = _Dispatch.apply(x.to(compute_dtype(x)), order, inverse, k)  # (N*k, D)
        out = self.grouped_experts(x_sorted, counts)
        # back to (token, slot) order, then the weighted sum over the k slots
        out = _Permute.apply(out, inverse, order).view(N, k, -1)
        return (out * weights.to(out.dtype).unsqueeze(-1)).sum(dim=1)

    def grouped_experts(self, x: torch.Tensor, counts: torch.Tensor, run_empty: bool = False) -> torch.Tensor:
        """x: (R, D) rows grouped by expert, counts[e] rows for expert e -> (R, D), each row through its
        expert. `torch._grouped_mm` where this backend has it, for training and for inference on many
        rows (two grouped matmuls, no per-expert ops, no host sync; every expert gets a gradient, zeros
        when it had no rows); else a loop over the experts (those without rows skipped unless run_empty)."""
        # (training and prefill up to 20% faster than the loop; decoding bench-192m at batch 8, 12%)
        dtype = compute_dtype(x)
        if use_grouped_mm(x, dtype):
            # autocast does not cover _grouped_mm: under bf16 autocast cast inputs and weights here (the
            # casts are differentiable, the fp32 master weights get fp32 gradients)
            gate_up, down = self.gate_up.to(dtype).transpose(1, 2), self.down.to(dtype).transpose(1, 2)
            offs = counts.cumsum(0).to(torch.int32)
            gate, up = torch._grouped_mm(x.to(dtype), gate_up, offs=offs).chunk(2, dim=-1)
            return _ContiguousGrad.apply(torch._grouped_mm(F.silu(gate) * up, down, offs=offs))
        if x.device.type == "cpu" and dtype == torch.bfloat16 and x.shape[0]:
            return _PaddedExperts.apply(x, counts, self.gate_up, self.down, self._bf16_buffers)
        return self._loop(x, counts, run_empty)

    def _loop(self, x: torch.Tensor, counts: torch.Tensor, run_empty: bool = False, dtype=None) -> torch.Tensor:
        """The per-expert loop of `grouped_experts` (weights cast once to `dtype` when given)."""
        gate_up, down = self.gate_up, self.down
        if dtype is not None:
            gate_up, down = gate_up.to(dtype), down.to(dtype)
        if torch.is_grad_enabled():
            # one UnbindBackward stacks all expert grads at once; indexing gate_up[e] would make every
            # expert's backward write a zero-filled copy of the whole stacked tensor
            gate_up, down = gate_up.unbind(0), down.unbind(0)
        outs = []
        for block, e in zip(x.split(counts.tolist()), range(self.n_experts)):
            if block.shape[0] or run_empty:
                gate, up = F.linear(block, gate_up[e]).chunk(2, dim=-1)
                outs.append(F.linear(F.silu(gate) * up, down[e]))
        return torch.cat(outs) if outs else x.new_zeros(0, x.shape[1])  # no in-place writes: small nodes

    def _few_pairs(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Decoding one or two tokens: each (token, expert) pair runs on its own, the down projection
        accumulated straight into the output with the routing weight as addmm_'s alpha; no sort, no
        count, no split over all experts (half the per-token ops of the sorted dispatch)."""
        I = self.intermediate_size
        y = torch.zeros_like(x)
        for n, (chosen, ws) in enumerate(zip(indices.tolist(), weights.tolist())):
            xn, yn = x[n:n + 1], y[n:n + 1]
            for e, w in zip(chosen, ws):
                h = F.linear(xn, self.gate_up[e])
                yn.addmm_(F.silu(h[:, :I]) * h[:, I:], self.down[e].t(), alpha=w)
        return y

    def _bytes(self) -> int:
        return (self.gate_up.numel() + self.down.numel()) * self.gate_up.element_size()

    def _all_experts_pays(self, N: int, k: int) -> bool:
        """Small inference batches: most experts are hit anyway (2 N k >= E), their weights are cache
        resident, and the wasted FLOPs of the unselected ones are few (so not for a long prefill)."""
        E = self.n_experts
        wasted = N * (E - k) * 6 * self.gate_up.shape[-1] * self.intermediate_size
        return 2 * N * k >= E and self._bytes() <= ALL_EXPERTS_MAX_BYTES and wasted <= ALL_EXPERTS_MAX_WASTED_FLOPS

    def _all_experts(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Small-batch inference: when most experts are hit anyway, run every expert in a dozen ops
        (two matmuls over the stacked weights) instead of ~5 ops per expert; unselected experts get
        weight 0. Same result as the sorted dispatch up to rounding."""
        N, D = x.shape
        E, I = self.n_experts, self.intermediate_size
        h = F.linear(x, self.gate_up.view(E * 2 * I, D)).view(N, E, 2, I)
        dense_w = torch.zeros(N, E, dtype=x.dtype, device=x.device).scatter_(1, indices, weights.to(x.dtype))
        act = F.silu(h[:, :, 0]) * h[:, :, 1] * dense_w.unsqueeze(-1)  # (N, E, I), weighted
        return torch.bmm(act.transpose(0, 1), self.down.transpose(1, 2)).sum(dim=0)  # (E, N, D) -> (N, D)


class MoE(nn.Module):
    """Shared experts (always on, unweighted) + routed experts (top-k by the gate).

    After each training (or grad-enabled) forward, `expert_load` holds the number of tokens routed to
    each expert (for the aux-loss-free bias update; None after an inference forward) and `aux_loss`
    the sequence-wise balance loss when alpha > 0 in training.
    """

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.top_k = config.num_experts_per_tok
        self.aux_loss_alpha = config.aux_loss_alpha  # a training setting: trainers set it from their recipe
        self.gate = Gate(config)
        self.experts = RoutedExperts(config.n_routed_experts, config.hidden_size, config.moe_intermediate_size)
        self.shared_experts = (MLP(config.hidden_size, config.moe_intermediate_size * config.n_shared_experts)
                               if config.n_shared_experts > 0 else None)
        self.expert_load: torch.Tensor | None = None
        self.aux_loss: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, T, D) -> (B, T, D)."""
        B, T, D = x.shape
        flat = x.reshape(-1, D)
        weights, indices, scores = self.gate(flat)
        y = self.experts(flat, indices, weights)
        if self.shared_experts is not None:
            y = y + self.shared_experts(flat)
        if self.training or torch.is_grad_enabled():  # for the bias update; decoding skips the count
            with torch.no_grad():
                self.expert_load = expert_counts(indices.flatten(), self.gate.n_experts)
        else:
            self.expert_load = None
        self.aux_loss = None
        if self.training and self.aux_loss_alpha > 0:
            self.aux_loss = self.sequence_aux_loss(scores.view(B, T, -1), indices.view(B, T, -1))
        return y.view(B, T, D)

    def sequence_aux_loss(self, scores: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """DeepSeek-V3 Eq. 17-20: alpha * sum_i f_i P_i per sequence, averaged over the batch.

        f_i = E / (k T) * #tokens choosing i; P_i = mean over tokens of scores normalised per token.
        """
        B, T, E = scores.shape
        chosen = torch.zeros(B, E, device=scores.device).scatter_add_(
            1, indices.reshape(B, -1), torch.ones(B, T * self.top_k, device=scores.device))
        f = chosen * E / (self.top_k * T)
        p = (scores / scores.sum(dim=-1, keepdim=True)).mean(dim=1)
        return self.aux_loss_alpha * (f * p).sum(dim=-1).mean()
