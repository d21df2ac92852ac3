"""Inference precision (`--precision auto|fp32|bf16`): the plan `auto` picks, bf16 weight copies with an
fp32 router, bf16 generation close to fp32 (same tokens where logits are well separated), fp32 bitwise
unchanged, the split plan's model choice, and the option on chat, serve and eval."""

from __future__ import annotations

import io
import sys

import pytest
import torch
from conftest import random_tiny_model
from test_cli import assert_one_line_error
from toy import CONVERSATIONS

from nanoseek import generate
from nanoseek.cli import main
from nanoseek.errors import ConfigError
from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer.compute import (AUTO_BF16_MIN_TOKENS, InferencePrecision, cast_copy, compute_models,
                                    inference_precision)
from nanoseek.infer.quant import quantize_int8
from nanoseek.model import LatentCache
from nanoseek.precision import FORCE_ENV, Precision
from nanoseek.serve import load_engine

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def bf16_fast(monkeypatch):
    """`auto` believes bf16 pays on this CPU (no probe is run)."""
    monkeypatch.setenv(FORCE_ENV, "1")


# ---- the plan ------------------------------------------------------------------------------------
def test_explicit_precisions_are_taken_as_asked():
    fp32, bf16 = inference_precision("fp32"), inference_precision("bf16")
    assert (fp32.weights, fp32.bf16_min_tokens, fp32.name) == (torch.float32, None, "fp32")
    assert (bf16.weights, bf16.bf16_min_tokens, bf16.name) == (torch.bfloat16, None, "bf16")
    with pytest.raises(ConfigError, match="invalid precision 'fp16'"):
        inference_precision("fp16")


def test_auto_on_a_cpu_without_fast_bf16_is_fp32(monkeypatch):
    monkeypatch.setenv(FORCE_ENV, "0")
    plan = inference_precision("auto", "cpu")
    assert plan.name == "fp32" and plan.bf16_min_tokens is None and FORCE_ENV in plan.reason


def test_auto_on_a_cpu_with_fast_bf16_splits_forwards_by_size(bf16_fast):
    plan = inference_precision("auto", "cpu")
    assert plan.weights == torch.float32 and plan.bf16_min_tokens == AUTO_BF16_MIN_TOKENS
    assert plan.name == "fp32+bf16"
    assert f"below {AUTO_BF16_MIN_TOKENS} tokens per forward, bf16 from {AUTO_BF16_MIN_TOKENS}" in plan.describe()
    # a Precision resolved elsewhere (a recipe's) maps the same way
    assert inference_precision(Precision("bf16", "auto: NANOSEEK_BF16=1", auto=True)) == plan
    assert inference_precision(Precision("bf16", "requested")).weights == torch.bfloat16


def test_cast_copy_keeps_the_router_and_rope_in_fp32_and_leaves_the_source_alone():
    model = random_tiny_model(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    twin = cast_copy(model, torch.bfloat16)
    assert twin.dtype == torch.bfloat16 and not twin.training
    for moe in twin.moe_layers():
        assert moe.gate.weight.dtype == torch.float32 and moe.gate.e_score_correction_bias.dtype == torch.float32
    assert twin.rotary.inv_freq.dtype == torch.float32
    assert torch.equal(twin.rotary.inv_freq, model.rotary.inv_freq)
    gate = model.moe_layers()[0].gate
    assert torch.equal(twin.moe_layers()[0].gate.e_score_correction_bias, gate.e_score_correction_bias)
    assert torch.equal(twin.lm_head.weight, model.lm_head.weight.bfloat16())
    assert model.dtype == torch.float32
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_a_quantized_model_cannot_be_cast():
    with pytest.raises(ConfigError, match="int8-quantized"):
        compute_models(quantize_int8(random_tiny_model(0)), "bf16")


def test_split_plan_runs_large_forwards_on_the_bf16_copy(bf16_fast):
    model = random_tiny_model(0)
    compute = compute_models(model, "auto")
    assert compute.main is model and compute.fast.dtype == torch.bfloat16
    assert compute.for_tokens(1) is model and compute.for_tokens(AUTO_BF16_MIN_TOKENS - 1) is model
    assert compute.for_tokens(AUTO_BF16_MIN_TOKENS) is compute.fast
    engine = Engine(model, max_batch=8, precision="auto")
    assert engine.dtype == torch.float32 and engine.slots.dtype == torch.float32


# ---- numbers -------------------------------------------------------------------------------------
def test_fp32_is_bitwise_unchanged():
    model = random_tiny_model(1)
    prompts = [[3, 1, 4, 1, 5, 9, 2, 6], [5, 3]]
    plain = Engine(model, max_batch=2)
    fp32 = Engine(model, max_batch=2, precision="fp32")
    assert fp32.model is model and fp32.compute.fast is None and fp32.dtype == torch.float32
    params = SamplingParams(max_tokens=12, temperature=0.8, seed=7, logprobs=3)
    a, b = plain.generate(prompts, params), fp32.generate(prompts, params)
    assert [r.output_ids for r in a] == [r.output_ids for r in b]
    assert [[t.logprob for t in r.pending_logprobs] for r in a] == [[t.logprob for t in r.pending_logprobs]
                                                                     for r in b]


def test_bf16_decode_logits_are_close_to_fp32_through_the_cache():
    """Prefill then decode a token over the latent cache, fp32 against bf16 weights and cache: the
    absorbed path gives logits within bf16 rounding of fp32's."""
    model = random_tiny_model(2)
    twin = cast_copy(model, torch.bfloat16)
    ids = torch.tensor([[7, 3, 9, 12, 5, 1, 8, 2]])
    out = {}
    for name, m in (("fp32", model), ("bf16", twin)):
        cache = LatentCache(model.config, 1, 16, with_mtp=False, dtype=m.dtype)
        with torch.inference_mode():
            m(ids, cache=cache)
            out[name] = m(torch.tensor([[4]]), cache=cache).float()
        assert cache.kv.dtype == m.dtype
    scale = out["fp32"].abs().mean()
    assert (out["bf16"] - out["fp32"]).abs().mean() < 0.05 * scale


def test_fp32_model_over_a_bf16_cache_and_the_reverse():
    """The absorbed path casts only per-token tensors, so weights and cache dtypes may differ."""
    model = random_tiny_model(3)
    ids = torch.tensor([[7, 3, 9, 12, 5, 1, 8, 2]])
    ref_cache = LatentCache(model.config, 1, 16, with_mtp=False)
    with torch.inference_mode():
        model(ids, cache=ref_cache)
        ref = model(torch.tensor([[4]]), cache=ref_cache)
        for m, cache_dtype in ((model, torch.bfloat16), (cast_copy(model, torch.bfloat16), torch.float32)):
            cache = LatentCache(model.config, 1, 16, with_mtp=False, dtype=cache_dtype)
            m(ids, cache=cache)
            got = m(torch.tensor([[4]]), cache=cache).float()
            assert got.dtype == torch.float32 and (got - ref).abs().mean() < 0.05 * ref.abs().mean()


def test_bf16_greedy_replays_the_toy_conversations(toy):
    """The toy model's logits are well separated (it memorized its replies): bf16 gives fp32's tokens,
    with and without speculative decoding, and the split plan too."""
    engine32, tok = load_engine(toy, max_batch=4, precision="fp32")
    prompts = [tok.chat_prompt([{"role": "user", "content": q}])[0] for q, _, _ in CONVERSATIONS]
    params = SamplingParams(max_tokens=24, temperature=0)
    ref = [r.output_ids for r in engine32.generate(prompts, params)]
    for options in ({"precision": "bf16"}, {"precision": "bf16", "speculative": True}):
        engine, _ = load_engine(toy, max_batch=4, **options)
        assert engine.model.dtype == torch.bfloat16 and engine.dtype == torch.bfloat16
        assert [r.output_ids for r in engine.generate(prompts, params)] == ref
    split_plan = InferencePrecision(torch.float32, 4, "test: the bf16 copy from 4 tokens")
    for speculative in (False, True):  # the prefill and the 4 rows x 2 tokens of a speculative step: bf16
        split = Engine(engine32.model, tok, max_batch=4, speculative=speculative, precision=split_plan)
        assert split.compute.fast is not None and split.dtype == torch.float32
        assert [r.output_ids for r in split.generate(prompts, params)] == ref


def test_generate_with_precision_matches_fp32_on_well_separated_logits():
    """Random weights: bf16 gives fp32's greedy tokens up to the first position whose fp32 top-1 lead
    is within what bf16 rounding can flip (10% of the mean |logit|; bf16's mean error is ~2%)."""
    model = random_tiny_model(4, initializer_range=1.0)
    prompt = [5, 17, 3, 99, 41, 8, 2, 60]
    ref = generate(model, [prompt], max_new_tokens=8)[0]
    got = generate(model, [prompt], max_new_tokens=8, precision="bf16")[0]
    with torch.inference_mode():
        logits = model(torch.tensor([prompt + ref]))[0, len(prompt) - 1:-1]
    top2 = logits.topk(2, dim=-1).values
    separated = 0  # leading positions with well separated logits
    lead = top2[:, 0] - top2[:, 1]
    while separated < len(ref) and lead[separated] > 0.1 * logits.abs().mean():
        separated += 1
    assert separated >= 2, "the test model's logits are not separated enough to compare"
    assert got[:separated] == ref[:separated]
    assert model.dtype == torch.float32  # generate cast a copy


def test_load_engine_takes_a_dtype_or_a_precision(toy):
    with pytest.raises(ConfigError, match="dtype or a precision"):
        load_engine(toy, dtype=torch.float32, precision="bf16")
    engine, _ = load_engine(toy, dtype=torch.bfloat16)
    assert engine.precision_plan.name == "bf16" and engine.precision_plan.reason == "the model's dtype"


# ---- the commands --------------------------------------------------------------------------------
@pytest.mark.parametrize("argv", [
    ["chat", "{m}", "--precision", "fp16"],
    ["serve", "{m}", "--precision", "half"],
    ["eval", "{m}", "--task", "addition3", "--precision", "int8"],
])
def test_a_bad_precision_is_one_line_exit_2(tmp_path, capsys, argv):
    argv = [a.replace("{m}", str(tmp_path / "no-model")) for a in argv]
    with pytest.raises(SystemExit) as exc:  # a usage error: argparse exits
        main(argv)
    assert_one_line_error(exc.value.code, capsys.readouterr().err, "--precision", "invalid choice")


@pytest.mark.parametrize("command", ["chat", "serve"])
def test_dtype_and_precision_together_is_one_line_exit_2(toy, capsys, command):
    code = main([command, str(toy), "--dtype", "float32", "--precision", "bf16"])
    assert_one_line_error(code, capsys.readouterr().err, "--dtype float32", "--precision bf16")


# (flag, value, the plan's name in /health and eval's JSON, what the command prints): --quantize int8 is
# an inference plan like --precision, reported the same way (tests/test_quant.py tests its numbers)
PLANS = [("--precision", "bf16", "bf16", "precision: bf16 (requested)"),
         ("--quantize", "int8", "int8", "precision: int8 (int8 weights")]


@pytest.mark.parametrize("flag,value,name,printed", PLANS)
def test_chat_prints_its_precision(toy, monkeypatch, capsys, flag, value, name, printed):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    assert main(["chat", str(toy), "--temperature", "0", "--no-color", flag, value]) == 0
    captured = capsys.readouterr()
    assert CONVERSATIONS[0][2] in captured.out and printed in captured.err


@pytest.mark.parametrize("flag,value,name,printed", PLANS)
def test_serve_health_reports_the_precision(toy, flag, value, name, printed):
    from fastapi.testclient import TestClient

    from nanoseek.serve import build_app
    app, scheduler = build_app(toy, max_batch=2, **{flag.lstrip("-"): value})
    try:
        with TestClient(app) as client:
            assert client.get("/health").json()["precision"] == name
    finally:
        scheduler.shutdown()


@pytest.mark.parametrize("flag,value,name,printed", PLANS)
def test_eval_records_its_precision(tiny_task_model, capsys, flag, value, name, printed):
    assert main(["eval", str(tiny_task_model), "--task", "addition3", "--n", "2", "--k", "0",
                 "--max-new-tokens", "3", flag, value, "--json"]) == 0
    captured = capsys.readouterr()
    assert f'"precision": "{name}"' in captured.out and printed in captured.err


def test_bf16_experts_on_a_cpu_take_grouped_mm_without_gradients_only():
    """Inference (no gradients) runs bf16 experts through torch._grouped_mm's forward (the faster one
    for prefill); training keeps the per-expert loop, whose backward is the faster one."""
    from nanoseek.model.moe import grouped_mm_works, use_grouped_mm
    x = torch.zeros(4, 8, dtype=torch.bfloat16)
    if not grouped_mm_works(x):
        pytest.skip("torch._grouped_mm does not run in bf16 on this CPU")
    with torch.no_grad():
        assert use_grouped_mm(x)
    with torch.inference_mode():
        assert use_grouped_mm(x)
    assert not use_grouped_mm(x)  # gradients on: the loop
