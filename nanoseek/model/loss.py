"""Cross-entropy over the vocabulary fused with the output projection, in chunks of rows.

    loss = linear_cross_entropy(h, lm_head.weight, targets, weights)   # == sum(weights * CE(h W^T, targets))

The plain way materialises (N, vocab) logits, in fp32 for the loss, and autograd keeps them (and the
softmax) for the backward: for DeepSeek-V3's 129k vocabulary and 4k tokens that is 2 GB per sequence.
Here the logits of `chunk` rows at a time are computed (in the autocast dtype, upcast to fp32), reduced
to the loss and, when a gradient is wanted, turned at once into the gradients of h and W (softmax minus
one-hot, times the row weight), which the backward only scales: no logits are kept, none recomputed.
The matmuls are the same three a plain forward+backward does (h W^T, g W, g^T h), so it costs nothing.
"""

from __future__ import annotations

import torch

CHUNK_BYTES = 64 * 2**20  # fp32 logits per chunk: 4096 rows of a 4096 vocab, 128 rows of DeepSeek-V3's


def chunk_rows(vocab_size: int, chunk_bytes: int = CHUNK_BYTES) -> int:
    """Rows per chunk so that a chunk's fp32 logits take at most chunk_bytes (at least 1 row)."""
    return max(1, chunk_bytes // (4 * vocab_size))


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype a matmul on t runs in: autocast's where it is on for t's device, else t's own."""
    kind = t.device.type
    if torch.is_autocast_enabled(kind):
        return torch.get_autocast_dtype(kind)
    return t.dtype


def linear_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                         weights: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """sum over rows of weights * CE(hidden @ weight^T, targets), a 0-dim fp32 tensor.

    hidden (..., D); weight (V, D); targets (...) token ids (rows with weight 0 may hold any value,
    e.g. padding); weights (...) per-row factors (a mask divided by the count gives the masked mean).
    chunk: rows per chunk (default: `chunk_rows(V)`). Matmuls run in the autocast dtype when autocast
    is on (bf16: the logits are upcast to fp32 before the softmax), else in hidden's dtype."""
    D, V = hidden.shape[-1], weight.shape[0]
    dtype = compute_dtype(hidden)
    return _LinearCrossEntropy.apply(hidden.reshape(-1, D), weight, targets.reshape(-1).clamp(0, V - 1),
                                     weights.reshape(-1).float(), chunk or chunk_rows(V), dtype)


class _LinearCrossEntropy(torch.autograd.Function):
    """Forward computes the loss and, where needed, both gradients chunk by chunk; backward scales them."""

    @staticmethod
    def forward(ctx, h, weight, targets, row_weights, chunk, dtype):
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with torch.autocast(h.device.type, enabled=False):
            w = weight.to(dtype)
            total = torch.zeros((), dtype=torch.float32, device=h.device)
            grad_h = torch.empty_like(h) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            for s in range(0, h.shape[0], chunk):
                hc, t, rw = h[s:s + chunk].to(dtype), targets[s:s + chunk], row_weights[s:s + chunk]
                logits = (hc @ w.t()).float()  # (n, V)
                lse = logits.logsumexp(dim=-1)
                total += ((lse - logits.gather(1, t[:, None])[:, 0]) * rw).sum()
                if not (need_h or need_w):
                    continue
                g = logits.sub_(lse[:, None]).exp_()  # softmax, in place of the logits
                g[torch.arange(g.shape[0], device=g.device), t] -= 1
                g = g.mul_(rw[:, None]).to(dtype)  # dloss/dlogits
                if need_h:
                    grad_h[s:s + chunk] = g @ w
                if need_w:
                    grad_w += (g.t() @ hc).float()
        ctx.save_for_backward(grad_h, grad_w)
        ctx.weight_dtype = weight.dtype
        return total

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gh = grad_h * grad_out.to(grad_h.dtype) if grad_h is not None else None
        gw = (grad_w * grad_out).to(ctx.weight_dtype) if grad_w is not None else None
        return gh, gw, None, None, None, None
