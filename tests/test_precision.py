"""The precision choice: explicit fp32/bf16 as asked, `auto` by the cached probe or NANOSEEK_BF16."""

from __future__ import annotations

import pytest
import torch

from nanoseek import precision
from nanoseek.errors import ConfigError
from nanoseek.precision import BF16_MIN_SPEEDUP, Precision, check_precision, resolve_precision


@pytest.fixture
def probe(tmp_path, monkeypatch):
    """A fake probe: set `rates[dtype]` (FLOP/s); the cache lives in tmp_path, NANOSEEK_BF16 unset."""
    monkeypatch.setenv(precision.CACHE_ENV, str(tmp_path / "cache"))
    monkeypatch.delenv(precision.FORCE_ENV, raising=False)
    rates = {torch.float32: 100.0, torch.bfloat16: 100.0}
    calls = []

    def fake(dtype, size, seconds):
        calls.append(dtype)
        return rates[dtype]
    monkeypatch.setattr(precision, "_time_matmul", fake)
    return rates, calls


def test_auto_takes_fp32_when_the_probe_says_bf16_is_not_faster(probe):
    rates, _ = probe
    rates[torch.bfloat16] = 30.0  # a CPU that emulates bf16 (no AMX / AVX512-BF16): much slower
    chosen = resolve_precision("auto", "cpu")
    assert chosen.name == "fp32" and chosen.dtype == torch.float32
    assert "0.30x" in chosen.reason


def test_auto_takes_fp32_for_a_small_gain_and_bf16_for_a_large_one(probe, tmp_path, monkeypatch):
    rates, _ = probe
    rates[torch.bfloat16] = 100.0 * (BF16_MIN_SPEEDUP - 0.05)
    assert resolve_precision("auto").name == "fp32"
    monkeypatch.setenv(precision.CACHE_ENV, str(tmp_path / "other-cache"))  # a fresh cache: re-probed
    rates[torch.bfloat16] = 400.0
    chosen = resolve_precision("auto")
    assert chosen.name == "bf16" and chosen.dtype == torch.bfloat16 and "4.00x" in chosen.reason


def test_the_probe_runs_once_per_machine(probe):
    _, calls = probe
    resolve_precision("auto")
    resolve_precision("auto")
    assert sorted(map(str, calls)) == ["torch.bfloat16", "torch.float32"]


def test_env_overrides_auto_without_probing(probe, monkeypatch):
    _, calls = probe
    monkeypatch.setenv(precision.FORCE_ENV, "0")
    assert resolve_precision("auto").name == "fp32"
    monkeypatch.setenv(precision.FORCE_ENV, "1")
    assert resolve_precision("auto").name == "bf16"
    assert calls == []


def test_explicit_choices_are_taken_as_asked(probe):
    _, calls = probe
    assert resolve_precision("fp32") == Precision("fp32", "requested")
    assert resolve_precision("bf16").name == "bf16"
    assert calls == []


@pytest.mark.parametrize("bad", ["fp16", "BF16", "", "float32"])
def test_unknown_precision_names_the_field(bad):
    with pytest.raises(ConfigError, match="invalid precision"):
        resolve_precision(bad)
    with pytest.raises(ConfigError, match="invalid serve.precision"):
        check_precision(bad, "serve.precision")


def test_autocast_runs_matmuls_in_bf16_and_fp32_leaves_them_alone():
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    with Precision("bf16", "test").autocast("cpu"):
        assert (a @ b).dtype == torch.bfloat16
    with Precision("fp32", "test").autocast("cpu"):
        assert (a @ b).dtype == torch.float32


def test_auto_is_marked_so_inference_can_split_by_forward_size(probe, monkeypatch):
    """`auto` results carry auto=True whatever their reason text says; named choices do not (the engine
    keeps fp32 for small forwards only under auto: nanoseek.infer.compute.inference_precision)."""
    from nanoseek.infer.compute import inference_precision
    rates, _ = probe
    rates[torch.bfloat16] = 400.0
    chosen = resolve_precision("auto", "cpu")
    assert chosen.auto and not resolve_precision("bf16").auto and not resolve_precision("fp32").auto
    renamed = Precision("bf16", "some other wording", auto=True)
    assert inference_precision(renamed, "cpu").bf16_min_tokens == inference_precision("auto", "cpu").bf16_min_tokens is not None
    assert inference_precision(Precision("bf16", "auto-looking text"), "cpu").bf16_min_tokens is None
