"""int8 weight-only inference (`--quantize int8`): the fast kernel against the pure-PyTorch reference,
the cached kernel probe, int8 logits close to fp32, greedy tokens through the engine, and the option
on chat, serve and eval with its errors."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import random_experts, random_tiny_model
from test_cli import assert_one_line_error
from toy import CONVERSATIONS

from nanoseek import generate
from nanoseek.cli import main
from nanoseek.errors import ConfigError
from nanoseek.infer import Engine, SamplingParams
from nanoseek.infer import quant
from nanoseek.infer.compute import inference_precision
from nanoseek.infer.quant import (KERNEL_ENV, Int8Linear, Int8RoutedExperts, avx512_works, dequantize, int8_copy,
                                  int8_kernel,
                                  int8_matmul, int8pack_works, is_quantized, quantize_int8, quantize_rows,
                                  reference_matmul)
from nanoseek.precision import CACHE_ENV, PROBE_FILE
from nanoseek.serve import load_engine

pytestmark = pytest.mark.usefixtures("one_thread")

needs_int8pack = pytest.mark.skipif(not int8pack_works(), reason="torch._weight_int8pack_mm is missing or wrong here")
needs_avx512 = pytest.mark.skipif(not avx512_works(), reason="the AVX-512 VNNI extension does not build or run here")
# the AVX-512 kernel quantizes each activation row to int16 (error <= 2^-16 of its largest value)
AVX512_RTOL = 1e-3
# the fast kernel takes bf16 activations and returns bf16: against the reference (fp32 activations,
# the same int8 weights) each output is within ~1% of the row's largest output
FAST_RTOL = 0.01
# a random tiny model's int8 logits against fp32: mean error within 10% of the mean |logit| (measured
# 4.8-5.5% with either kernel: the weights' rounding, which near-tied routing turns into another expert
# here and there; the fast kernel's bf16 activations add ~0.3%)
MODEL_RTOL = 0.1


@pytest.fixture(params=["avx512", "int8pack", "dequant"])
def kernel(request, monkeypatch):
    """Each test runs with each fast kernel (where it works) and with the reference path."""
    if request.param == "int8pack" and not int8pack_works():
        pytest.skip("torch._weight_int8pack_mm is missing or wrong here")
    if request.param == "avx512" and not avx512_works():
        pytest.skip("the AVX-512 VNNI extension does not build or run here")
    monkeypatch.setenv(KERNEL_ENV, request.param)
    return request.param


def test_quantize_rows_round_trip_error_is_half_a_step():
    w = torch.randn(64, 48)
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and s.shape == (64,)
    assert ((dequantize(q, s) - w).abs() <= s[:, None] / 2 + 1e-7).all()


@needs_int8pack
@pytest.mark.parametrize("M", [1, 2, 3, 5, 16])
@pytest.mark.parametrize("N,K", [(24, 48), (64, 128), (130, 256)])
def test_the_fast_kernel_agrees_with_the_reference(monkeypatch, M, N, K):
    agrees_with_the_reference(monkeypatch, "int8pack", M, N, K, FAST_RTOL)


def agrees_with_the_reference(monkeypatch, kernel: str, M: int, N: int, K: int, rtol: float):
    """int8_matmul forced to `kernel` against reference_matmul: within rtol of each row's largest
    value, and not the reference itself (the kernel ran)."""
    monkeypatch.setenv(KERNEL_ENV, kernel)
    q, s = quantize_rows(torch.randn(N, K))
    x = torch.randn(M, K)
    want = reference_matmul(x, q, s)
    got = int8_matmul(x, q, s)
    assert got.dtype == torch.float32 and got.shape == (M, N)
    err = (got - want).abs().amax(dim=1) / want.abs().amax(dim=1)
    assert (err < rtol).all(), err
    assert (got != want).any()


@needs_avx512
@pytest.mark.parametrize("M", [1, 2, 16])
@pytest.mark.parametrize("N,K", [(24, 48), (37, 56), (130, 256), (9, 1408), (3, 10944)])
def test_the_avx512_kernel_agrees_with_the_reference(monkeypatch, M, N, K):
    """Any K (a masked tail past each 64), odd N (a block of fewer rows), up to INT8PACK_MAX_ROWS rows."""
    agrees_with_the_reference(monkeypatch, "avx512", M, N, K, AVX512_RTOL)


def test_forcing_an_unavailable_avx512_kernel_falls_back(monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, "avx512")
    monkeypatch.setattr(quant, "_EXTENSION", [None])  # no compiler, or no VNNI
    kernel = int8_kernel("cpu")
    assert kernel.name == "dequant" and "unavailable" in kernel.reason
    q, s = quantize_rows(torch.randn(8, 64))
    x = torch.randn(1, 64)
    assert torch.equal(int8_matmul(x, q, s), reference_matmul(x, q, s))


@needs_avx512
def test_the_avx512_kernel_keeps_nan_rows_nan(monkeypatch):
    monkeypatch.setenv(KERNEL_ENV, "avx512")
    q, s = quantize_rows(torch.randn(8, 64))
    x = torch.randn(3, 64)
    x[1, 5] = float("nan")
    x[2, 7] = float("inf")
    out = int8_matmul(x, q, s)
    assert out[0].isfinite().all() and out[1:].isnan().all()


@needs_int8pack
def test_matmuls_the_kernel_cannot_take_use_the_reference(monkeypatch):
    """K % 16 != 0 (the kernel would read past each row) and more than INT8PACK_MAX_ROWS rows."""
    monkeypatch.setenv(KERNEL_ENV, "int8pack")
    for M, K in ((1, 40), (quant.INT8PACK_MAX_ROWS + 1, 64)):
        q, s = quantize_rows(torch.randn(32, K))
        x = torch.randn(M, K)
        assert torch.equal(int8_matmul(x, q, s), reference_matmul(x, q, s))
    q, s = quantize_rows(torch.randn(32, 64))
    # bf16 inputs the kernel would load misaligned (a strided view; a contiguous one 2 bytes off) go
    # through an aligned copy
    for x in (torch.randn(4, 130).bfloat16()[:, 1:65], torch.randn(1, 65).bfloat16()[:, 1:]):
        assert x.data_ptr() % 32
        want = reference_matmul(x.float(), q, s)
        got = int8_matmul(x, q, s).float()
        assert ((got - want).abs().amax(dim=1) < FAST_RTOL * want.abs().amax(dim=1)).all()


def fresh_probe(tmp_path, monkeypatch, avx512: bool):
    """No kernel chosen yet, the probe cache in tmp_path, int8pack working and avx512 as given."""
    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    monkeypatch.setattr(quant, "_KERNEL", {})
    monkeypatch.setattr(quant, "int8pack_works", lambda: True)
    monkeypatch.setattr(quant, "avx512_works", lambda: avx512)


def test_the_kernel_probe_is_cached_and_overridable(tmp_path, monkeypatch):
    fresh_probe(tmp_path, monkeypatch, avx512=False)
    timings = {"fp32": 2e-3, "int8pack": 1e-3, "dequant": 4e-3}
    calls = []
    monkeypatch.setattr(quant, "_time_gemv", lambda name, N, K: calls.append(name) or timings[name])
    kernel = int8_kernel("cpu")
    assert kernel.name == "int8pack" and "2.00x fp32" in kernel.reason
    assert sorted(calls) == ["dequant", "fp32", "int8pack"]
    cache = json.loads((tmp_path / PROBE_FILE).read_text())
    assert sum("int8_gemv=" in key for key in cache) == 3
    monkeypatch.setattr(quant, "_KERNEL", {})  # a new process: the timings come from the cache
    timings["int8pack"] = 1.0
    assert int8_kernel("cpu").name == "int8pack" and len(calls) == 3
    monkeypatch.setenv(KERNEL_ENV, "dequant")
    assert int8_kernel("cpu").name == "dequant"
    monkeypatch.delenv(KERNEL_ENV)
    assert int8_kernel("meta").name == "dequant"  # no probe off the CPU


def test_an_unknown_kernel_override_is_an_error_naming_it(monkeypatch):
    """NANOSEEK_INT8_KERNEL takes a kernel's name: a typo must not quietly fall back to the probe."""
    monkeypatch.setenv(KERNEL_ENV, "avx2")
    with pytest.raises(ConfigError, match="NANOSEEK_INT8_KERNEL='avx2'"):
        int8_kernel("cpu")


def test_a_broken_kernel_is_never_chosen(monkeypatch):
    monkeypatch.delenv(KERNEL_ENV, raising=False)
    monkeypatch.setattr(quant, "_KERNEL", {})
    monkeypatch.setattr(quant, "int8pack_works", lambda: False)
    monkeypatch.setattr(quant, "avx512_works", lambda: False)
    assert int8_kernel("cpu").name == "dequant"


def test_the_probe_picks_the_fastest_working_kernel(tmp_path, monkeypatch):
    fresh_probe(tmp_path, monkeypatch, avx512=True)
    timings = {"fp32": 2e-3, "avx512": 5e-4, "int8pack": 1e-3, "dequant": 4e-3}
    monkeypatch.setattr(quant, "_time_gemv", lambda name, N, K: timings[name])
    kernel = int8_kernel("cpu")
    assert kernel.name == "avx512" and "avx512 GEMV 4.00x fp32" in kernel.reason


def test_int8_experts_equal_the_dequantized_experts(kernel):
    """One or two tokens take the pair-by-pair path, more the sorted loop (blocks of over 16 rows: the
    dequantizing path): all compute the experts with the dequantized weights (to the kernel's bf16
    activations)."""
    experts = random_experts(8, 32, 16, seed=4)
    q = Int8RoutedExperts(experts)
    with torch.no_grad():  # the float model with the int8 model's (dequantized) weights
        experts.gate_up.copy_(dequantize(q.gate_up_q, q.gate_up_scale))
        experts.down.copy_(dequantize(q.down_q, q.down_scale))
    tol = {"int8pack": 0.03, "avx512": AVX512_RTOL}.get(kernel, 1e-4)
    for N in (1, 2, 5, 64):
        x = torch.randn(N, 32)
        idx = torch.stack([torch.randperm(8)[:3] for _ in range(N)])
        w = torch.rand(N, 3)
        with torch.no_grad():
            want = experts(x, idx, w)
            assert (q(x, idx, w) - want).abs().max() <= tol * want.abs().max(), N


def test_int8_copy_shares_what_it_does_not_quantize():
    model = random_tiny_model(0)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    q = int8_copy(model)
    assert is_quantized(q) and not is_quantized(model)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # unchanged
    assert q.embed_tokens.weight is model.embed_tokens.weight
    assert isinstance(q.lm_head, Int8Linear) and isinstance(q.layers[1].mlp.experts, Int8RoutedExperts)
    assert q.layers[1].mlp.gate.weight is model.layers[1].mlp.gate.weight  # routing stays fp32
    assert q.layers[0].self_attn.kv_b_proj.weight is model.layers[0].self_attn.kv_b_proj.weight
    assert q.dtype == torch.float32


def test_int8_model_logits_track_fp32(kernel):
    model = random_tiny_model(0, num_nextn_predict_layers=0)
    x = torch.randint(0, model.config.vocab_size, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        ref = model(x)
        got = int8_copy(model)(x)
    rel = (got - ref).abs().mean() / ref.abs().mean()
    assert rel < MODEL_RTOL, f"int8 mean relative logit error {rel:.3g}"
    assert (got.argmax(-1) == ref.argmax(-1)).float().mean() > 0.9


def test_quantize_int8_in_place_keeps_the_old_api():
    model = random_tiny_model(0)
    assert quantize_int8(model) is model and is_quantized(model)


# ---- the plan and the engine ---------------------------------------------------------------------
def test_the_int8_plan():
    plan = inference_precision("auto", "cpu", quantize="int8")
    assert plan.name == "int8" and plan.weights == torch.float32 and plan.bf16_min_tokens is None
    assert "int8 weights" in plan.describe() and plan.as_dict()["quantize"] == "int8"
    assert inference_precision("fp32", "cpu", quantize="int8").name == "int8"
    assert inference_precision("fp32", "cpu", quantize="none").name == "fp32"


@pytest.mark.parametrize("precision,device,quantize,match", [
    ("bf16", "cpu", "int8", "precision 'bf16'"),
    ("auto", "cuda", "int8", "CPU only"),
    ("auto", "cpu", "int4", "invalid quantize 'int4'"),
])
def test_bad_int8_plans_name_the_problem(precision, device, quantize, match):
    with pytest.raises(ConfigError, match=match):
        inference_precision(precision, device, quantize=quantize)


def test_the_engine_decodes_the_int8_model_greedily(kernel):
    """Engine with the int8 plan: an int8 copy (the model itself untouched), the fp32 cache, the same
    tokens as generate on that copy, batched and alone; and fp32's greedy tokens where they are clear."""
    model = random_tiny_model(4, initializer_range=1.0, num_nextn_predict_layers=0)
    plan = inference_precision("auto", "cpu", quantize="int8")
    engine = Engine(model, max_batch=4, precision=plan)
    assert engine.precision_plan.name == "int8" and is_quantized(engine.model) and not is_quantized(model)
    assert engine.dtype == torch.float32
    prompts = [[5, 17, 3, 99, 41, 8, 2, 60], [7, 7, 1], [300, 2, 9, 11, 40]]
    params = SamplingParams(max_tokens=8, temperature=0)
    got = [r.output_ids for r in engine.generate(prompts, params)]
    assert got == generate(engine.model, prompts, max_new_tokens=8)
    assert got == [generate(engine.model, [p], max_new_tokens=8)[0] for p in prompts]  # batch-independent
    # fp32's tokens up to the first position whose fp32 top-1 lead is within what int8 can flip
    # (20% of the mean |logit|; int8's mean error here is ~5%): a random model's near ties differ
    separated = 0
    for prompt, ref, tokens in zip(prompts, generate(model, prompts, max_new_tokens=8), got):
        with torch.inference_mode():
            logits = model(torch.tensor([prompt + ref]))[0, len(prompt) - 1:-1]
        top2 = logits.topk(2, dim=-1).values
        lead = 0
        while lead < len(ref) and top2[lead, 0] - top2[lead, 1] > 0.2 * logits.abs().mean():
            lead += 1
        assert tokens[:lead] == ref[:lead]
        separated += lead
    assert separated >= 4, "the test model's logits are not separated enough to compare"
    assert Engine(engine.model, max_batch=1).precision_plan.name == "int8"  # an int8 model: its own plan


def test_load_engine_int8_replays_the_toy_conversations(toy):
    """The toy model memorized its replies (well separated logits): int8 gives fp32's tokens."""
    engine32, tok = load_engine(toy, max_batch=4, precision="fp32")
    engine8, _ = load_engine(toy, max_batch=4, quantize="int8")
    assert engine8.precision_plan.name == "int8" and is_quantized(engine8.model)
    prompts = [tok.chat_prompt([{"role": "user", "content": q}])[0] for q, _, _ in CONVERSATIONS]
    params = SamplingParams(max_tokens=24, temperature=0)
    assert [r.output_ids for r in engine8.generate(prompts, params)] == \
        [r.output_ids for r in engine32.generate(prompts, params)]
    with pytest.raises(ConfigError, match="dtype or a precision"):
        load_engine(toy, dtype=torch.float32, quantize="int8")


# ---- the commands --------------------------------------------------------------------------------
# chat, serve and eval report --quantize int8 as their plan: tests/test_bf16_infer.py (PLANS)


@pytest.mark.parametrize("argv,words", [
    (["chat", "{m}", "--quantize", "int8", "--precision", "bf16"], ("quantize 'int8'", "precision 'bf16'")),
    (["serve", "{m}", "--quantize", "int8", "--device", "cuda"], ("quantize 'int8'", "CPU only")),
    (["chat", "{m}", "--quantize", "int8", "--dtype", "bf16"], ("--dtype bf16", "--quantize int8")),
    (["eval", "{m}", "--task", "addition3", "--quantize", "int8", "--precision", "bf16"],
     ("quantize 'int8'", "precision 'bf16'")),
])
def test_bad_int8_combinations_are_one_line_exit_2(toy, capsys, argv, words):
    code = main([a.replace("{m}", str(toy)) for a in argv])
    assert_one_line_error(code, capsys.readouterr().err, *words)


@pytest.mark.parametrize("command", [["chat"], ["serve"], ["eval", "--task", "addition3"]])
def test_a_bad_quantize_value_is_a_usage_error(tmp_path, capsys, command):
    with pytest.raises(SystemExit) as exc:
        main([command[0], str(tmp_path / "no-model"), *command[1:], "--quantize", "int4"])
    assert_one_line_error(exc.value.code, capsys.readouterr().err, "--quantize", "invalid choice")
