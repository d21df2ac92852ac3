"""Training cost before a run: device peaks, FLOPs per token, published figures, estimates and their
table, the CPU's peak comes from the
cached matmul probe in nanoseek/precision.py.

FLOP convention (one multiply-add = 2 FLOPs; training = forward + backward = 3 x forward), per token:
- matmul     6 x the main model's activated matmul parameters, output head excluded: params'
             `count_parameters(...).activated` minus the head (counted below) minus RMSNorm weights
             (elementwise, not matmuls). Routed experts count top_k / n_routed of their weights; the
             gate's D x E projection counts; the embedding lookup does not.
- head       6 x vocab x hidden: logits for every token.
- attention  the score matmuls, which have no parameters: per layer, QK^T is 2*H*S*qk_head_dim and AV
             2*H*S*v_head_dim forward FLOPs for a token attending S keys. Causal (the default) counts
             the S/2 keys a token attends on average in a sequence of S, as FlashAttention-style
             kernels compute; `causal=False` counts all S, as DeepSeek LLM's 12*L*d*l_seq does.
- mtp        each multi-token-prediction module: 6 x (eh_proj + its block's activated matmul params +
             head) + its layer's attention term. Every token is counted at every depth (depth k really
             sees S - k positions of a sequence of S). `include_mtp=False` leaves it out.
Not counted: elementwise work (norms, RoPE, SwiGLU's product, softmax, routing top-k), the optimizer.

DeepSeek-V3 (seq 4096, causal, MTP): 2.61e11 FLOPs per token, 1.19x the plain 6N (N = 36.6B activated);
the utilisation implied by the published 2.664M H800-hours is then 0.407 (0.343 for 6ND alone, 0.455
with full non-causal attention).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..config import ModelConfig
from ..errors import ConfigError
from ..model import RMSNorm, RoutedExperts, Transformer
from ..params import count_parameters, meta_model
from ..precision import dtype_name, measure_matmul_peak

DEFAULT_SEQ_LEN = 4096  # DeepSeek-V3 pretraining sequence length (before context extension)
DEFAULT_USD_PER_HOUR = 2.0  # DeepSeek-V3's assumed H800 rental price
SECONDS_PER_HOUR = 3600.0


# ---- devices -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Device:
    """A device kind and its datasheet peaks (dense, no sparsity): `peak_flops` for bf16 on the tensor
    cores, `peak_fp32` for plain fp32 (torch's default float32 matmul precision uses no TF32); None
    where it is measured instead (the CPU: the matmul probe of nanoseek.precision)."""

    key: str
    name: str
    peak_flops: float | None
    peak_fp32: float | None = None

    def peak(self, dtype: torch.dtype) -> float | None:
        """The datasheet peak for matmuls in `dtype` (bf16 / fp16: tensor cores, else fp32)."""
        return self.peak_flops if dtype in (torch.bfloat16, torch.float16) else self.peak_fp32


GPUS: dict[str, Device] = {d.key: d for d in (
    Device("h800", "NVIDIA H800 SXM", 989e12, 67e12),  # the H100 SXM compute die with NVLink cut down
    Device("h100", "NVIDIA H100 SXM", 989e12, 67e12),
    Device("h200", "NVIDIA H200 SXM", 989e12, 67e12),  # H100's compute, more and faster memory
    Device("a100", "NVIDIA A100", 312e12, 19.5e12),
    Device("b200", "NVIDIA B200", 2250e12, 80e12),
    Device("cpu", "CPU (measured matmul peak)", None),
)}
CUDA_PROBE_SIZE = 4096  # the matmul an unknown GPU's peak is measured with


def lookup_gpu(gpu: str) -> Device:
    """The table entry for `gpu` (case-insensitive key such as 'h800'); ConfigError lists the known ones."""
    key = str(gpu).strip().lower()
    if key not in GPUS:
        raise ConfigError(f"unknown gpu {gpu!r}; known gpus: {', '.join(GPUS)}")
    return GPUS[key]


def gpu_key_for_name(device_name: str) -> str | None:
    """Map a CUDA device name ('NVIDIA H100 80GB HBM3') to a table key ('h100'), or None."""
    upper = device_name.upper()
    for key in GPUS:
        if key != "cpu" and key.upper() in upper:
            return key
    return None


def device_peak(device: str, dtype: torch.dtype = torch.float32) -> tuple[Device, float, str]:
    """(table entry, peak FLOP/s per device, where the peak comes from) for matmuls in `dtype` (the
    precision the run computes in: fp32, or bf16 under autocast) on a device kind.

    'cpu' measures a `dtype` matmul (cached); a table key ('h100') reads the datasheet; 'cuda' or
    'cuda:N' recognises the local GPU by name, and a GPU the table does not know (RTX 4090, L40S, A10G)
    has its `dtype` matmul peak measured on the spot: never an error (a recipe's `peak_flops`, given to
    CostMeter, overrides all of these).
    """
    kind = str(device).strip().lower()
    if kind.startswith("cuda"):
        name = torch.cuda.get_device_name(torch.device(kind)) if torch.cuda.is_available() else "none"
        key = gpu_key_for_name(name)
        if key is None:
            return (Device("cuda", name, None), measure_cuda_matmul_peak(dtype, kind),
                    f"measured {dtype_name(dtype)} matmul probe ({name} is not in the datasheet table)")
        kind = key
    entry = lookup_gpu(kind)
    peak = entry.peak(dtype)
    if peak is None:
        return entry, measure_matmul_peak(dtype), f"measured {dtype_name(dtype)} matmul probe"
    return entry, peak, f"datasheet dense {'bf16' if dtype in (torch.bfloat16, torch.float16) else 'fp32'}"


def measure_cuda_matmul_peak(dtype: torch.dtype, device: str = "cuda", size: int = CUDA_PROBE_SIZE,
                             repeats: int = 20) -> float:
    """FLOP/s of the fastest of `repeats` size x size `dtype` matmuls on a CUDA device (timed with
    events after a warm-up; about a second)."""
    dev = torch.device(device)
    a = torch.randn(size, size, device=dev, dtype=dtype)
    b = torch.randn(size, size, device=dev, dtype=dtype)
    out = a @ b
    best = 0.0
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        torch.matmul(a, b, out=out)
        end.record()
        end.synchronize()
        best = max(best, 2 * size ** 3 / max(start.elapsed_time(end) / 1e3, 1e-9))
    return best


# ---- FLOPs per token -----------------------------------------------------------------------------
@dataclass(frozen=True)
class FlopsPerToken:
    """Training FLOPs per token by part (see the module docstring for what each counts)."""

    matmul: int  # 6 x main-model activated matmul params, head excluded
    head: int  # 6 x vocab x hidden
    attention: int  # QK^T and AV of every main-model layer, x3 for forward + backward
    mtp: int  # MTP modules (0 when excluded or absent)
    seq_len: int
    causal: bool
    include_mtp: bool
    matmul_params: int  # activated matmul params of the main model, head included (matmul + head = 6x this)
    mtp_params: int  # activated matmul params of the MTP modules, the shared head included once per module
    activated_params: int  # count_parameters(...).activated: the N of the simple 6N
    total_params: int  # count_parameters(...).total

    @property
    def total(self) -> int:
        return self.matmul + self.head + self.attention + self.mtp

    @property
    def six_n(self) -> int:
        """The simple 6N per token (N = activated params): attention and MTP excluded."""
        return 6 * self.activated_params

    def as_dict(self) -> dict:
        return {**asdict(self), "total": self.total, "six_n": self.six_n}


def flops_per_token(config: ModelConfig, seq_len: int = DEFAULT_SEQ_LEN, *, causal: bool = True,
                    include_mtp: bool = True) -> FlopsPerToken:
    """Training FLOPs per token of `config` for sequences of `seq_len` tokens (built on meta, ~2 s for V3)."""
    seq_len = _positive_int("seq_len", seq_len)
    model = meta_model(config)
    counts = count_parameters(model)
    head_params = config.vocab_size * config.hidden_size
    matmul_params = counts.activated - _norm_weights(model)  # head included, norms not
    mtp_params = sum(_activated_matmul(m, config) + head_params for m in model.mtp) if include_mtp else 0
    n_mtp = len(model.mtp) if include_mtp else 0
    return FlopsPerToken(
        matmul=6 * (matmul_params - head_params),
        head=6 * head_params,
        attention=attention_flops_per_token(config, seq_len, causal=causal),
        mtp=6 * mtp_params + n_mtp * attention_flops_per_token(config, seq_len, causal=causal, layers=1),
        seq_len=seq_len, causal=causal, include_mtp=include_mtp,
        matmul_params=matmul_params, mtp_params=mtp_params,
        activated_params=counts.activated, total_params=counts.total,
    )


def attention_flops_per_token(config: ModelConfig, seq_len: int, *, causal: bool = True,
                              layers: int | None = None) -> int:
    """3 (fwd+bwd) x layers x 2*H*S*(qk_head_dim + v_head_dim), halved when causal (S/2 keys on average)."""
    layers = config.num_hidden_layers if layers is None else layers
    full = 3 * layers * 2 * config.num_attention_heads * seq_len * (config.qk_head_dim + config.v_head_dim)
    return full // 2 if causal else full


def six_nd(config: ModelConfig, tokens: float) -> float:
    """The simple 6 x N x D with N = count_parameters(config).activated (no attention, no MTP)."""
    return 6 * count_parameters(config).activated * _non_negative("tokens", tokens)


def deepseek_llm_flops_per_token(num_layers: int, hidden_size: int, seq_len: int) -> int:
    """DeepSeek LLM's non-embedding training FLOPs per token of a dense model: 72*L*d^2 + 12*L*d*l_seq
    (6 x 12*L*d^2 params of a standard block, plus full, non-causal attention scores)."""
    return 72 * num_layers * hidden_size ** 2 + 12 * num_layers * hidden_size * seq_len


def _norm_weights(model: Transformer) -> int:
    """RMSNorm weights of the main model (MTP excluded): counted by `activated` but not matmuls."""
    return sum(_own_params(m) for name, m in model.named_modules()
               if isinstance(m, RMSNorm) and not name.startswith("mtp."))


def _activated_matmul(module: nn.Module, config: ModelConfig) -> int:
    """Matmul params one token uses in `module`: norms skipped, routed experts top_k / n_routed."""
    n = 0
    for m in module.modules():
        if isinstance(m, RMSNorm):
            continue
        own = _own_params(m)
        n += own // config.n_routed_experts * config.num_experts_per_tok if isinstance(m, RoutedExperts) else own
    return n


def _own_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters(recurse=False))


# ---- published figures ---------------------------------------------------------------------------
@dataclass(frozen=True)
class PublishedCost:
    """A published training cost to compare an estimate with."""

    model: str
    source: str
    preset: str  # the nanoseek preset of the same architecture
    tokens: float
    gpu: str  # key into GPUS
    gpu_hours: float  # the stage compared: pretraining
    usd_per_gpu_hour: float
    usd: float
    n_gpus: int
    seq_len: int
    activated_params: float  # as published (rounded)
    total_params: float
    stages_gpu_hours: dict  # every stage of the report's table

    def as_dict(self) -> dict:
        return asdict(self)


DEEPSEEK_V3 = PublishedCost(
    model="DeepSeek-V3", source="DeepSeek-V3 Technical Report, Table 1 (pretraining stage)",
    preset="deepseek-v3", tokens=14.8e12, gpu="h800", gpu_hours=2_664_000, usd_per_gpu_hour=2.0,
    usd=5.328e6, n_gpus=2048, seq_len=4096, activated_params=37e9, total_params=671e9,
    stages_gpu_hours={"pretraining": 2_664_000, "context extension": 119_000, "post-training": 5_000,
                      "total": 2_788_000},
)
DEEPSEEK_V3_TOTAL_USD = 5.576e6  # all three stages at $2/GPU-hour
PUBLISHED: dict[str, PublishedCost] = {DEEPSEEK_V3.preset: DEEPSEEK_V3}


def implied_mfu(flops: ModelConfig | FlopsPerToken, published: PublishedCost = DEEPSEEK_V3, *,
                causal: bool = True, include_mtp: bool = True) -> float:
    """The utilisation at which our FLOP count reproduces the published GPU-hours:
    FLOPs/token x tokens / (GPU-hours x 3600 x peak). A config is counted at the published seq_len."""
    if isinstance(flops, ModelConfig):
        flops = flops_per_token(flops, published.seq_len, causal=causal, include_mtp=include_mtp)
    peak = lookup_gpu(published.gpu).peak_flops
    return flops.total * published.tokens / (published.gpu_hours * SECONDS_PER_HOUR * peak)


# DeepSeek-V3's implied utilisation under the default counting (seq 4096, causal attention, MTP),
# 0.4067, rounded; 6ND alone gives 0.343. tests/test_cost.py keeps this in step with implied_mfu.
DEFAULT_MFU = 0.41


# ---- estimates -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class CostEstimate:
    """What training `tokens` tokens of a config costs on `n_gpus` devices at utilisation `mfu`."""

    label: str
    tokens: float
    gpu: str
    gpu_name: str
    peak_flops: float  # per device
    peak_source: str
    mfu: float
    usd_per_hour: float  # per device-hour
    n_gpus: int
    flops: FlopsPerToken

    @property
    def training_flops(self) -> float:
        return self.flops.total * self.tokens

    @property
    def gpu_hours(self) -> float:
        return self.training_flops / (self.peak_flops * self.mfu) / SECONDS_PER_HOUR

    @property
    def usd(self) -> float:
        return self.gpu_hours * self.usd_per_hour

    @property
    def days(self) -> float:
        """Wall-clock days on n_gpus devices."""
        return self.gpu_hours / self.n_gpus / 24

    def as_dict(self) -> dict:
        return {**asdict(self), "flops": self.flops.as_dict(), "training_flops": self.training_flops,
                "gpu_hours": self.gpu_hours, "usd": self.usd, "days": self.days}


def estimate(config: ModelConfig, tokens: float, gpu: str = "h800", mfu: float = DEFAULT_MFU,
             usd_per_hour: float = DEFAULT_USD_PER_HOUR, seq_len: int = DEFAULT_SEQ_LEN, *,
             n_gpus: int = 1, causal: bool = True, include_mtp: bool = True,
             peak_flops: float | None = None, label: str = "", dtype: torch.dtype | None = None) -> CostEstimate:
    """FLOPs, GPU-hours, dollars and days to train `config` on `tokens` tokens.

    `gpu` is a key of GPUS ('cpu' measures this machine); `peak_flops` overrides the table's peak
    (the gpu name then only labels it). `mfu` in (0, 1]: DEFAULT_MFU is DeepSeek-V3's implied one.
    dtype: the training precision whose peak counts (default bf16 on GPUs, as DeepSeek trains; fp32
    on 'cpu').
    """
    tokens = _non_negative("tokens", tokens)
    if isinstance(mfu, bool) or not isinstance(mfu, (int, float)) or not 0 < mfu <= 1:
        raise ConfigError(f"invalid cost field 'mfu': must be in (0, 1] (got {mfu!r})")
    usd_per_hour = _non_negative("usd_per_hour", usd_per_hour)
    n_gpus = _positive_int("n_gpus", n_gpus)
    if peak_flops is None:
        if dtype is None:
            dtype = torch.float32 if str(gpu).strip().lower() == "cpu" else torch.bfloat16
        entry, peak, source = device_peak(gpu, dtype)
    else:
        entry = GPUS.get(str(gpu).lower(), Device(str(gpu), str(gpu), None))
        peak, source = _positive("peak_flops", peak_flops), "given"
    return CostEstimate(label=label, tokens=tokens, gpu=entry.key, gpu_name=entry.name, peak_flops=peak,
                        peak_source=source, mfu=float(mfu), usd_per_hour=usd_per_hour, n_gpus=n_gpus,
                        flops=flops_per_token(config, seq_len, causal=causal, include_mtp=include_mtp))


def format_cost_table(est: CostEstimate, published: PublishedCost | None = None) -> str:
    """A Markdown table of the estimate, beside `published` when given (with their ratio), then the
    FLOPs-per-token breakdown. README-ready; the CLI prints it as is."""
    f = est.flops
    title = f"Training cost of {est.label or 'this config'}"
    rows = [
        ("params (activated / total)", f"{_si(f.activated_params)} / {_si(f.total_params)}",
         published and f"{_si(published.activated_params)} / {_si(published.total_params)}", None),
        ("tokens", _si(est.tokens), published and _si(published.tokens), None),
        ("FLOPs per token", f"{f.total:.3g}", None, None),
        ("training FLOPs", f"{est.training_flops:.3g}", None, None),
        ("6ND (6 x activated x tokens)", f"{f.six_n * est.tokens:.3g}",
         published and f"{6 * published.activated_params * published.tokens:.3g}", None),
        ("device", f"{est.n_gpus:,} x {est.gpu_name}", published and f"{published.n_gpus:,} x "
         f"{lookup_gpu(published.gpu).name}", None),
        ("peak per device", f"{est.peak_flops / 1e12:,.0f} TFLOP/s ({est.peak_source})", None, None),
        ("MFU", f"{est.mfu:.3f}", published and f"{implied_mfu(f, published):.3f} (implied)", None),
        ("GPU-hours", _si(est.gpu_hours), published and _si(published.gpu_hours),
         published and est.gpu_hours / published.gpu_hours),
        (f"cost at ${est.usd_per_hour:g}/GPU-hour", f"${_si(est.usd)}", published and f"${_si(published.usd)}",
         published and est.usd / published.usd),
        (f"days on {est.n_gpus:,} GPUs", f"{est.days:,.1f}",
         published and f"{published.gpu_hours / est.n_gpus / 24:,.1f}", None),
    ]
    if published:
        head = [f"| | nanoseek | {published.model} (published) | ratio |", "|---|---:|---:|---:|"]
        body = [f"| {name} | {ours} | {theirs or ''} | {'' if ratio is None else f'{ratio:.3f}'} |"
                for name, ours, theirs, ratio in rows]
        note = [f"Published: {published.source}. Derived from it: 6ND (6 x published activated x tokens), "
                f"days (GPU-hours / GPUs) and the MFU (implied by our FLOP count)."]
    else:
        head = ["| | nanoseek |", "|---|---:|"]
        body = [f"| {name} | {ours} |" for name, ours, _, _ in rows]
        note = []
    return "\n".join([title, "", *head, *body, "", *note, *_breakdown_lines(est)])


def _breakdown_lines(est: CostEstimate) -> list[str]:
    f = est.flops
    attention = "causal, S/2 keys" if f.causal else "full, S keys"
    parts = [
        (f"matmul: 6 x {_si(f.matmul_params - f.head // 6)} activated matmul params (head, norms excluded)",
         f.matmul),
        (f"output head: 6 x {_si(f.head // 6)}", f.head),
        (f"attention scores QK^T + AV ({attention}, seq_len {f.seq_len:,})", f.attention),
        (f"MTP modules: 6 x {_si(f.mtp_params)} + their attention" if f.include_mtp else "MTP (not counted)",
         f.mtp),
    ]
    lines = ["", "FLOPs per token (training = 3 x forward):"]
    lines += [f"  {name:<72} {n:>10.3g} {100 * n / f.total:>6.1f}%" for name, n in parts]
    lines.append(f"  {'total':<72} {f.total:>10.3g} {f.total / f.six_n:>6.3f}x of 6N")
    return lines


def _si(n: float) -> str:
    """1234567 -> '1.23M' (K, M, B, T by powers of 1000)."""
    for factor, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= factor:
            return f"{n / factor:.4g}{suffix}"
    return f"{n:.4g}"


# ---- helpers -------------------------------------------------------------------------------------
def _is_positive_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v > 0


def _non_negative(name: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
        raise ConfigError(f"invalid cost field '{name}': must be a non-negative number (got {v!r})")
    return v


def _positive(name: str, v) -> float:
    if not _is_positive_number(v):
        raise ConfigError(f"invalid cost field '{name}': must be a positive number (got {v!r})")
    return v


def _positive_int(name: str, v) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise ConfigError(f"invalid cost field '{name}': must be a positive integer (got {v!r})")
    return v
