"""int8 weight-only quantization for CPU decoding (per-output-channel symmetric scales).

    from nanoseek.infer.quant import int8_copy
    q = int8_copy(model)          # int8 Linears and experts; embeddings, norms, gate shared with `model`

Decoding a batch of one reads every activated weight once per token; int8 weights are a quarter of
fp32's bytes. Three kernels compute x (M <= INT8PACK_MAX_ROWS, K) @ (q * scale)^T:

- `avx512`: nanoseek's own (int8_gemv.cpp, a torch C++ extension compiled on first use where a compiler
  is found; AVX-512 VNNI). Each activation row is quantized to int16 (error <= 2^-16 of its largest
  value), weights are widened to int16 and `vpdpwssd` accumulates in int32; at batch 1 each thread
  streams its rows of q sequentially with software prefetch. It reads int8 weights at 10-12 GB/s a
  core where int8pack reads 5-7 (1 GiB of 2816 x 2048 expert weights, 1 and 2 threads, an AMX Xeon),
  i.e. near the memory's speed, where torch's kernel is bound by its widening of int8 to bf16.
- `int8pack`: torch's weight-only `torch._weight_int8pack_mm(x_bf16 (M, K), q (N, K) int8, scales_bf16
  (N,))`: activations go to bf16 for it, its output comes back to fp32. With fp32 activations the same
  kernel runs 8-20x slower than fp32 on an AMX Xeon; with bf16 activations 1.6-2.2x fp32's GEMV on
  1024-8192-wide matrices (2 threads). It needs K % 16 == 0 (see INT8PACK_K_MULTIPLE).
- `dequant`: the weights dequantized per call and a dense matmul in the activations' dtype
  (`reference_matmul`, pure PyTorch: also CUDA, the path the tests check the others against, and the
  path of every matmul of more than INT8PACK_MAX_ROWS rows, prefill, where the dense GEMM wins).

A decoded token is ~1,100 small ops on bench-192m, so small models gain less than the GEMV
(docs/inference.md has the model-level numbers); a large MoE such as DeepSeek-V2-Lite is bound by the
weights' bytes and gains what the kernel gains.

Which kernel runs is chosen by a short probe, cached with the matmul probe (`nanoseek.precision.
cached_probe`): the fastest of those that compute correctly here on a decode-sized GEMV.
NANOSEEK_INT8_KERNEL=avx512|int8pack|dequant overrides the choice.

Kept in full precision: embeddings (a lookup), norms, the routing gate (a discrete choice), and
kv_b_proj (the absorbed MLA path reads its weight directly; it is small).
"""

from __future__ import annotations

import copy
import os
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..model import Transformer
from ..model.moe import FEW_PAIRS, RoutedExperts
from ..precision import cached_probe, machine_key

KEEP = ("kv_b_proj",)
KERNELS = ("avx512", "int8pack", "dequant")
KERNEL_ENV = "NANOSEEK_INT8_KERNEL"  # avx512 | int8pack | dequant: skip the probe
FAST = ("avx512", "int8pack")  # the kernels for few rows; more take the dequantizing path
INT8PACK_MAX_ROWS = 16  # more rows per matmul (prefill) take the dequantizing path
# _weight_int8pack_mm's AVX512 kernel walks K in steps of 16 with aligned vector loads and no tail: for
# K % 16 != 0 it reads past each row (wrong outputs) or faults on a misaligned load (measured: K = 40
# gave garbage, then a segfault). Such matmuls take the dequantizing path; inputs are copied to
# 64-byte-aligned memory when they are not.
INT8PACK_K_MULTIPLE = 16
PROBE_SHAPE = (2048, 1024)  # the probe's weight (out, in): 2 MiB of int8, a decode-sized GEMV


def quantize_rows(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """w: (..., out, in) -> int8 q of the same shape and scales (..., out): w ~= q * scale.
    (One fp32 copy of w, worked on in place: about half the time of fresh tensors per step.)"""
    wf = w.detach().to(torch.float32, copy=True)
    scale = wf.abs().amax(dim=-1).clamp_(min=1e-12).div_(127.0)
    q = wf.div_(scale.unsqueeze(-1)).round_().clamp_(-127, 127).to(torch.int8)
    return q, scale


QUANTIZE_CHUNK = 1 << 16  # elements quantized at once by quantize_rows_into (fp32 temporaries in L2)


@torch.no_grad()
def quantize_rows_into(w: torch.Tensor, q: torch.Tensor, scale: torch.Tensor,
                       scale_bf16: torch.Tensor | None = None) -> None:
    """quantize_rows(w) written into q (out, in) int8, scale (out,) and scale_bf16 (out,), a block of
    rows at a time, so the fp32 temporaries stay near QUANTIZE_CHUNK elements whatever w's size (w may
    be bf16: the rows are quantized from their exact fp32 values, bit for bit as quantize_rows)."""
    rows = max(1, QUANTIZE_CHUNK // max(1, w.shape[-1]))
    for i in range(0, w.shape[0], rows):
        qi, si = quantize_rows(w[i:i + rows])
        q[i:i + rows] = qi
        scale[i:i + rows] = si
        if scale_bf16 is not None:
            scale_bf16[i:i + rows] = si.bfloat16()


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """q (..., out, in) int8, scale (..., out) -> the weights q * scale in `dtype`."""
    return q.to(dtype) * scale.to(dtype).unsqueeze(-1)


def reference_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x (M, in) @ (q * scale)^T in x's dtype: the pure-PyTorch path (dequantize, then matmul)."""
    return F.linear(x, dequantize(q, scale, x.dtype))


# ---- the kernel choice ---------------------------------------------------------------------------
@dataclass(frozen=True)
class Int8Kernel:
    """`name`: avx512 | int8pack | dequant; `reason`: why (the probe's timings, the device, or the override)."""

    name: str
    reason: str


_KERNEL: dict[str, Int8Kernel] = {}


def int8_kernel(device: str | torch.device = "cpu") -> Int8Kernel:
    """The kernel int8 matmuls of few rows take on `device` (probed once per device type and thread
    count; the timings are cached on disk)."""
    device = torch.device(device)
    forced = os.environ.get(KERNEL_ENV) or None
    if forced is not None and forced not in KERNELS:
        raise ConfigError(f"{KERNEL_ENV}={forced!r}: expected one of {', '.join(KERNELS)} (or unset: the probe picks)")
    if forced == "avx512" and (device.type != "cpu" or avx512_extension() is None):
        return Int8Kernel("dequant", f"{KERNEL_ENV}=avx512, but the AVX-512 extension is unavailable here")
    if forced in KERNELS:
        return Int8Kernel(forced, f"{KERNEL_ENV}={forced}")
    key = f"{device.type}|{torch.get_num_threads()}"
    if key not in _KERNEL:
        _KERNEL[key] = _choose_kernel(device)
    return _KERNEL[key]


def _choose_kernel(device: torch.device) -> Int8Kernel:
    if device.type != "cpu":
        return Int8Kernel("dequant", f"no int8 weight-only kernel is probed on {device.type}")
    names = [name for name, works in (("avx512", avx512_works), ("int8pack", int8pack_works)) if works()]
    t = {name: _probe_seconds(name) for name in ("fp32", *names, "dequant")}
    name = min(("dequant", *names), key=t.get)
    missing = "" if names else "; torch._weight_int8pack_mm and the AVX-512 extension are missing or wrong here"
    return Int8Kernel(name, "probe: " + ", ".join(f"{k} GEMV {t['fp32'] / t[k]:.2f}x fp32's"
                                                  for k in (*names, "dequant")) + missing)


def int8pack_works() -> bool:
    """Whether torch._weight_int8pack_mm runs here and agrees with reference_matmul (odd sizes)."""
    if not hasattr(torch, "_weight_int8pack_mm"):
        return False
    g = torch.Generator().manual_seed(0)
    q, scale = quantize_rows(torch.randn(24, 48, generator=g))
    x = torch.randn(3, 48, generator=g).bfloat16()
    try:
        got = torch._weight_int8pack_mm(x, q, scale.bfloat16()).float()
    except (RuntimeError, NotImplementedError):
        return False
    want = reference_matmul(x.float(), q, scale)
    return got.shape == want.shape and bool(torch.allclose(got, want, rtol=0.02, atol=0.02 * want.abs().max()))


# ---- the AVX-512 kernel: a small C++ extension (int8_gemv.cpp), built on first use -------------------
_EXTENSION: list = []  # [the module or None], once tried


def avx512_extension():
    """The compiled int8 GEMV (nanoseek/infer/int8_gemv.cpp: activations quantized per row to int16,
    int8 weights widened to int16, AVX-512 VNNI dot products), or None where it does not build (no
    compiler) or the CPU lacks AVX-512 VNNI. Built once per machine by torch.utils.cpp_extension (cached
    in its build folder)."""
    if not _EXTENSION:
        _EXTENSION.append(_build_extension())
    return _EXTENSION[0]


def _build_extension():
    import warnings
    from pathlib import Path
    try:
        from torch.utils.cpp_extension import load
        _put_ninja_on_path()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ext = load(name="nanoseek_int8_gemv", sources=[str(Path(__file__).with_name("int8_gemv.cpp"))],
                       extra_cflags=["-O3", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
        return ext if ext.vnni_supported() else None
    except Exception:  # no compiler or ninja, a failed build: the other kernels remain
        return None


def _put_ninja_on_path() -> None:
    """torch.utils.cpp_extension runs `ninja` from PATH; the pip package (a dependency) puts it in the
    environment's bin folder, which is not on PATH when the venv's python runs without activation."""
    import os
    import shutil
    if shutil.which("ninja") is None:
        try:
            import ninja
        except ImportError:
            return
        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + os.environ.get("PATH", "")


def avx512_works() -> bool:
    """Whether the AVX-512 extension is here and agrees with reference_matmul (odd sizes, a K tail)."""
    ext = avx512_extension()
    if ext is None:
        return False
    g = torch.Generator().manual_seed(0)
    q, scale = quantize_rows(torch.randn(37, 56, generator=g))
    x = torch.randn(3, 56, generator=g)
    got, want = ext.int8_gemv(x, q, scale), reference_matmul(x, q, scale)
    return got.shape == want.shape and bool(torch.allclose(got, want, rtol=1e-3, atol=1e-3 * want.abs().max()))


def _probe_seconds(name: str) -> float:
    """Median seconds of one (1, in) x PROBE_SHAPE matmul by `name` (fp32 | int8pack | dequant), cached."""
    N, K = PROBE_SHAPE
    key = f"{machine_key()}|int8_gemv={name}|shape={N}x{K}"
    return cached_probe(key, "seconds_per_call", lambda: _time_gemv(name, N, K))


def _time_gemv(name: str, N: int, K: int, seconds: float = 0.15) -> float:
    g = torch.Generator().manual_seed(0)
    w = torch.randn(N, K, generator=g)
    x = torch.randn(1, K, generator=g)
    q, scale = quantize_rows(w)
    sb = scale.bfloat16()
    run = {"fp32": lambda: F.linear(x, w),
           "avx512": lambda: avx512_extension().int8_gemv(x, q, scale),
           "int8pack": lambda: torch._weight_int8pack_mm(x.bfloat16(), q, sb).float(),
           "dequant": lambda: reference_matmul(x, q, scale)}[name]
    run()
    times, start = [], time.perf_counter()
    while time.perf_counter() - start < seconds or len(times) < 5:
        t0 = time.perf_counter()
        run()
        times.append(time.perf_counter() - t0)
    return max(statistics.median(times), 1e-9)


# ---- matmuls -------------------------------------------------------------------------------------
def int8_matmul(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, scale_bf16: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x (..., in) @ (q * scale)^T -> (..., out) in out_dtype (default x's): the probed kernel for
    up to INT8PACK_MAX_ROWS rows, else reference_matmul."""
    flat = x.reshape(-1, x.shape[-1])
    out_dtype = out_dtype or x.dtype
    kernel = int8_kernel(x.device).name if flat.shape[0] <= INT8PACK_MAX_ROWS else "dequant"
    if kernel == "avx512":
        out = avx512_extension().int8_gemv(flat.float(), q, scale).to(out_dtype)
    elif kernel == "int8pack" and int8pack_fits(q):
        sb = scale_bf16 if scale_bf16 is not None else scale.bfloat16()
        out = torch._weight_int8pack_mm(aligned_bf16(flat), q, sb).to(out_dtype)
    else:
        out = reference_matmul(flat, q, scale).to(out_dtype)
    return out.view(*x.shape[:-1], q.shape[0])


def fast_kernel(device: torch.device, *weights: torch.Tensor) -> str | None:
    """The few-row kernel that runs these int8 weights on `device`: avx512 (any shape), int8pack (where
    every weight fits it, `int8pack_fits`), or None (the dequantizing path)."""
    name = int8_kernel(device).name
    if name == "avx512" or (name == "int8pack" and all(int8pack_fits(w) for w in weights)):
        return name
    return None


def int8pack_fits(q: torch.Tensor) -> bool:
    """Whether _weight_int8pack_mm can take the weight q (out, in): in % 16 == 0, contiguous, aligned."""
    return q.shape[-1] % INT8PACK_K_MULTIPLE == 0 and q.is_contiguous() and q.data_ptr() % 16 == 0


def aligned_bf16(x: torch.Tensor) -> torch.Tensor:
    """x as a contiguous bf16 tensor whose data starts on a 64-byte boundary (the kernel's loads)."""
    x = x.to(torch.bfloat16)
    return x if x.data_ptr() % 64 == 0 and x.is_contiguous() else x.clone(memory_format=torch.contiguous_format)


class Int8Linear(nn.Module):
    """A bias-optional Linear with int8 weights `q` (out, in) and fp32 per-row `scale` (out,)."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        q, scale = quantize_rows(linear.weight)
        self.register_buffer("q", q)
        self.register_buffer("scale", scale)
        self.register_buffer("scale_bf16", scale.bfloat16(), persistent=False)  # the kernel's scales
        self.bias = linear.bias
        self._fast = None  # the few-row kernel of this weight (decided on the first forward, again after _apply)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        K = x.shape[-1]
        if self._fast is None:
            self._fast = fast_kernel(x.device, self.q) or ""
        if self._fast and x.numel() <= INT8PACK_MAX_ROWS * K:  # decoding: 3-5 ops, as lean as it gets
            if self._fast == "avx512":
                out = _EXTENSION[0].int8_gemv(x.reshape(-1, K).float(), self.q, self.scale)
            else:
                out = torch._weight_int8pack_mm(aligned_bf16(x).view(-1, K), self.q, self.scale_bf16)
            out = out.view(*x.shape[:-1], -1).to(x.dtype)
        else:
            out = int8_matmul(x, self.q, self.scale, self.scale_bf16)
        return out if self.bias is None else out + self.bias

    def _apply(self, fn, recurse=True):
        self._fast = None
        return super()._apply(fn, recurse)


class Int8RoutedExperts(RoutedExperts):
    """Stacked experts with int8 weights; the sorted dropless dispatch of RoutedExperts, and for one
    or two decoded tokens two kernel calls per selected expert (avx512: fp32 rows, int8pack: bf16)."""

    def __init__(self, experts: RoutedExperts):
        nn.Module.__init__(self)
        self.n_experts = experts.n_experts
        self.intermediate_size = experts.intermediate_size
        for name in ("gate_up", "down"):
            q, s = quantize_rows(getattr(experts, name))
            self.register_buffer(f"{name}_q", q)  # (E, out, in) int8
            self.register_buffer(f"{name}_scale", s)  # (E, out) fp32
            self.register_buffer(f"{name}_scale_bf16", s.bfloat16(), persistent=False)

    def expert(self, x: torch.Tensor, e: int, out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """Expert e on rows x (R, D) -> (R, D) in out_dtype (default x's)."""
        I = self.intermediate_size
        h = int8_matmul(x, self.gate_up_q[e], self.gate_up_scale[e], self.gate_up_scale_bf16[e])
        act = F.silu(h[:, :I]) * h[:, I:]
        return int8_matmul(act, self.down_q[e], self.down_scale[e], self.down_scale_bf16[e], out_dtype)

    def forward(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        N, k = indices.shape
        if N * k <= FEW_PAIRS:
            return self._few_pairs(x, indices, weights)
        flat = indices.flatten()
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.n_experts).tolist()
        x_sorted = x.index_select(0, order // k)
        if self._kernel(x) == "int8pack":  # bf16 once; each expert's block of rows stays 32-byte aligned (D % 16 == 0)
            pairs = zip(aligned_bf16(x_sorted).split(counts), x_sorted.split(counts))
            outs = [self._fast_expert(b16, e) if len(b16) <= INT8PACK_MAX_ROWS
                    else self.expert(b32, e, out_dtype=torch.bfloat16)  # many rows: the dense GEMM in x's dtype
                    for e, (b16, b32) in enumerate(pairs) if len(b16)]
        else:
            outs = [self.expert(block, e) for e, block in enumerate(x_sorted.split(counts)) if block.shape[0]]
        out = torch.cat(outs).index_select(0, order.argsort()).view(N, k, -1)
        return (out * weights.to(out.dtype).unsqueeze(-1)).sum(dim=1).to(x.dtype)

    def _fast_expert(self, x: torch.Tensor, e: int) -> torch.Tensor:
        """Expert e on rows x (R <= INT8PACK_MAX_ROWS, D) -> (R, D): two kernel calls. int8pack: bf16
        rows, 32-byte aligned, out bf16; avx512: fp32 rows, out fp32."""
        I = self.intermediate_size
        gate_up, gate_up_s, down, down_s = self._views()
        if self._fast == "avx512":
            h = _EXTENSION[0].int8_gemv(x, gate_up[e], gate_up_s[e])  # (R, 2I)
            return _EXTENSION[0].int8_gemv(F.silu(h[:, :I]) * h[:, I:], down[e], down_s[e])
        h = torch._weight_int8pack_mm(x, gate_up[e], gate_up_s[e])  # (R, 2I)
        return torch._weight_int8pack_mm(F.silu(h[:, :I]) * h[:, I:], down[e], down_s[e])

    def _few_pairs(self, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """Decoding one or two tokens: each (token, expert) pair on its own, accumulated into the output
        with its routing weight. With a fast kernel each pair is two kernel calls on per-expert views made
        once (5 ops a pair, as few as the fp32 path's); int8pack takes the tokens in bf16, made once."""
        y = torch.zeros_like(x)
        kernel = self._kernel(x)
        if kernel is None:
            for n, (chosen, ws) in enumerate(zip(indices.tolist(), weights.tolist())):
                for e, w in zip(chosen, ws):
                    y[n:n + 1].add_(self.expert(x[n:n + 1], e), alpha=w)
            return y
        # int8pack: rows of D % 16 == 0 bf16 values, so each row is 32-byte aligned too
        xb = aligned_bf16(x) if kernel == "int8pack" else x.float()
        for n, (chosen, ws) in enumerate(zip(indices.tolist(), weights.tolist())):
            xn, yn = xb[n:n + 1], y[n:n + 1]
            for e, w in zip(chosen, ws):
                yn.add_(self._fast_expert(xn, e), alpha=w)
        return y

    def _kernel(self, x: torch.Tensor) -> str | None:
        """The few-row kernel of these experts (`fast_kernel`; decided on first use, again after _apply)."""
        if getattr(self, "_fast", None) is None:
            self._fast = fast_kernel(x.device, self.gate_up_q[0], self.down_q[0]) or ""
        return self._fast or None

    def _views(self) -> tuple:
        """Per-expert views of the int8 weights and the kernel's scales (bf16 for int8pack, fp32 for
        avx512; lists: no indexing op per call), made on first use and again after the buffers move."""
        if getattr(self, "_expert_views", None) is None:
            suffix = "_scale" if self._fast == "avx512" else "_scale_bf16"
            self._expert_views = tuple(list(getattr(self, name).unbind(0)) for name in (
                "gate_up_q", "gate_up" + suffix, "down_q", "down" + suffix))
        return self._expert_views

    def _apply(self, fn, recurse=True):
        self._expert_views = self._fast = None
        return super()._apply(fn, recurse)


# ---- whole models --------------------------------------------------------------------------------
def forget_kernel_choice(model: nn.Module) -> None:
    """Make every int8 module choose its kernel again on its next forward (after NANOSEEK_INT8_KERNEL
    changed: bench/v2lite.py times the kernels in turn on one model)."""
    for m in model.modules():
        if isinstance(m, (Int8Linear, Int8RoutedExperts)):
            m._fast = None
            m._expert_views = None


def is_quantized(model: nn.Module) -> bool:
    return any(isinstance(m, (Int8Linear, Int8RoutedExperts)) for m in model.modules())


def _int8_replacements(model: nn.Module) -> dict[nn.Module, nn.Module]:
    """{module: its int8 version} for every Linear (but KEEP) and every routed-experts block."""
    out = {}
    for module in model.modules():
        for child_name, child in module.named_children():
            if isinstance(child, nn.Linear) and child_name not in KEEP:
                out[child] = Int8Linear(child)
            elif isinstance(child, RoutedExperts) and not isinstance(child, Int8RoutedExperts):
                out[child] = Int8RoutedExperts(child)
    return out


@torch.no_grad()
def quantize_int8(model: Transformer) -> Transformer:
    """Replace, in place, every Linear (but KEEP) and the routed experts with int8 weight-only versions.
    For inference only: the quantized model has no trainable weights there."""
    swaps = _int8_replacements(model)
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if child in swaps:
                setattr(module, child_name, swaps[child])
    return model


@torch.no_grad()
def int8_copy(model: Transformer) -> Transformer:
    """An int8 version of `model` (unchanged) in eval mode: its quantized modules are new, every other
    parameter and buffer (embeddings, norms, gate, kv_b_proj) is shared, not copied. Peak memory: the
    model plus its int8 weights; drop `model` to free its full-precision Linears."""
    memo = {id(t): t for t in [*model.parameters(), *model.buffers()]}
    memo.update({id(old): new for old, new in _int8_replacements(model).items()})
    return copy.deepcopy(model, memo).eval()
