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

`quantize="int8"` (CPU only; precision auto or fp32) runs an int8 copy of the Linears and routed experts
(`nanoseek.infer.quant`: int8 weights, bf16 activations into the kernel) and keeps the rest, and the
latent cache, in fp32; its plan is named `int8`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..errors import ConfigError
from ..model import Transformer
from ..precision import Precision, check_precision, resolve_precision
from .quant import int8_copy, int8_kernel, is_quantized

QUANTIZE = ("none", "int8")
AUTO_BF16_MIN_TOKENS = 64  # auto on a CPU: forwards of at least this many tokens run on the bf16 copy
SHORT = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@dataclass(frozen=True)
class InferencePrecision:
    """The engine's compute plan: `weights` is the dtype of the model it keeps (and of its latent
    cache); forwards of at least `bf16_min_tokens` tokens run on a bf16 copy (None: never)."""

    weights: torch.dtype
    bf16_min_tokens: int | None
    reason: str
    quantize: str = "none"  # int8: the Linears and routed experts run an int8 copy (weights stays fp32)

    @property
    def name(self) -> str:
        """fp32 | bf16 | fp16, fp32+bf16 when forwards are split by size, or int8."""
        if self.quantize != "none":
            return self.quantize
        base = SHORT.get(self.weights, str(self.weights).removeprefix("torch."))
        return f"{base}+bf16" if self.bf16_min_tokens is not None else base

    def describe(self) -> str:
        if self.bf16_min_tokens is None:
            return f"{self.name} ({self.reason})"
        return (f"{SHORT[self.weights]} below {self.bf16_min_tokens} tokens per forward, bf16 from "
                f"{self.bf16_min_tokens} ({self.reason})")

    def as_dict(self) -> dict:
        return {"precision": self.name, "bf16_min_tokens": self.bf16_min_tokens, "reason": self.reason,
                "quantize": self.quantize}


def check_quantize(value: str, field: str = "quantize") -> str:
    """`value` if it is one of QUANTIZE, else a ConfigError naming `field`."""
    if value not in QUANTIZE:
        raise ConfigError(f"invalid {field} {value!r}: choose one of {', '.join(QUANTIZE)}")
    return value


def inference_precision(requested: str | Precision = "auto", device: str | torch.device = "cpu",
                        quantize: str = "none") -> InferencePrecision:
    """The compute plan for `requested` (auto | fp32 | bf16, or an already resolved Precision) on
    `device`, with `quantize` (none | int8); ConfigError names a bad value or combination."""
    device = torch.device(device)
    if check_quantize(quantize) == "int8":
        return int8_plan(requested, device)
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


def int8_plan(requested: str | Precision, device: torch.device) -> InferencePrecision:
    """The int8 plan: a CPU, and precision auto or fp32 (the non-quantized parts compute in fp32)."""
    name = requested.name if isinstance(requested, Precision) else check_precision(requested)
    if device.type != "cpu":
        raise ConfigError(f"quantize 'int8' runs on a CPU only (its kernel is torch's CPU weight-only int8 "
                          f"matmul), not on {device.type}: use precision bf16 there")
    if name == "bf16" and not (isinstance(requested, Precision) and requested.auto):
        raise ConfigError("quantize 'int8' and precision 'bf16' both choose the weights: give precision "
                          "auto or fp32 with int8 (the rest of the model then computes in fp32)")
    kernel = int8_kernel(device)
    return InferencePrecision(torch.float32, None, f"int8 weights, kernel {kernel.name} ({kernel.reason}); "
                                                   "embeddings, norms, gate and cache fp32", quantize="int8")


def own_precision(model: nn.Module) -> InferencePrecision:
    """The plan of an engine given no precision: the model computes in its own dtype (an int8 model:
    the int8 plan)."""
    if is_quantized(model):
        kernel = int8_kernel(model.device)
        return InferencePrecision(model.dtype, None, f"an int8 model, kernel {kernel.name}", quantize="int8")
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
    if plan.quantize == "int8":
        return ComputeModels(plan, int8_model(model))
    main = model if model.dtype == plan.weights else cast_copy(model, plan.weights)
    fast = cast_copy(model, torch.bfloat16) if plan.bf16_min_tokens is not None else None
    return ComputeModels(plan, main, fast)


def int8_model(model: Transformer) -> Transformer:
    """`model` if it is already int8, else its int8 copy (`quant.int8_copy`, from fp32 weights: a model in
    another dtype is cast first). The copy shares the unquantized weights with `model`."""
    if is_quantized(model):
        return model
    return int8_copy(model if model.dtype == torch.float32 else cast_copy(model, torch.float32))


def cast_copy(model: Transformer, dtype: torch.dtype) -> Transformer:
    """A copy of `model` (in eval mode) with its weights in `dtype`; the router gate, its bias and the
    rope frequencies stay fp32. Built on the meta device and filled from the state dict, so the peak
    memory is the source plus the copy."""
    if is_quantized(model):
        raise ConfigError("an int8-quantized model computes in its own scheme: give it no precision "
                          "(or quantize after choosing one)")
    with torch.device("meta"):
        twin = Transformer(model.config)
    twin = twin.to(dtype=dtype).to_empty(device=model.device)
    twin.load_state_dict(model.state_dict())  # copy_ casts each tensor to the twin's dtype
    twin.rotary.inv_freq = model.rotary.inv_freq.detach().float().clone()  # not in the state dict
    twin.requires_grad_(False)
    return twin.eval()
