"""bf16 mixed-precision training and its parts: the fused chunked cross-entropy, the fp32 router under
autocast, bf16 grouped experts, activation checkpointing, the precision a run records and keeps on
resume, and MFU against the peak of the precision that runs."""

from __future__ import annotations

import json

import pytest
import test_grpo
import test_train
import torch
import torch.nn.functional as F
from conftest import random_experts
from test_train import losses, recipe

from nanoseek import ModelConfig, Transformer
from nanoseek.cost import CostMeter, device_peak, estimation
from nanoseek.errors import ConfigError
from nanoseek.model import moe as moe_module
from nanoseek.model.loss import chunk_rows, linear_cross_entropy
from nanoseek.precision import Precision
from nanoseek.train import TrainingError, train
from nanoseek.train.common import loss_masks, masked_cross_entropy, training_loss

pytestmark = pytest.mark.usefixtures("one_thread")
corpus = test_train.corpus  # the fixture: a tokenizer and a prepared data folder
policy = test_grpo.policy  # the fixture: a tiny random policy for the arithmetic task
BF16 = dict(device_type="cpu", dtype=torch.bfloat16)


# ---- the fused, chunked cross-entropy -----------------------------------------------------------
def _ce_inputs(seed=0, N=37, D=16, V=50):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(N, D, generator=g, requires_grad=True)
    w = torch.randn(V, D, generator=g, requires_grad=True)
    targets = torch.randint(0, V, (N,), generator=g)
    mask = torch.rand(N, generator=g) > 0.3
    return h, w, targets, mask


@pytest.mark.parametrize("chunk", [1, 5, 37, 100])
def test_chunked_cross_entropy_equals_the_plain_one_and_its_gradients(chunk):
    h, w, targets, mask = _ce_inputs()
    ref = masked_cross_entropy(F.linear(h, w)[None], targets[None], mask[None])
    ref_gh, ref_gw = torch.autograd.grad(ref, (h, w))
    weights = mask.float() / mask.sum()
    fused = linear_cross_entropy(h, w, torch.where(mask, targets, -100), weights, chunk=chunk)  # -100: padding
    gh, gw = torch.autograd.grad(fused, (h, w))
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gh, ref_gh, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-7)
    assert not gh[~mask].any()  # masked rows get no gradient


def test_chunked_cross_entropy_under_bf16_autocast_is_fp32_and_close_to_the_plain_one():
    h, w, targets, mask = _ce_inputs(N=64, V=300)
    with torch.autocast(**BF16):
        ref = F.cross_entropy(F.linear(h, w).float(), targets)
        fused = linear_cross_entropy(h, w, targets, torch.full((64,), 1 / 64))
    assert fused.dtype == torch.float32
    torch.testing.assert_close(fused, ref, rtol=1e-4, atol=1e-4)  # both from the same bf16 logits
    gh, gw = torch.autograd.grad(fused, (h, w))
    assert gh.dtype == gw.dtype == torch.float32  # master weights get fp32 gradients


def test_chunk_rows_bounds_the_fp32_logits():
    assert chunk_rows(4096) == 4096 and chunk_rows(129280) == 129 and chunk_rows(10**9) == 1


def test_training_loss_equals_the_logits_path_with_mtp():
    """Transformer(labels=...) as the trainer calls it == full logits + masked CE, main and MTP."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny")).train()
    for m in model.moe_layers():
        m.aux_loss_alpha = 0.01
    ids = torch.randint(0, model.config.vocab_size, (2, 17))

    class Batch:
        inputs, targets = ids[:, :-1], ids[:, 1:]
        target_mask = torch.ones_like(ids[:, 1:], dtype=torch.bool)
    rec = type("R", (), {"mode": "pretrain", "mtp_loss_weight": 0.3})()
    loss, parts = training_loss(model, Batch, rec)
    grads = torch.autograd.grad(loss, [model.lm_head.weight, model.layers[0].self_attn.kv_b_proj.weight])
    logits, mtp = model(Batch.inputs, return_mtp=True)
    masks = loss_masks(Batch, rec, len(model.mtp))
    ce = masked_cross_entropy(logits, Batch.targets, masks[0])
    mtp_ce = masked_cross_entropy(mtp[0], Batch.targets[:, 1:], masks[1])
    ref = ce + 0.3 * mtp_ce + model.aux_loss()
    ref_grads = torch.autograd.grad(ref, [model.lm_head.weight, model.layers[0].self_attn.kv_b_proj.weight])
    assert parts["loss"] == pytest.approx(ce.item(), rel=1e-6)
    assert parts["mtp_loss"] == pytest.approx(mtp_ce.item(), rel=1e-6)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-7)


# ---- the router and the experts under autocast ---------------------------------------------------
def test_router_stays_fp32_under_bf16_autocast():
    torch.manual_seed(0)
    moe = moe_module.MoE(ModelConfig.preset("tiny").replace(n_group=1, topk_group=1))
    moe.gate.weight.data.normal_(0, 0.5)
    moe.gate.e_score_correction_bias.data.normal_(0, 0.1)
    x = torch.randn(64, moe.gate.weight.shape[1])
    w32, i32, s32 = moe.gate(x)
    with torch.autocast(**BF16):
        w16, i16, s16 = moe.gate(x)
    assert s16.dtype == w16.dtype == torch.float32
    assert torch.equal(i16, i32) and torch.equal(s16, s32) and torch.equal(w16, w32)
    model = Transformer(ModelConfig.preset("tiny")).to(torch.bfloat16)
    for m in model.moe_layers():  # also when the whole model is cast
        assert m.gate.weight.dtype == m.gate.e_score_correction_bias.dtype == torch.float32


@pytest.mark.parametrize("grouped", [True, False])
def test_experts_run_bf16_under_autocast_with_fp32_master_gradients(grouped, monkeypatch):
    if grouped and not moe_module.grouped_mm_works(torch.zeros(1), torch.bfloat16):
        pytest.skip("torch._grouped_mm has no bf16 kernel on this backend")
    monkeypatch.setattr(moe_module, "use_grouped_mm", lambda t, dtype=None: grouped)
    experts = random_experts(6, 32, 16, seed=0, std=0.2)
    x = torch.randn(40, 32)
    indices = torch.stack([torch.randperm(6)[:2] for _ in range(40)])
    weights = torch.rand(40, 2)
    ref = experts(x, indices, weights)
    with torch.autocast(**BF16):
        out = experts(x, indices, weights)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.05, atol=0.02)
    out.float().sum().backward()
    assert experts.gate_up.grad.dtype == experts.down.grad.dtype == torch.float32


def test_grouped_and_loop_experts_agree_in_bf16(monkeypatch):
    """The grouped kernel (what CUDA runs in bf16) against the loop (what a CPU runs in bf16)."""
    if not moe_module.grouped_mm_works(torch.zeros(1), torch.bfloat16):
        pytest.skip("torch._grouped_mm has no bf16 kernel on this backend")
    assert not moe_module.use_grouped_mm(torch.zeros(1), torch.bfloat16)  # CPU bf16: the loop is faster
    experts = random_experts(6, 32, 16, seed=1, std=0.2)
    x, counts = torch.randn(30, 32), torch.tensor([5, 0, 10, 3, 7, 5])
    with torch.autocast(**BF16):
        loop = experts.grouped_experts(x, counts)
        monkeypatch.setattr(moe_module, "use_grouped_mm", lambda t, dtype=None: True)
        grouped = experts.grouped_experts(x, counts)
    torch.testing.assert_close(grouped.float(), loop.float(), rtol=0.02, atol=0.02)


# ---- activation checkpointing -------------------------------------------------------------------
def test_activation_checkpointing_gives_identical_losses_and_gradients():
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny")).train()
    ids = torch.randint(0, model.config.vocab_size, (2, 24))
    labels = [(ids[:, 1:], torch.full((2, 23), 1 / 46)), (ids[:, 2:], torch.full((2, 22), 1 / 44))]

    def run(checkpointing):
        model.activation_checkpointing = checkpointing
        model.zero_grad()
        out = model(ids[:, :-1], labels=labels)
        sum(out).backward()
        return [o.detach() for o in out], {n: p.grad.clone() for n, p in model.named_parameters()
                                          if p.grad is not None}
    plain, plain_grads = run(False)
    ckpt, ckpt_grads = run(True)
    assert all(torch.equal(a, b) for a, b in zip(plain, ckpt))
    assert plain_grads.keys() == ckpt_grads.keys()
    for name in plain_grads:
        assert torch.equal(plain_grads[name], ckpt_grads[name]), name


def test_activation_checkpointing_recipe_field_trains_the_same_losses(corpus, tmp_path):
    a = train(recipe(corpus, tmp_path / "a", max_steps=3, save_every=0))
    b = train(recipe(corpus, tmp_path / "b", max_steps=3, save_every=0, activation_checkpointing=True))
    assert a["step"] == b["step"] == 3
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


# ---- the precision of a run ---------------------------------------------------------------------
def test_bf16_run_records_its_precision_and_keeps_fp32_master_state(corpus, tmp_path, capsys):
    out = tmp_path / "bf16"
    summary = train(recipe(corpus, out, max_steps=3, precision="bf16"))
    assert "precision: bf16 (requested)" in capsys.readouterr().out
    assert summary["precision"] == "bf16"
    assert json.loads((out / "recipe.json").read_text())["resolved_precision"]["precision"] == "bf16"
    state = json.loads((out / "checkpoints" / "step-0000003" / "trainer.json").read_text())
    assert state["precision"] == "bf16"
    from safetensors.torch import load_file
    optim = load_file(out / "checkpoints" / "step-0000003" / "optimizer.safetensors")
    assert {t.dtype for k, t in optim.items() if k.endswith(("exp_avg", "exp_avg_sq"))} == {torch.float32}
    config = json.loads((out / "model" / "config.json").read_text())
    assert config.get("torch_dtype", config.get("dtype", "float32")) == "float32"
    assert all(torch.isfinite(torch.tensor(v)) for v in losses(out).values())


def test_bf16_losses_track_fp32_and_resume_keeps_the_precision(corpus, tmp_path):
    ref = train(recipe(corpus, tmp_path / "fp32", max_steps=6, precision="fp32"))
    assert ref["precision"] == "fp32"
    out = tmp_path / "bf16"
    train(recipe(corpus, out, max_steps=3, precision="bf16"))
    with pytest.raises(TrainingError, match="recipe field 'precision' was 'bf16' there and is 'fp32' now"):
        train(recipe(corpus, out, max_steps=6, precision="fp32", resume=True))
    resumed = train(recipe(corpus, out, max_steps=6, precision="auto", resume=True))  # auto: keeps bf16
    assert resumed["precision"] == "bf16"
    whole = train(recipe(corpus, tmp_path / "whole", max_steps=6, precision="bf16"))
    assert whole["precision"] == "bf16"
    assert losses(out) == losses(tmp_path / "whole")  # bf16 resumes bit for bit too
    a, b = losses(tmp_path / "fp32"), losses(out)
    assert all(abs(a[s] - b[s]) < 0.05 * a[s] for s in a)  # the same run up to bf16 rounding


def test_auto_is_fp32_where_the_probe_says_no_bf16(corpus, tmp_path, monkeypatch):
    from nanoseek import precision
    monkeypatch.delenv(precision.FORCE_ENV, raising=False)
    monkeypatch.setattr(precision, "bf16_speedup", lambda: 0.4)  # a CPU without AMX / AVX512-BF16
    summary = train(recipe(corpus, tmp_path / "auto", max_steps=1, precision="auto", save_every=0))
    assert summary["precision"] == "fp32"
    reason = json.loads((tmp_path / "auto" / "recipe.json").read_text())["resolved_precision"]["reason"]
    assert "0.40x" in reason


@pytest.mark.parametrize("field, value", [("precision", "fp16"), ("peak_flops", 0.0), ("peak_flops", -1.0)])
def test_bad_precision_fields_name_the_field(corpus, tmp_path, field, value):
    with pytest.raises(ConfigError, match=f"'{field}'"):
        recipe(corpus, tmp_path / "x", **{field: value})


# ---- MFU against the peak of what runs ----------------------------------------------------------
def test_run_mfu_uses_the_probe_of_its_precision_or_the_recipe_peak(corpus, tmp_path, monkeypatch):
    seen = []

    def fake_probe(dtype=torch.float32, *args, **kwargs):
        seen.append(dtype)
        return {torch.float32: 1e11, torch.bfloat16: 4e11}[dtype]
    monkeypatch.setattr(estimation, "measure_matmul_peak", fake_probe)
    train(recipe(corpus, tmp_path / "bf16", max_steps=1, precision="bf16", save_every=0))
    cost = json.loads((tmp_path / "bf16" / "cost.json").read_text())
    assert cost["peak_flops_per_device"] == 4e11 and "bfloat16" in cost["peak_source"]
    train(recipe(corpus, tmp_path / "fp32", max_steps=1, precision="fp32", save_every=0))
    assert json.loads((tmp_path / "fp32" / "cost.json").read_text())["peak_flops_per_device"] == 1e11
    train(recipe(corpus, tmp_path / "given", max_steps=1, precision="fp32", save_every=0, peak_flops=5e12))
    cost = json.loads((tmp_path / "given" / "cost.json").read_text())
    assert (cost["peak_flops_per_device"], cost["peak_source"]) == (5e12, "given")
    assert seen == [torch.bfloat16, torch.float32]


def test_datasheet_peaks_follow_the_precision():
    assert device_peak("h100", torch.bfloat16)[1:] == (989e12, "datasheet dense bf16")
    assert device_peak("h100", torch.float32)[1:] == (67e12, "datasheet dense fp32")
    assert device_peak("a100", torch.float32)[1] == 19.5e12


@pytest.mark.parametrize("name", ["NVIDIA GeForce RTX 4090", "NVIDIA L40S", "NVIDIA A10G"])
def test_an_unknown_gpu_is_measured_not_an_error(name, monkeypatch, tmp_path):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    measured = []
    monkeypatch.setattr(estimation, "measure_cuda_matmul_peak",
                        lambda dtype, device="cuda": measured.append((dtype, device)) or 1.5e14)
    entry, peak, source = device_peak("cuda:0", torch.bfloat16)
    assert (entry.name, peak) == (name, 1.5e14) and "measured bfloat16" in source and name in source
    assert measured == [(torch.bfloat16, "cuda:0")]
    meter = CostMeter(ModelConfig.preset("tiny"), tmp_path / "cost.json", device="cuda:0",
                      probe_dtype=torch.bfloat16, seq_len=16)
    assert meter.peak_flops == 1.5e14
    known = CostMeter(ModelConfig.preset("tiny"), tmp_path / "c.json", device="cuda", probe_dtype=torch.float32,
                      seq_len=16)
    assert known.peak_flops == 1.5e14  # still this unknown GPU (faked); a known one reads the table:
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H100 80GB HBM3")
    assert device_peak("cuda", torch.float32)[1] == 67e12


def test_precision_autocast_is_what_the_trainer_uses():
    """The trainer's forward under Precision('bf16').autocast runs the model's matmuls in bf16."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny"))
    ids = torch.randint(0, model.config.vocab_size, (1, 8))
    with Precision("bf16", "test").autocast("cpu"):
        assert model(ids).dtype == torch.bfloat16
    assert model(ids).dtype == torch.float32


def test_padded_bf16_expert_loop_equals_the_plain_loop():
    """CPU bf16 experts (`_PaddedExperts`: rows padded to ROW_BUCKET for oneDNN's kernel cache, the
    backward written out) against autograd through the plain per-expert loop: same rows out, same
    gradients in the masters' dtype, zeros for the empty expert; frozen weights get none."""
    experts = random_experts(5, 32, 16, seed=2, std=0.2)
    counts = torch.tensor([3, 0, 33, 1, 40])
    x = torch.randn(int(counts.sum()), 32, requires_grad=True)
    with torch.autocast(**BF16):
        padded = experts.grouped_experts(x, counts)  # CPU + bf16: the padded loop
        plain = experts._loop(x.to(torch.bfloat16), counts, dtype=torch.bfloat16)
    assert padded.shape == plain.shape == x.shape and padded.dtype == torch.bfloat16
    torch.testing.assert_close(padded, plain, rtol=0.01, atol=0.01)
    g_pad = torch.autograd.grad(padded.float().square().sum(), [x, experts.gate_up, experts.down])
    g_plain = torch.autograd.grad(plain.float().square().sum(), [x, experts.gate_up, experts.down])
    for a, b in zip(g_pad, g_plain):
        assert a.dtype == b.dtype == torch.float32
        torch.testing.assert_close(a, b, rtol=0.02, atol=0.02)
    assert g_pad[1][1].abs().sum() == 0 and g_pad[2][1].abs().sum() == 0  # expert 1 had no rows
    experts.requires_grad_(False)
    with torch.autocast(**BF16):
        frozen = experts.grouped_experts(x, counts)
    (g_x,) = torch.autograd.grad(frozen.float().square().sum(), [x])
    assert torch.equal(g_x, g_pad[0])


def test_kept_bf16_weight_copies_follow_the_masters():
    """The bf16 copies _PaddedExperts keeps between steps (_Bf16Buffers) are refreshed at every forward:
    weights changed in place (as fused AdamW does, without a version bump) are what the next forward
    and its backward read; two forwards before one backward each keep their own copy (the second
    forward finds the kept one in use); a deep copy of the experts keeps buffers of its own."""
    import copy
    experts = random_experts(4, 32, 16, seed=3, std=0.2)
    counts = torch.tensor([5, 0, 9, 2])
    x = torch.randn(int(counts.sum()), 32)

    def plain():
        with torch.autocast(**BF16):
            out = experts._loop(x.to(torch.bfloat16), counts, dtype=torch.bfloat16)
        return out, torch.autograd.grad(out.float().square().sum(), [experts.gate_up, experts.down])

    def padded():
        with torch.autocast(**BF16):
            return experts.grouped_experts(x, counts)

    first = padded()
    first.float().square().sum().backward()
    with torch.no_grad():
        for w in (experts.gate_up, experts.down):
            w.data.mul_(-1.5)  # in place, no version bump: a stale copy would go unnoticed by autograd
    experts.zero_grad()
    a = padded()  # the kept copies, refreshed
    b_ref, b_grads = plain()
    torch.testing.assert_close(a, b_ref, rtol=0.01, atol=0.01)
    with torch.no_grad():
        experts.down.data.mul_(0.5)
    b = padded()  # a's copies are still in use (its backward has not run): b gets copies of its own
    assert b.data_ptr() != a.data_ptr()
    b_ref2, b_grads2 = plain()
    a.float().square().sum().backward()  # a's gradients: the weights as they were at a's forward
    grads_a = [w.grad.clone() for w in (experts.gate_up, experts.down)]
    experts.zero_grad()
    b.float().square().sum().backward()
    for got, want in zip(grads_a, b_grads):
        torch.testing.assert_close(got, want, rtol=0.02, atol=0.02)
    for got, want in zip((experts.gate_up.grad, experts.down.grad), b_grads2):
        torch.testing.assert_close(got, want, rtol=0.02, atol=0.02)
    twin = copy.deepcopy(experts)
    assert twin._bf16_buffers is not experts._bf16_buffers and twin._bf16_buffers.weights is None


def test_grpo_in_bf16_records_it_and_keeps_it_on_resume(policy, tmp_path):
    """GRPO's policy and reference forwards under bf16 autocast: finite losses and KL, the precision
    recorded, kept by an `auto` resume and refused as fp32."""
    out = tmp_path / "grpo"
    summary = test_grpo.run(test_grpo._recipe(policy, out, beta=0.05, mu=2, max_steps=1, precision="bf16"))
    assert summary["precision"] == "bf16"
    row = test_grpo.rows(out)[-1]
    assert all(torch.isfinite(torch.tensor(row[k])) for k in ("loss", "kl", "grad_norm"))
    with pytest.raises(test_grpo.GRPOError, match="'precision' was 'bf16'"):
        test_grpo.run(test_grpo._recipe(policy, out, beta=0.05, mu=2, max_steps=2, precision="fp32", resume=True))
    resumed = test_grpo.run(test_grpo._recipe(policy, out, beta=0.05, mu=2, max_steps=2, resume=True))
    assert resumed["precision"] == "bf16"
