"""int8 weight-only quantization for CPU decoding (per-output-channel symmetric scales).

Decoding a batch of one is bound by reading weights from memory; int8 weights read a quarter of the
bytes of fp32. On CPU each matmul is one int8 x int8 -> int32 GEMM (`torch._int_mm`, oneDNN) over two
"digits" of the activations: x ~= s1 * d1 + s2 * d2 with d1 = round(x / s1), s1 = max|x| / 127 per row,
and d2 the rounded remainder at s2 = s1 / 127. The two digits carry x to ~1/16,000 of its range, so the
result equals the fp32 product with the dequantized weights to ~1e-4 relative: the error is the
weights' rounding alone, as in a weight-only scheme, and both digits ride in one GEMM (2M rows: free
when the GEMM is bound by reading the weights). torch's own weight-only kernel
(`_weight_int8pack_mm`) measured 2-8x slower than fp32 on this AVX2 CPU; `_int_mm` 1.5-1.9x faster on
large matrices whose weights come from memory (no faster on 512 x 512). Elsewhere (CUDA, or a torch
without `_int_mm` on CPU) the weights are dequantized per call.
Kept in full precision: embeddings (a lookup), norms, the routing gate (a discrete choice), and
kv_b_proj (the absorbed MLA path reads its weight directly; it is small).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model import Transformer
from ..model.moe import FEW_PAIRS, RoutedExperts

KEEP = ("kv_b_proj",)


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: (..., out, in) -> int8 q of the same shape and scales (..., out): w ~= q * scale."""
    scale = w.detach().float().abs().amax(dim=-1).clamp(min=1e-12) / 127.0
    q = torch.round(w.detach().float() / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q, scale


_INT_MM: dict[str, bool] = {}


def use_int_mm(x: torch.Tensor) -> bool:
    """Whether torch._int_mm runs on x's device for decode shapes (probed once; CPU in torch 2.13 does,
    CUDA wants M > 16 and is left to the dequantizing path)."""
    key = x.device.type
    if key not in _INT_MM:
        ok = key == "cpu" and hasattr(torch, "_int_mm")
        if ok:
            try:
                a = torch.tensor([[1, -2, 3]], dtype=torch.int8, device=x.device)
                b = torch.tensor([[1, 0], [0, 1], [2, 2]], dtype=torch.int8, device=x.device)
                ok = torch._int_mm(a, b).tolist() == [[7, 4]]
            except (RuntimeError, NotImplementedError):
                ok = False
        _INT_MM[key] = ok
    return _INT_MM[key]


def int8_digits(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K) float -> two int8 digits stacked (2M, K), and their per-row scales s1, s2 (M, 1):
    x ~= s1 * d1 + s2 * d2, exact to s2 / 2 = max|x| / 32,258."""
    x = x.float()
    s1 = x.abs().amax(dim=-1, keepdim=True).clamp_(min=1e-30).div_(127.0)
    d1 = torch.round(x / s1)
    s2 = s1 / 127.0  # the remainder x - s1 * d1 lies within +-s1 / 2
    d2 = torch.round((x - d1 * s1) / s2)
    return torch.cat([d1, d2]).to(torch.int8), s1, s2


def digits_matmul(digits: torch.Tensor, s1: torch.Tensor, s2: torch.Tensor, q: torch.Tensor,
                  scale: torch.Tensor) -> torch.Tensor:
    """(s1 d1 + s2 d2) @ (q * scale)^T for digits from int8_digits: (M, out) fp32, one int8 GEMM."""
    M = s1.shape[0]
    acc = torch._int_mm(digits, q.t()).float()
    return (acc[:M] * s1).add_(acc[M:] * s2).mul_(scale)


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ (q * scale)^T -> (..., out), computed in x's dtype."""
    flat = x.reshape(-1, x.shape[-1])
    if use_int_mm(flat):
        out = digits_matmul(*int8_digits(flat), q, scale).to(flat.dtype)
    else:
        out = F.linear(flat, q.to(flat.dtype) * scale.to(flat.dtype).unsqueeze(-1))
    return out.view(*x.shape[:-1], q.shape[0])


class Int8Linear(nn.Module):
    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scale = quantize_rows(linear.weight)
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.bias = linear.bias

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = int8_matmul(x, self.q, self.scale)
        return out if self.bias is None else out + self.bias


class Int8RoutedExperts(RoutedExperts):
    """Stacked experts with int8 weights; the sorted dropless dispatch of RoutedExperts."""

    def __init__(self, experts: RoutedExperts):
        nn.Module.__init__(self)
        self.n_experts = experts.n_experts
        self.intermediate_size = experts.intermediate_size
        q, s = quantize_rows(experts.gate_up)
        self.register_buffer("gate_up_q", q)
        self.register_buffer("gate_up_scale", s)
        q, s = quantize_rows(experts.down)
        self.register_buffer("down_q", q)
        self.register_buffer("down_scale", s)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        N, k = indices.shape
        if N * k <= FEW_PAIRS and use_int_mm(x):
            return self._few_pairs(x, indices, weights)
        flat = indices.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()
        x_sorted = x.index_select(0, order // k)
        outs = []
        for block, e in zip(x_sorted.split(counts), range(self.n_experts)):
            if block.shape[0]:
                gate, up = int8_matmul(block, self.gate_up_q[e], self.gate_up_scale[e]).chunk(2, dim=-1)
                outs.append(int8_matmul(F.silu(gate) * up, self.down_q[e], self.down_scale[e]))
        out = torch.cat(outs).index_select(0, order.argsort()).view(N, k, -1)
        return (out * weights.to(out.dtype).unsqueeze(-1)).sum(dim=1)

    def _few_pairs(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """One or two tokens (decoding): each token's digits are made once for its k experts."""
        I = self.intermediate_size
        y = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for n, (chosen, ws) in enumerate(zip(indices.tolist(), weights.tolist())):
            digits = int8_digits(x[n:n + 1])
            for e, w in zip(chosen, ws):
                h = digits_matmul(*digits, self.gate_up_q[e], self.gate_up_scale[e])
                out = digits_matmul(*int8_digits(F.silu(h[:, :I]) * h[:, I:]), self.down_q[e], self.down_scale[e])
                y[n:n + 1].add_(out, alpha=w)
        return y.to(x.dtype)


@torch.no_grad()
def quantize_int8(model: Transformer) -> Transformer:
    """Replace, in place, every Linear (but KEEP) and the routed experts with int8 weight-only versions.
    For inference only: the quantized model has no trainable weights there."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and child_name not in KEEP:
                setattr(module, child_name, Int8Linear(child))
            elif isinstance(child, RoutedExperts) and not isinstance(child, Int8RoutedExperts):
                setattr(module, child_name, Int8RoutedExperts(child))
    return model
