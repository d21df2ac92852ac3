"""Accounting of a run: what it has cost so far (FLOPs, device-hours, MFU, dollars), as cost.json.

The trainer makes one CostMeter per run and calls `update` as it goes; FLOPs per token and the device
peak come from .estimation, resolved once.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path

import torch

from ..config import ModelConfig
from ..errors import ConfigError
from ..runio import write_json_atomic
from .estimation import (DEFAULT_SEQ_LEN, DEFAULT_USD_PER_HOUR, SECONDS_PER_HOUR, FlopsPerToken, _non_negative,
                         _positive, _positive_int, device_peak, flops_per_token)


@dataclass(frozen=True)
class RunCost:
    """What a run has cost so far: written as cost.json by CostMeter."""

    tokens: int
    wall_seconds: float
    n_devices: int
    device: str
    device_name: str
    peak_flops_per_device: float
    peak_source: str
    usd_per_device_hour: float
    flops: FlopsPerToken

    @property
    def training_flops(self) -> int:
        return self.flops.total * self.tokens

    @property
    def device_hours(self) -> float:
        return self.wall_seconds * self.n_devices / SECONDS_PER_HOUR

    @property
    def achieved_flops_per_second(self) -> float:
        """All devices together."""
        return self.training_flops / self.wall_seconds if self.wall_seconds > 0 else 0.0

    @property
    def mfu(self) -> float:
        return self.achieved_flops_per_second / (self.peak_flops_per_device * self.n_devices)

    @property
    def usd(self) -> float:
        return self.device_hours * self.usd_per_device_hour

    def as_dict(self) -> dict:
        f = self.flops
        return {
            "tokens": self.tokens,
            "training_flops": self.training_flops,
            "flops_per_token": f.total,
            "flops_per_token_by_part": {"matmul": f.matmul, "head": f.head, "attention": f.attention,
                                        "mtp": f.mtp},
            "flops_convention": flops_convention(f),
            "six_nd_flops": f.six_n * self.tokens,
            "seq_len": f.seq_len,
            "attention_causal": f.causal,
            "mtp_included": f.include_mtp,
            "activated_params": f.activated_params,
            "wall_seconds": self.wall_seconds,
            "device": self.device,
            "device_name": self.device_name,
            "n_devices": self.n_devices,
            "device_hours": self.device_hours,
            "peak_flops_per_device": self.peak_flops_per_device,
            "peak_source": self.peak_source,
            "achieved_flops_per_second": self.achieved_flops_per_second,
            "mfu": self.mfu,
            "usd_per_device_hour": self.usd_per_device_hour,
            "usd": self.usd,
        }


def flops_convention(f: FlopsPerToken) -> str:
    """One sentence stating what the FLOP count includes (written into cost.json)."""
    attention = "causal (S/2 keys per token)" if f.causal else "full (S keys per token)"
    mtp = "plus the MTP modules" if f.include_mtp else "MTP modules not counted"
    return (f"6 x activated matmul params (incl. head) + attention scores QK^T and AV, {attention}, "
            f"seq_len {f.seq_len}, x3 for forward+backward; {mtp}; elementwise ops excluded")


class CostMeter:
    """Writes a run's cost.json; the trainer calls `update` every log step and at the end.

    FLOPs per token and the device peak are resolved once here, for matmuls in `probe_dtype`, the
    precision the run computes in (bf16 under autocast, else fp32), so MFU is against the peak of what
    actually runs: 'cpu' runs the cached matmul probe; 'cuda' recognises the GPU by name (datasheet)
    or measures one the table lacks; a table key such as 'h100' reads the table; `peak_flops` (the
    recipe field) overrides all of them.
    """

    def __init__(self, config: ModelConfig, path: str | Path, *, device: str = "cpu",
                 peak_flops: float | None = None, n_devices: int = 1,
                 usd_per_hour: float = DEFAULT_USD_PER_HOUR, seq_len: int = DEFAULT_SEQ_LEN,
                 causal: bool = True, include_mtp: bool = True, probe_dtype: torch.dtype = torch.float32):
        self.path = Path(path)
        self.flops = flops_per_token(config, seq_len, causal=causal, include_mtp=include_mtp)
        if peak_flops is None:
            entry, self.peak_flops, self.peak_source = device_peak(device, probe_dtype)
            self.device, self.device_name = entry.key, entry.name
        else:
            self.peak_flops, self.peak_source = _positive("peak_flops", peak_flops), "given"
            self.device = self.device_name = str(device)
        self.n_devices = _positive_int("n_devices", n_devices)
        self.usd_per_hour = _non_negative("usd_per_hour", usd_per_hour)

    def measure(self, tokens: int, wall_seconds: float) -> RunCost:
        """The cost so far, without writing it."""
        if isinstance(tokens, bool) or not isinstance(tokens, numbers.Integral) or tokens < 0:
            raise ConfigError(f"invalid cost field 'tokens': must be a non-negative integer (got {tokens!r})")
        return RunCost(tokens=int(tokens), wall_seconds=_non_negative("wall_seconds", wall_seconds),
                       n_devices=self.n_devices, device=self.device, device_name=self.device_name,
                       peak_flops_per_device=self.peak_flops, peak_source=self.peak_source,
                       usd_per_device_hour=self.usd_per_hour, flops=self.flops)

    def update(self, tokens: int, wall_seconds: float) -> RunCost:
        """Measure and write cost.json atomically (a reader never sees a half-written file)."""
        run = self.measure(tokens, wall_seconds)
        write_json_atomic(self.path, run.as_dict())
        return run
