"""Cost accounting: FLOPs by hand, DeepSeek-V3's published cost, the CPU probe cache, cost.json, bad input."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from nanoseek import ModelConfig, count_parameters
from nanoseek import cost
from nanoseek import precision  # the CPU probe's module: its timer and clock are patched here
from nanoseek.cost import (DEEPSEEK_V3, DEFAULT_MFU, GPUS, CostMeter, attention_flops_per_token,
                           deepseek_llm_flops_per_token, estimate, flops_per_token, format_cost_table,
                           gpu_key_for_name, implied_mfu, measure_matmul_peak, six_nd)
from nanoseek.errors import ConfigError


@pytest.fixture(autouse=True)
def cache_in_tmp(tmp_path, monkeypatch):
    """Every test's probe cache lives in its own folder, never in ~/.cache."""
    monkeypatch.setenv("NANOSEEK_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def v3():
    return ModelConfig.preset("deepseek-v3")


@pytest.fixture(scope="module")
def v3_flops(v3):
    return flops_per_token(v3)  # seq 4096, causal, MTP


def hand_config(**overrides) -> ModelConfig:
    """Small enough to count by hand: D 8, 2 layers (1 dense, 1 MoE), 2 heads, no q LoRA."""
    return ModelConfig(vocab_size=100, hidden_size=8, intermediate_size=16, moe_intermediate_size=4,
                       num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2,
                       n_routed_experts=4, n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1,
                       q_lora_rank=None, kv_lora_rank=4, qk_nope_head_dim=4, qk_rope_head_dim=2, v_head_dim=4,
                       **overrides)


# ---- FLOPs per token -----------------------------------------------------------------------------
def test_flops_by_hand_tiny_config():
    # Per layer, attention matmuls: q_proj 8*2*6=96, kv_a 8*(4+2)=48, kv_b 4*2*(4+4)=64, o 2*4*8=64 -> 272.
    # Layer 0 dense MLP 3*8*16=384; layer 1 MoE: gate 4*8=32 + shared 3*8*4=96 + 2 of 4 experts 2*96=192.
    # Body 2*272 + 384 + 320 = 1248; head 100*8 = 800. Norm weights (2*2*8 + 8 + kv_a norms 2*4 = 48)
    # are in count_parameters' activated (2096) but are not matmuls.
    c = hand_config()
    assert count_parameters(c).activated == 2096
    f = flops_per_token(c, seq_len=16)
    assert f.matmul == 6 * 1248
    assert f.head == 6 * 800
    assert f.matmul_params == 1248 + 800 == 2096 - 48
    # attention: 3 (fwd+bwd) * 2 layers * 2*H*S*(qk+v) = 3*2*2*2*16*10 = 3840 for all keys, halved causal
    assert f.attention == 1920
    assert flops_per_token(c, seq_len=16, causal=False).attention == 3840
    assert f.mtp == 0 and f.total == 7488 + 4800 + 1920 == 14208
    assert f.six_n == 6 * 2096


def test_flops_by_hand_mtp_module():
    # One MTP module (layer index 2: MoE): eh_proj 2*8*8=128 + block 272 + 320 + the shared head 800 = 1520;
    # its attention layer: 3 * 2*2*16*10 / 2 = 960.
    c = hand_config(num_nextn_predict_layers=1)
    f = flops_per_token(c, seq_len=16)
    assert f.mtp_params == 1520
    assert f.mtp == 6 * 1520 + 960 == 10080
    assert f.total == 14208 + 10080
    assert flops_per_token(c, seq_len=16, include_mtp=False).total == 14208


def test_dense_model_agrees_with_deepseek_llm_formula():
    # A dense MLA model shaped like a standard block: H*qk = H*v = d, kv rank 2d/3 and SwiGLU 8d/3 give
    # ~12 d^2 params per layer, so 6N + full attention should match 72*L*d^2 + 12*L*d*l_seq (head excluded).
    d, L, S = 512, 4, 2048
    c = ModelConfig(vocab_size=1000, hidden_size=d, intermediate_size=1365, num_hidden_layers=L,
                    first_k_dense_replace=L, n_routed_experts=0, num_attention_heads=8, q_lora_rank=None,
                    kv_lora_rank=336, qk_nope_head_dim=48, qk_rope_head_dim=16, v_head_dim=64)
    f = flops_per_token(c, seq_len=S, causal=False)
    assert f.attention == 12 * L * d * S  # exactly their attention term
    assert f.matmul + f.attention == pytest.approx(deepseek_llm_flops_per_token(L, d, S), rel=0.03)
    # and at short context the plain 6N (head included) is the whole count, within the norm weights
    short = flops_per_token(c, seq_len=1)
    assert short.total == pytest.approx(short.six_n, rel=0.01)


def test_deepseek_v3_six_nd_matches_the_papers_sanity_check(v3, v3_flops):
    assert six_nd(v3, 14.8e12) == pytest.approx(3.29e24, rel=0.02)  # 6 x 37B x 14.8T
    assert v3_flops.six_n * 14.8e12 == pytest.approx(3.29e24, rel=0.02)
    # attention (causal, 4K) and MTP add ~19%
    assert 1.1 < v3_flops.total / v3_flops.six_n < 1.3
    assert v3_flops.attention == attention_flops_per_token(v3, 4096) == 3 * 61 * 128 * 4096 * 320


# ---- DeepSeek-V3's published cost ----------------------------------------------------------------
def test_deepseek_v3_lands_on_published_hours_and_dollars(v3, v3_flops):
    m = implied_mfu(v3_flops)
    assert 0.35 <= m <= 0.45
    assert DEFAULT_MFU == round(m, 2)  # the constant is the implied MFU under the default counting
    # the reference's sanity check: 6ND alone implies ~35% of 989 TFLOP/s
    six_nd_only = v3_flops.six_n * 14.8e12 / (2.664e6 * 3600 * 989e12)
    assert six_nd_only == pytest.approx(0.343, abs=0.005)

    est = estimate(v3, 14.8e12, gpu="h800", mfu=DEFAULT_MFU, usd_per_hour=2, seq_len=4096, n_gpus=2048,
                   label="deepseek-v3")
    assert est.flops == v3_flops
    assert est.gpu_hours == pytest.approx(DEEPSEEK_V3.gpu_hours, rel=0.10)
    assert est.usd == pytest.approx(5.328e6, rel=0.10)
    assert est.days == pytest.approx(est.gpu_hours / 2048 / 24)
    assert est.gpu_hours == pytest.approx(DEEPSEEK_V3.gpu_hours * m / DEFAULT_MFU, rel=1e-9)

    table = format_cost_table(est, DEEPSEEK_V3)
    for needle in ("2.664M", "$5.328M", "(implied)", "H800", "3.29e+24", "attention", "MTP"):
        assert needle in table, needle
    assert "| ratio |" in table and "ratio" not in format_cost_table(est)


def test_implied_mfu_grows_with_what_is_counted(v3_flops):
    no_mtp = dataclasses.replace(v3_flops, mtp=0, include_mtp=False)
    no_attention = dataclasses.replace(no_mtp, attention=0)
    assert implied_mfu(no_attention) < implied_mfu(no_mtp) < implied_mfu(v3_flops)


# ---- devices -------------------------------------------------------------------------------------
def test_gpu_table_and_names():
    assert GPUS["h800"].peak_flops == GPUS["h100"].peak_flops == GPUS["h200"].peak_flops == 989e12
    assert GPUS["a100"].peak_flops == 312e12 and GPUS["b200"].peak_flops == 2250e12
    assert GPUS["cpu"].peak_flops is None
    assert gpu_key_for_name("NVIDIA H100 80GB HBM3") == "h100"
    assert gpu_key_for_name("NVIDIA H200") == "h200"
    assert gpu_key_for_name("NVIDIA A100-SXM4-80GB") == "a100"
    assert gpu_key_for_name("NVIDIA GeForce RTX 4090") is None
    entry, peak, source = cost.device_peak("H800", torch.bfloat16)
    assert entry.key == "h800" and peak == 989e12 and "datasheet" in source
    assert cost.device_peak("H800", torch.float32)[1:] == (67e12, "datasheet dense fp32")  # no TF32


def test_estimate_on_cpu_uses_the_probe(monkeypatch):
    monkeypatch.setattr(precision, "_time_matmul", lambda dtype, size, seconds: 5e10)
    est = estimate(hand_config(), 1e6, gpu="cpu", mfu=0.5, usd_per_hour=0.1, seq_len=16)
    assert est.peak_flops == 5e10 and "measured" in est.peak_source
    assert est.gpu_hours == pytest.approx(14208 * 1e6 / (5e10 * 0.5) / 3600)


# ---- CPU probe -----------------------------------------------------------------------------------
def test_probe_measures_then_reads_the_cache(monkeypatch, cache_in_tmp):
    ticks = iter(range(1000))
    monkeypatch.setattr(precision, "_clock", lambda: next(ticks) * 0.25)  # every clock read advances 0.25 s
    first = measure_matmul_peak(torch.float32, size=16, seconds=0.5)
    assert first == 2 * 16 ** 3 / 0.25  # each timed matmul "took" 0.25 s
    saved = json.loads((cache_in_tmp / "matmul_peak.json").read_text())
    (key, entry), = saved.items()
    assert key == cost.probe_key(torch.float32, 16)
    assert f"torch={torch.__version__}" in key and f"threads={torch.get_num_threads()}" in key
    assert "dtype=float32" in key and f"cpu={cost.cpu_model()}" in key
    assert entry["flops_per_second"] == first

    def must_not_measure(*args):
        raise AssertionError("re-measured although cached")
    monkeypatch.setattr(precision, "_time_matmul", must_not_measure)
    assert measure_matmul_peak(torch.float32, size=16, seconds=0.5) == first
    # another dtype is another key: measured (here: faked) and added beside the first
    monkeypatch.setattr(precision, "_time_matmul", lambda dtype, size, seconds: 7.0)
    assert measure_matmul_peak(torch.bfloat16, size=16) == 7.0
    assert measure_matmul_peak(torch.float32, size=16, refresh=True) == 7.0
    assert len(json.loads((cache_in_tmp / "matmul_peak.json").read_text())) == 2


def test_probe_rebuilds_a_corrupt_cache(monkeypatch, cache_in_tmp):
    cache_in_tmp.mkdir(parents=True)
    (cache_in_tmp / "matmul_peak.json").write_text("{not json")
    monkeypatch.setattr(precision, "_time_matmul", lambda dtype, size, seconds: 3.0)
    assert measure_matmul_peak(size=8) == 3.0
    assert json.loads((cache_in_tmp / "matmul_peak.json").read_text())[cost.probe_key(torch.float32, 8)]


def test_real_probe_returns_a_rate(cache_in_tmp):
    assert measure_matmul_peak(size=32, seconds=0.01) > 0
    assert (cache_in_tmp / "matmul_peak.json").exists()


# ---- run accounting ------------------------------------------------------------------------------
def test_cost_meter_writes_cost_json(tmp_path):
    path = tmp_path / "run" / "cost.json"
    meter = CostMeter(hand_config(), path, device="cpu", peak_flops=1e9, usd_per_hour=0.5, seq_len=16)
    meter.update(tokens=1000, wall_seconds=10.0)
    run = meter.update(tokens=3600, wall_seconds=7200.0)
    data = json.loads(path.read_text())
    assert data["tokens"] == 3600
    assert data["flops_per_token"] == 14208 and data["training_flops"] == 14208 * 3600
    assert data["flops_per_token_by_part"] == {"matmul": 7488, "head": 4800, "attention": 1920, "mtp": 0}
    assert data["attention_causal"] is True and "causal" in data["flops_convention"]
    assert data["wall_seconds"] == 7200.0 and data["device_hours"] == 2.0
    assert data["achieved_flops_per_second"] == pytest.approx(14208 * 3600 / 7200)
    assert data["mfu"] == pytest.approx(14208 * 3600 / 7200 / 1e9)
    assert data["usd_per_device_hour"] == 0.5 and data["usd"] == 1.0
    assert data == json.loads(json.dumps(run.as_dict()))
    assert [p.name for p in path.parent.iterdir()] == ["cost.json"]  # no temporary file left behind


def test_cost_meter_on_cpu_probes_once(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(precision, "_time_matmul", lambda dtype, size, seconds: calls.append(dtype) or 2e9)
    meter = CostMeter(hand_config(), tmp_path / "cost.json", device="cpu", seq_len=16, n_devices=2)
    run = meter.update(tokens=100, wall_seconds=0.0)
    assert calls == [torch.float32] and run.peak_flops_per_device == 2e9
    assert run.achieved_flops_per_second == 0.0 and run.mfu == 0.0  # no time yet: no division by zero
    CostMeter(hand_config(), tmp_path / "other.json", device="cpu", seq_len=16)
    assert calls == [torch.float32]  # the second meter read the cache


# ---- bad input -----------------------------------------------------------------------------------
@pytest.mark.parametrize("tokens", [-1, float("nan"), float("inf"), "10"])
def test_bad_tokens(tokens):
    with pytest.raises(ConfigError, match="tokens"):
        estimate(hand_config(), tokens, gpu="h100")


def test_unknown_gpu_names_it_and_lists_the_known_ones():
    with pytest.raises(ConfigError) as e:
        estimate(hand_config(), 1e9, gpu="x100")
    message = str(e.value)
    assert "'x100'" in message
    for key in GPUS:
        assert key in message


@pytest.mark.parametrize("mfu", [0, -0.1, 1.01, 2, float("nan"), True])
def test_mfu_outside_zero_one(mfu):
    with pytest.raises(ConfigError, match="mfu"):
        estimate(hand_config(), 1e9, gpu="h100", mfu=mfu)


def test_other_bad_fields(tmp_path):
    c = hand_config()
    with pytest.raises(ConfigError, match="usd_per_hour"):
        estimate(c, 1e9, usd_per_hour=-2)
    with pytest.raises(ConfigError, match="n_gpus"):
        estimate(c, 1e9, n_gpus=0)
    with pytest.raises(ConfigError, match="seq_len"):
        flops_per_token(c, seq_len=0)
    meter = CostMeter(c, tmp_path / "cost.json", peak_flops=1e9)
    with pytest.raises(ConfigError, match="tokens"):
        meter.update(tokens=-5, wall_seconds=1.0)
    with pytest.raises(ConfigError, match="wall_seconds"):
        meter.update(tokens=5, wall_seconds=-1.0)
    assert not (tmp_path / "cost.json").exists()
