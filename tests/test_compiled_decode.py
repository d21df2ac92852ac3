"""The compiled decode step (nanoseek/infer/compiled.py): the same tokens as the eager engine, no new
graph per step or per cache growth, and auto decided by the cached probe. One tiny model for the whole
module, so each batch bucket compiles once (~10-25 s each on 2 cores, then inductor's disk cache)."""

from __future__ import annotations

import json

import pytest
import torch
import torch._dynamo.utils

from nanoseek import ConfigError, ModelConfig, Transformer, generate
from nanoseek.infer import Engine
from nanoseek.infer.compiled import (COMPILE_ENV, buckets, compile_setting, compiled_for, config_signature,
                                     decode_step, eager_step, routed_gathered)
from nanoseek.infer.sampling import SamplingParams
from nanoseek.model import LatentCache
from nanoseek.precision import PROBE_FILE, machine_key

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(ModelConfig.preset("tiny", num_nextn_predict_layers=0)).eval()
    with torch.no_grad():
        for moe in m.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return m


PROMPTS = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15]]


def run(model, prompts, compile: bool, params: SamplingParams, max_batch: int | None = None, **kw):
    engine = Engine(model, max_batch=max_batch or len(prompts), max_model_len=128, compile=compile)
    gens = [torch.Generator().manual_seed(s) for s in range(len(prompts))]
    return [r.output_ids for r in engine.generate(prompts, params, generator=gens)], engine


def test_step_matches_eager_forward(model):
    """decode_step (uncompiled: the function itself) gives the eager forward's logits and cache rows,
    including a row with invalid (left-padding) slots."""
    cfg = model.config
    B, P = 2, 6
    g = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        cache = LatentCache(cfg, B, 16, with_mtp=False)
        mask = torch.ones(B, P, dtype=torch.long)
        mask[1, :2] = 0
        ids = torch.randint(0, cfg.vocab_size, (B, P), generator=g)
        model.forward_cached(ids, cache, (mask.cumsum(1) - 1).clamp(min=0), attention_mask=mask)
        kv, valid = cache.kv.clone(), cache.valid.clone()
        nxt, pos = torch.tensor([3, 4]), torch.tensor([P, P - 2])
        want = eager_step(model, nxt, pos, cache)
        valid[:, P] = True
        got = decode_step(model, nxt, pos, kv, valid, torch.tensor(P))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(kv[:, :, : P + 1], cache.kv[:, :, : P + 1], atol=1e-5, rtol=1e-5)


def test_gathered_experts_match_dispatch(model):
    moe = model.moe_layers()[0]
    x = torch.randn(3, model.config.hidden_size, generator=torch.Generator().manual_seed(2))
    with torch.inference_mode():
        weights, indices, _ = moe.gate(x)
        torch.testing.assert_close(routed_gathered(moe, x, indices, weights), moe.experts(x, indices, weights),
                                   atol=1e-5, rtol=1e-5)


def test_compiled_greedy_and_sampled_tokens_equal_eager(model):
    """Greedy (batch 1, and 3 prompts of different lengths: left padding, run in bucket 4 with a padding
    row) and T=1 sampling with per-request generators give the eager engine's tokens; 70 new tokens grow
    the cache past its first 64 slots without a new graph."""
    greedy = SamplingParams(max_tokens=70, temperature=0.0)
    sampled = SamplingParams(max_tokens=40, temperature=1.0, top_p=0.9)
    frames = torch._dynamo.utils.counters["frames"]["ok"]
    for prompts in ([PROMPTS[0]], PROMPTS):
        for params in (greedy, sampled):
            want, _ = run(model, prompts, False, params, max_batch=4)
            got, engine = run(model, prompts, True, params, max_batch=4)
            assert got == want
            assert engine.slots.size > 64 or params is sampled  # 70 new tokens: the cache grew
    assert sorted(compiled_for(model).compile_seconds) == [1, 4]
    assert torch._dynamo.utils.counters["frames"]["ok"] - frames == 2  # one graph per bucket, not per step


def test_continuous_batching_pads_to_buckets(model):
    """3 rows (padded to bucket 4), a request joining the running batch (4 rows), rows finishing at
    different steps (4 -> 3 -> 2 -> 1: buckets 4, 2, 1) decode the eager engine's tokens."""
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    params = [SamplingParams(max_tokens=n, temperature=0.0) for n in (6, 30, 12, 20)]

    def drive(compile: bool):
        engine = Engine(model, max_batch=4, max_model_len=96, compile=compile)
        first = [engine.add(p, sp) for p, sp in zip(prompts[:3], params[:3])]
        for _ in range(3):
            engine.step()
        late = engine.add(prompts[3], params[3])
        while engine.has_work:
            engine.step()
        return [r.output_ids for r in first + [late]]
    assert buckets(4) == [1, 2, 4] and buckets(6) == [1, 2, 4, 6]
    assert drive(True) == drive(False)


def test_generate_reads_the_env(model, monkeypatch):
    monkeypatch.setenv(COMPILE_ENV, "1")
    assert compile_setting() == "on" and compile_setting(False) == "off"
    got = generate(model, [PROMPTS[0]], max_new_tokens=12)
    monkeypatch.setenv(COMPILE_ENV, "0")
    assert compile_setting() == "off"
    assert got == generate(model, [PROMPTS[0]], max_new_tokens=12)
    monkeypatch.delenv(COMPILE_ENV)
    assert compile_setting() == "off"  # opt-in: the compile stalls a short session for 15-30 s
    monkeypatch.setenv(COMPILE_ENV, "auto")
    assert compile_setting() == "auto"
    monkeypatch.setenv(COMPILE_ENV, "yes")
    with pytest.raises(ConfigError, match="NANOSEEK_COMPILE='yes'"):
        compile_setting()


@pytest.mark.parametrize("speedup, compiled", [(0.8, False), (2.0, True)])
def test_auto_follows_the_cached_probe(model, tmp_path, monkeypatch, speedup, compiled):
    """auto compiles a bucket only where the cached probe measured MIN_SPEEDUP or more (the cache is
    written here: the probe itself is not run)."""
    monkeypatch.setenv("NANOSEEK_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv(COMPILE_ENV, "auto")
    key = f"{machine_key()}|decode_compile|config={config_signature(model)}|batch=2"
    (tmp_path / PROBE_FILE).write_text(json.dumps({key: {"speedup": speedup}}))
    engine = Engine(model, max_batch=2, max_model_len=64)
    assert engine.decoder.compile == "auto"
    assert engine.decoder.compiled_bucket(2, 2) == (2 if compiled else None)
    assert Engine(model, max_batch=2, max_model_len=64, compile=False).decoder.compiled_bucket(2, 2) is None


def test_speculative_bf16_and_int8_stay_eager(model):
    """decode_step covers the plain fp32 decode only: speculation (two tokens per row, the MTP layer), bf16
    weights and int8 models decode eagerly even with compile=True."""
    from nanoseek.infer.compute import compute_models, inference_precision
    from nanoseek.infer.decode import Decoder
    assert Decoder(compute_models(model), speculative=True, stats={}, compile=True).compile == "off"
    engine = Engine(model, max_batch=2, max_model_len=64, precision="bf16", compile=True)
    assert engine.decoder.compiled_bucket(1, 2) is None
    int8 = compute_models(model, inference_precision("auto", "cpu", quantize="int8"))
    assert Decoder(int8, speculative=False, stats={}, compile=True).compile == "off"
    assert Decoder(compute_models(model), speculative=False, stats={}, compile=True).compile == "on"


def test_graph_follows_in_place_weight_updates(model):
    """A trainer updates the weights in place between rollouts (GRPO): the compiled step reads them as
    they are now, no stale copy."""
    params = SamplingParams(max_tokens=12, temperature=0.0)
    head = model.lm_head.weight
    before = head.detach().clone()
    try:
        with torch.no_grad():
            head.mul_(-1.5)
        want, _ = run(model, [PROMPTS[0]], False, params)
        got, _ = run(model, [PROMPTS[0]], True, params)
        assert got == want
    finally:
        with torch.no_grad():
            head.copy_(before)
