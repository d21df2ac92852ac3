"""How the engine computes: in fp32, in bf16 weights, or (`auto` on a CPU with fast bf16) in both, picked
per forward by its size.

    from nanoseek.infer.compute import inference_precision
    inference_precision("auto", "cpu")   # fp32 below 64 tokens per forward, bf16 from 64 (auto: ...)

- `fp32`: fp32 weights and latent cache (the reference path; what the parity tests check).
- `bf16`: bf16 copies of the weights (half the bytes read per decoded token) and a bf16 latent cache
  (half its memory). The router gate and `e_score_correction_bias` stay fp32 (`Gate._apply`), and so do
  the rope frequencies, norms' statistics, softmax and the sampler's logits.
- `auto`: `nanoseek.precision.resolve_precision` decides whether bf16 pays at all (CUDA, or a CPU whose
  cached matmul probe measures bf16 >= 1.3x fp32; NANOSEEK_BF16=0/1 overrides). On a CUDA device bf16
  then runs throughout. On a CPU, bf16 pays only for matmuls of many rows: AMX speeds up bf16 GEMMs
  ~4x, but torch's bf16 GEMV and few-row GEMMs are no faster than fp32 (slower with the weights in
  cache), and an MoE splits a forward's tokens over its experts (bench-192m: 64 tokens give each
  expert ~6 rows). Measured on an AMX Xeon (docs/inference.md): bf16 weights ran a bench-192m forward
  of 8-32 tokens at 0.9-1.0x fp32, 64 tokens at 1.15x, 128 at 1.4x, 256 at 1.8x, and decoding at
  batch 1 at 0.6-0.8x. `auto` there keeps the fp32 weights and cache for forwards of fewer than
  AUTO_BF16_MIN_TOKENS tokens (decoding, short prompts) and runs larger ones (long prefills, decode
  steps of >= 64 rows) on a bf16 copy of the weights: 1.5x the weight memory, and in those
  measurements never slower than fp32.

Autocast around fp32 weights is not used for decoding: it would read the fp32 weights and write bf16
copies of them on every step, more bytes than fp32 alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..model import Transformer
from ..precision import Precision, check_precision, resolve_precision
from .quant import Int8Linear, Int8RoutedExperts

AUTO_BF16_MIN_TOKENS = 64  # auto on a CPU: forwards of at least this many tokens run on the bf16 copy
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class InferencePrecision:
    """The engine's compute plan: `weights` is the dtype of the model it keeps (and of its latent
    cache); forwards of at least `bf16_min_tokens` tokens run on a bf16 copy (None: never)."""

    weights: torch.dtype
    bf16_min_tokens: int | None
    reason: str

    @property
    def name(self) -> str:
        """fp32 | bf16 | fp16, or fp32+bf16 when forwards are split by size."""
        base = SHORT.get(self.weights, str(self.weights).removeprefix("torch."))
        return f"{base}+bf16" if self.bf16_min_tokens is not None else base

    def describe(self) -> str:
        if self.bf16_min_tokens is None:
            return f"{self.name} ({self.reason})"
        return (f"{SHORT[self.weights]} below {self.bf16_min_tokens} tokens per forward, bf16 from "
                f"{self.bf16_min_tokens} ({self.reason})")

    def as_dict(self) -> dict:
        return {"precision": self.name, "bf16_min_tokens": self.bf16_min_tokens, "reason": self.reason}


def inference_precision(requested: str | Precision = "auto",
                        device: str | torch.device = "cpu") -> InferencePrecision:
    """The compute plan for `requested` (auto | fp32 | bf16, or an already resolved Precision) on
    `device`; ConfigError names a bad value."""
    device = torch.device(device)
    if isinstance(requested, Precision):
        prec, auto = requested, requested.auto
    else:
        prec, auto = resolve_precision(check_precision(requested), device), requested == "auto"
    if not prec.is_bf16:
        return InferencePrecision(torch.float32, None, prec.reason)
    if auto and device.type == "cpu":
        return InferencePrecision(torch.float32, AUTO_BF16_MIN_TOKENS,
                                  f"{prec.reason}; CPU bf16 matmuls of few rows are no faster than fp32")
    return InferencePrecision(torch.bfloat16, None, prec.reason)


def own_precision(model: nn.Module) -> InferencePrecision:
    """The plan of an engine given no precision: the model computes in its own dtype."""
    return InferencePrecision(model.dtype, None, "the model's dtype")


@dataclass
class ComputeModels:
    """The model an engine runs (`main`, in plan.weights) and, for a split plan, its bf16 copy (`fast`)."""

    plan: InferencePrecision
    main: Transformer
    fast: Transformer | None = None

    def for_tokens(self, n: int) -> Transformer:
        """The model that runs a forward of `n` tokens (all rows together)."""
        if self.fast is not None and n >= self.plan.bf16_min_tokens:
            return self.fast
        return self.main


def compute_models(model: Transformer, precision: str | Precision | InferencePrecision | ComputeModels | None = None
                   ) -> ComputeModels:
    """The models that compute `model` in `precision` (None: its own dtype, nothing copied). A model
    already in the plan's dtype is used as it is; otherwise a cast copy is made (`model` is never
    changed). A ComputeModels is returned as it is."""
    if isinstance(precision, ComputeModels):
        return precision
    if precision is None:
        return ComputeModels(own_precision(model), model)
    plan = precision if isinstance(precision, InferencePrecision) else inference_precision(precision, model.device)
    main = model if model.dtype == plan.weights else cast_copy(model, plan.weights)
    fast = cast_copy(model, torch.bfloat16) if plan.bf16_min_tokens is not None else None
    return ComputeModels(plan, main, fast)


def cast_copy(model: Transformer, dtype: torch.dtype) -> Transformer:
    """A copy of `model` (in eval mode) with its weights in `dtype`; the router gate, its bias and the
    rope frequencies stay fp32. Built on the meta device and filled from the state dict, so the peak
    memory is the source plus the copy."""
    if any(isinstance(m, (Int8Linear, Int8RoutedExperts)) for m in model.modules()):
        raise ConfigError("an int8-quantized model computes in its own scheme: give it no precision "
                          "(or quantize after choosing one)")
    with torch.device("meta"):
        twin = Transformer(model.config)
    twin = twin.to(dtype=dtype).to_empty(device=model.device)
    twin.load_state_dict(model.state_dict())  # copy_ casts each tensor to the twin's dtype
    twin.rotary.inv_freq = model.rotary.inv_freq.detach().float().clone()  # not in the state dict
    twin.requires_grad_(False)
    return twin.eval()
