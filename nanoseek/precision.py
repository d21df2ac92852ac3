"""Which precision a run computes in, chosen by a short cached probe, never by assumption.

    from nanoseek.precision import resolve_precision
    prec = resolve_precision("auto", "cpu")     # Precision(name='bf16', reason='bf16 matmul 3.9x fp32 ...')
    with prec.autocast("cpu"):
        loss = model(x)                          # bf16 matmuls, fp32 master weights

- `fp32`: the reference path (parity tests, CPUs without fast bf16).
- `bf16`: torch.autocast to bfloat16 around the forward; weights and optimizer state stay fp32.
- `auto`: bf16 on CUDA devices that support it; on a CPU, bf16 only where the matmul probe measures
  bf16 at least BF16_MIN_SPEEDUP x fp32 (AMX Xeons: ~4x; a CPU without AMX or AVX512-BF16 emulates bf16
  and is slower, so it gets fp32). NANOSEEK_BF16=0/1 overrides the probe's verdict for `auto`.

The probe times a 1024 x 1024 matmul per dtype for about a second and caches the result in
$NANOSEEK_CACHE_DIR (default ~/.cache/nanoseek)/matmul_peak.json, keyed by torch version, CPU model,
thread count, dtype and size, so each machine pays it once. cost/ reads the same probe for a CPU's peak.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import platform
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import torch

from .errors import ConfigError
from .runio import write_json_atomic

PRECISIONS = ("auto", "fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
BF16_MIN_SPEEDUP = 1.3  # auto takes bf16 on a CPU only where its matmul probe beats fp32 by this much
FORCE_ENV = "NANOSEEK_BF16"  # "1": auto picks bf16, "0": auto picks fp32 (the probe is not run)
CACHE_ENV = "NANOSEEK_CACHE_DIR"  # overrides ~/.cache/nanoseek
PROBE_FILE = "matmul_peak.json"
PROBE_SIZE = 1024

_clock = time.perf_counter  # the probe's timer (tests replace it)


@dataclass(frozen=True)
class Precision:
    """The precision a run computes in (`name`: fp32 | bf16), why it was chosen (`reason`) and whether
    `auto` chose it (`auto`)."""

    name: str
    reason: str
    auto: bool = False  # chosen by `auto` (the probe, the device or NANOSEEK_BF16), not asked for by name

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype of matmuls under `autocast` (weights stay fp32)."""
        return DTYPES[self.name]

    @property
    def is_bf16(self) -> bool:
        return self.name == "bf16"

    def autocast(self, device: str | torch.device = "cpu"):
        """A context manager: torch.autocast to bf16 on `device`'s type for bf16, nothing for fp32."""
        if not self.is_bf16:
            return contextlib.nullcontext()
        return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)

    def describe(self) -> str:
        return f"{self.name} ({self.reason})"

    def as_dict(self) -> dict:
        return {"precision": self.name, "reason": self.reason}


def check_precision(value: str, field: str = "precision") -> str:
    """`value` if it is one of PRECISIONS, else a ConfigError naming `field`."""
    if value not in PRECISIONS:
        raise ConfigError(f"invalid {field} {value!r}: choose one of {', '.join(PRECISIONS)}")
    return value


def resolve_precision(requested: str = "auto", device: str | torch.device = "cpu") -> Precision:
    """The Precision to run for `requested` (auto | fp32 | bf16) on `device`. fp32 and bf16 are taken
    as asked (bf16 on a CUDA device without bf16 support is a ConfigError); auto asks the device."""
    check_precision(requested)
    device = torch.device(device)
    if requested == "fp32":
        return Precision("fp32", "requested")
    if requested == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ConfigError(f"precision 'bf16' was requested but {torch.cuda.get_device_name(device)} "
                              "does not support bfloat16; use 'fp32' or 'auto'")
        return Precision("bf16", "requested")
    forced = os.environ.get(FORCE_ENV)
    if forced in ("0", "1"):
        return Precision("bf16" if forced == "1" else "fp32", f"auto: {FORCE_ENV}={forced}", auto=True)
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return Precision("bf16", f"auto: {torch.cuda.get_device_name(device)} supports bf16", auto=True)
        return Precision("fp32", f"auto: {torch.cuda.get_device_name(device)} has no bf16", auto=True)
    if device.type != "cpu":
        return Precision("fp32", f"auto: no bf16 probe for device type {device.type!r}", auto=True)
    speedup = bf16_speedup()
    verdict = "bf16" if speedup >= BF16_MIN_SPEEDUP else "fp32"
    return Precision(verdict, f"auto: bf16 matmul {speedup:.2f}x fp32 on this CPU "
                              f"({'>=' if verdict == 'bf16' else '<'} {BF16_MIN_SPEEDUP}x)", auto=True)


def bf16_speedup() -> float:
    """bf16 over fp32 matmul FLOP/s on this CPU (the cached probe; 0.0 where bf16 matmuls fail)."""
    fp32 = measure_matmul_peak(torch.float32, PROBE_SIZE)
    try:
        bf16 = measure_matmul_peak(torch.bfloat16, PROBE_SIZE)
    except RuntimeError:  # a build without bf16 matmul kernels
        return 0.0
    return bf16 / fp32


# ---- the cached matmul probe ---------------------------------------------------------------------
def measure_matmul_peak(dtype: torch.dtype = torch.float32, size: int = PROBE_SIZE, seconds: float = 1.0, *,
                        refresh: bool = False) -> float:
    """Peak FLOP/s of `size` x `size` torch.matmul on this CPU: the fastest single matmul within
    `seconds` of repeats (2*size^3 FLOPs each). Cached in $NANOSEEK_CACHE_DIR (default
    ~/.cache/nanoseek)/matmul_peak.json, keyed by torch version, CPU model, threads, dtype and size;
    measured when missing or when `refresh`."""
    if isinstance(size, bool) or not isinstance(size, int) or size <= 0 or not seconds > 0:
        raise ConfigError(f"the matmul probe needs a positive integer size and positive seconds, "
                          f"got size={size!r}, seconds={seconds!r}")
    return cached_probe(probe_key(dtype, size), "flops_per_second", lambda: _time_matmul(dtype, size, seconds),
                        seconds=seconds, refresh=refresh)


def cached_probe(key: str, field: str, measure, *, seconds: float | None = None, refresh: bool = False) -> float:
    """The positive number `measure()` returns, cached under `key` (its `field`) in $NANOSEEK_CACHE_DIR
    (default ~/.cache/nanoseek)/matmul_peak.json: every probe of this machine in one file (the matmul
    peak above, quant.py's int8 kernel timings). Measured when missing or when `refresh`; keys start
    with `machine_key()` so another CPU, torch or thread count measures afresh."""
    path = cache_dir() / PROBE_FILE
    cache = _read_json_object(path)
    entry = cache.get(key)
    if not refresh and isinstance(entry, dict) and _is_positive_number(entry.get(field)):
        return float(entry[field])
    value = measure()
    cache[key] = {field: value, **({"seconds": seconds} if seconds is not None else {}),
                  "measured_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
    write_json_atomic(path, cache)
    return value


def probe_key(dtype: torch.dtype, size: int) -> str:
    return f"{machine_key()}|dtype={dtype_name(dtype)}|size={size}"


def machine_key() -> str:
    """What a probe's result depends on besides its own parameters: torch, the CPU, the thread count."""
    return f"torch={torch.__version__}|cpu={cpu_model()}|threads={torch.get_num_threads()}"


def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "nanoseek")


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what platform knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text(errors="replace").splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _time_matmul(dtype: torch.dtype, size: int, seconds: float) -> float:
    """FLOP/s of the fastest of repeated (size x size) @ (size x size) matmuls over `seconds`."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(size, size, generator=g).to(dtype)
    b = torch.randn(size, size, generator=g).to(dtype)
    out = torch.matmul(a, b)  # warm-up: thread pool, kernels, the output buffer
    flop = 2 * size ** 3
    best, start = 0.0, _clock()
    while True:
        t0 = _clock()
        torch.matmul(a, b, out=out)
        t1 = _clock()
        best = max(best, flop / max(t1 - t0, 1e-9))
        if t1 - start >= seconds:
            return best


def _read_json_object(path: Path) -> dict:
    """The JSON object in `path`, or {} when it is missing or unreadable (a cache is rebuilt)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _is_positive_number(v) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and v > 0
