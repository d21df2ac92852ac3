"""int8 weight-only quantization for CPU decoding (per-output-channel symmetric scales).

Decoding a batch of one is bound by reading weights from memory; int8 weights read a quarter of the
bytes of fp32. Activations stay fp32; each matmul runs `torch._weight_int8pack_mm` (x @ (q * s)^T).
Kept in full precision: embeddings (a lookup), norms, the routing gate (a discrete choice), and
kv_b_proj (the absorbed MLA path reads its weight directly; it is small).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..model import Transformer
from ..model.moe import RoutedExperts

KEEP = ("kv_b_proj",)


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: (..., out, in) -> int8 q of the same shape and scales (..., out): w ~= q * scale."""
    scale = w.detach().float().abs().amax(dim=-1).clamp(min=1e-12) / 127.0
    q = torch.round(w.detach().float() / scale.unsqueeze(-1)).clamp(-127, 127).to(torch.int8)
    return q, scale


def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (..., in) @ (q * scale)^T -> (..., out), computed in x's dtype."""
    flat = x.reshape(-1, x.shape[-1])
    if flat.device.type == "cpu" and hasattr(torch.ops.aten, "_weight_int8pack_mm"):
        out = torch._weight_int8pack_mm(flat.contiguous(), q, scale.to(flat.dtype))
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
