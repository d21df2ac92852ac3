"""Model behaviour: absorbed latent-cache decoding, routing by hand, dropless dispatch, aux loss, MTP."""

import math

import pytest
import torch

from conftest import random_experts
from nanoseek import LatentCache, ModelConfig, Transformer
from nanoseek.model.attention import segment_mask
from nanoseek.model.moe import Gate, RoutedExperts
from nanoseek.model.rope import rope_frequencies


def tiny(**overrides) -> ModelConfig:
    return ModelConfig.preset("tiny", initializer_range=0.08, **overrides)


def model_for(cfg: ModelConfig, seed: int = 0) -> Transformer:
    torch.manual_seed(seed)
    m = Transformer(cfg).eval()
    with torch.no_grad():
        for layer in m.moe_layers():
            if layer.gate.e_score_correction_bias is not None:
                layer.gate.e_score_correction_bias.normal_(0, 0.1)
    return m


@pytest.mark.parametrize("q_lora_rank", [64, None])
def test_token_by_token_absorbed_decode_equals_full_forward(q_lora_rank):
    cfg = tiny(q_lora_rank=q_lora_rank, rope_scaling={"factor": 4.0, "original_max_position_embeddings": 16,
                                                      "mscale": 1.0, "mscale_all_dim": 1.0})
    model = model_for(cfg)
    x = torch.randint(0, cfg.vocab_size, (3, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(x)
        cache = LatentCache(cfg, batch_size=3, max_len=40)
        steps = [model(x[:, :8], cache=cache)]  # prefill through the full path
        for t in range(8, 40):
            steps.append(model(x[:, t:t + 1], cache=cache))  # one token through the absorbed path
    decoded = torch.cat(steps, dim=1)
    assert cache.length == 40
    assert (decoded - full).abs().max().item() <= 1e-4


def test_chunk_after_prefix_uses_causal_mask():
    """Several new tokens at once after a cached prefix (speculative verification's shape)."""
    cfg = tiny()
    model = model_for(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 24), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(x)
        cache = LatentCache(cfg, 2, 24)
        a = model(x[:, :10], cache=cache)
        b = model(x[:, 10:15], cache=cache)
        c = model(x[:, 15:], cache=cache)
    assert (torch.cat([a, b, c], 1) - full).abs().max().item() <= 1e-4


def test_latent_cache_holds_only_latent_and_rope_key():
    cfg = ModelConfig.preset("deepseek-v3")
    cache = LatentCache(cfg, batch_size=1, max_len=1, with_mtp=False, device="meta", dtype=torch.bfloat16)
    assert cache.latent.shape[-1] + cache.rope_key.shape[-1] == 576  # 512 + 64 per token per layer
    assert cache.bytes_per_token() == 61 * 576 * 2
    small = LatentCache(tiny(), 1, 4)
    with pytest.raises(ValueError, match="overflow"):
        small.write(0, 3, torch.zeros(1, 2, 32), torch.zeros(1, 2, 16))


def test_gate_by_hand_bias_selects_but_does_not_weigh():
    cfg = tiny(n_routed_experts=8, num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.0)
    gate = Gate(cfg)
    # Choose logits so sigmoid scores are known: s = sigmoid(logit)
    logits = torch.tensor([[3.0, -3.0, 0.0, -0.5, 2.0, 1.9, -1.0, 4.0]])
    s = logits.sigmoid()
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[:, 0] = logits[0]  # x = e_0 makes x W^T = logits
        gate.e_score_correction_bias.copy_(torch.tensor([0, 0, 0, 0, 0, 0.5, 0, -2.0]))
    x = torch.zeros(1, cfg.hidden_size)
    x[0, 0] = 1.0
    weights, idx, scores = gate(x)
    # choice = s + bias; groups of 2: g0={0,1}, g1={2,3}, g2={4,5}, g3={6,7}; group score = sum of top-2
    choice = s[0] + gate.e_score_correction_bias
    group = choice.view(4, 2).sum(-1)
    assert group.argsort(descending=True)[:2].tolist() == [2, 0]
    # expert 7 has the largest raw score but its bias sinks its group: never selected
    assert sorted(idx[0].tolist()) == [0, 5]
    w = s[0, [0, 5]]
    expected = w / w.sum() * 2.0  # weights from the unbiased scores, normalised, scaled
    got = weights[0][idx[0].argsort()]
    assert torch.allclose(got, expected, atol=1e-6)
    assert torch.allclose(scores, s)


def test_group_limited_greedy_uses_max_and_softmax():
    cfg = tiny(model_type="deepseek_v2", scoring_func="softmax", topk_method="group_limited_greedy",
               norm_topk_prob=False, n_routed_experts=6, num_experts_per_tok=2, n_group=3, topk_group=1,
               routed_scaling_factor=1.0)
    gate = Gate(cfg)
    assert gate.e_score_correction_bias is None
    logits = torch.tensor([[2.0, -5.0, 1.5, 1.5, 0.0, 0.0]])
    with torch.no_grad():
        gate.weight.zero_()
        gate.weight[:, 0] = logits[0]
    x = torch.zeros(1, cfg.hidden_size)
    x[0, 0] = 1.0
    weights, idx, _ = gate(x)
    p = logits.softmax(-1)[0]
    # max per group: g0=2.0 wins over g1=1.5 (a sum of top-2 would pick g1: 3.0 > -3.0)
    assert sorted(idx[0].tolist()) == [0, 1]
    assert torch.allclose(weights[0][idx[0].argsort()], p[[0, 1]], atol=1e-6)


def test_dropless_dispatch_equals_per_token_loop():
    E, D, I, N, k = 6, 16, 8, 40, 3
    experts = random_experts(E, D, I, seed=0)
    x = torch.randn(N, D)
    idx = torch.stack([torch.randperm(E - 1)[:k] for _ in range(N)])  # expert E-1 receives no token
    w = torch.rand(N, k)
    got = experts(x, idx, w)
    ref = torch.zeros(N, D)
    for n in range(N):
        for j in range(k):
            e = idx[n, j]
            g, u = (experts.gate_up[e] @ x[n]).chunk(2)
            ref[n] += w[n, j] * (experts.down[e] @ (torch.nn.functional.silu(g) * u))
    assert torch.allclose(got, ref, atol=1e-5)


def test_decode_paths_equal_the_sorted_dispatch():
    """Inference on a few tokens runs pair by pair (N * k <= FEW_PAIRS), on more through the sorted
    dispatch: both give the training path's numbers (64 experts: too many to run them all)."""
    from nanoseek.model.moe import FEW_PAIRS
    E, D, I, k = 64, 16, 8, 6
    experts = random_experts(E, D, I, seed=3)
    for N in (1, 2, 4):
        x = torch.randn(N, D)
        idx = torch.stack([torch.randperm(E)[:k] for _ in range(N)])
        idx[-1, 0] = idx[0, 1]  # an expert shared by two tokens (or twice nothing for N = 1)
        w = torch.rand(N, k)
        reference = experts(x, idx, w)  # grad enabled: the training dispatch
        with torch.inference_mode():
            assert not experts._all_experts_pays(N, k)
            assert (N * k <= FEW_PAIRS) == (N <= 2)
            got = experts(x, idx, w)
        assert torch.allclose(got, reference, atol=1e-5), N


def test_small_batch_all_experts_path_equals_dispatch():
    experts = random_experts(8, 16, 8, seed=1)
    x = torch.randn(5, 16)
    idx = torch.stack([torch.randperm(8)[:3] for _ in range(5)])
    w = torch.rand(5, 3)
    with torch.no_grad():
        fast = experts(x, idx, w)  # 2 * 5 * 3 >= 8 experts: every expert at once
    sorted_path = experts(x, idx, w)  # grad enabled: sorted dispatch
    assert torch.allclose(fast, sorted_path, atol=1e-5)
    # which path: decoding a few rows runs every expert; a 256-token prefill would waste 3x the FLOPs
    # of the selected experts (top-4 of 16) on the others, and dispatches instead; so do few tokens
    # that cannot hit most experts, and experts too big to stay in cache
    bench = RoutedExperts(16, 256, 128)
    assert experts._all_experts_pays(5, 3) and bench._all_experts_pays(8, 4)
    assert not bench._all_experts_pays(256, 4) and not bench._all_experts_pays(1, 4)
    assert not RoutedExperts(64, 512, 256)._all_experts_pays(1, 6)  # 100 MB of experts


def test_grouped_mm_path_equals_the_expert_loop(monkeypatch):
    """torch._grouped_mm (where the backend has it) and the per-expert loop: same outputs and the same
    gradients for inputs and stacked weights, with experts that receive no token (zero gradient)."""
    from nanoseek.model import moe as moe_module
    experts = random_experts(8, 16, 8, seed=2)
    x = torch.randn(12, 16)
    idx = torch.stack([torch.randperm(5)[:2] for _ in range(12)])  # experts 5, 6, 7 get nothing
    w = torch.rand(12, 2)

    def run(grouped: bool):
        monkeypatch.setattr(moe_module, "use_grouped_mm", lambda t, dtype=None: grouped)
        experts.zero_grad()
        xs = x.clone().requires_grad_()
        out = experts(xs, idx, w)
        out.sum().backward()  # an expanded gradient: _grouped_mm's backward needs it made contiguous
        return out.detach(), xs.grad, experts.gate_up.grad.clone(), experts.down.grad.clone()

    available = moe_module.use_grouped_mm(x)  # torch 2.13 on CPU: yes (pinned in constraints.txt)
    monkeypatch.setattr(moe_module, "_GROUPED_MM", {})
    with torch.inference_mode():  # the engine decodes in inference mode: the probe must still work there
        assert moe_module.use_grouped_mm(x) == available
    loop = run(False)
    if not available:
        pytest.skip("torch._grouped_mm does not run on CPU fp32 in this torch")
    grouped = run(True)
    for a, b in zip(loop, grouped):
        assert torch.allclose(a, b, atol=1e-5)
    assert grouped[2][5:].abs().sum() == 0 and grouped[3][5:].abs().sum() == 0


def test_sequence_aux_loss_by_hand():
    cfg = tiny(aux_loss_alpha=0.01)
    model = model_for(cfg).train()
    moe = model.moe_layers()[0]
    scores = torch.tensor([[[0.5, 0.5, 0.0, 0.0], [0.25, 0.25, 0.25, 0.25]]])  # B=1, T=2, E=4
    indices = torch.tensor([[[0, 1], [0, 2]]])  # top-2
    moe.top_k = 2
    loss = moe.sequence_aux_loss(scores, indices)
    f = torch.tensor([2, 1, 1, 0]) * 4 / (2 * 2)
    p = torch.tensor([0.375, 0.375, 0.125, 0.125])
    assert math.isclose(loss.item(), 0.01 * (f * p).sum().item(), rel_tol=1e-6)


def test_training_forward_reports_load_and_aux_loss():
    cfg = tiny(aux_loss_alpha=0.001)
    model = model_for(cfg).train()
    x = torch.randint(0, cfg.vocab_size, (2, 16))
    logits, mtp = model(x, return_mtp=True)
    assert logits.shape == (2, 16, cfg.vocab_size)
    assert [t.shape for t in mtp] == [(2, 15, cfg.vocab_size)]
    loads = [layer.mlp.expert_load for layer in model.layers[cfg.first_k_dense_replace:]]
    assert loads and all(load.sum().item() == 2 * 16 * cfg.num_experts_per_tok for load in loads)
    assert model.mtp[0].block.mlp.expert_load.sum().item() == 2 * 15 * cfg.num_experts_per_tok
    aux = model.aux_loss()
    assert aux is not None and aux.item() > 0
    (logits.mean() + mtp[0].mean() + aux).backward()
    assert model.mtp[0].eh_proj.weight.grad is not None
    assert model.layers[1].mlp.gate.weight.grad is not None  # the aux loss reaches the gate


def test_gate_params_stay_fp32_under_dtype_cast():
    model = model_for(tiny())
    before = model.moe_layers()[0].gate.e_score_correction_bias.clone()
    model = model.to(torch.bfloat16)
    gate = model.moe_layers()[0].gate
    assert torch.equal(gate.e_score_correction_bias, before)  # not rounded through bf16
    assert gate.weight.dtype == torch.float32 and gate.e_score_correction_bias.dtype == torch.float32
    assert model.layers[0].self_attn.kv_b_proj.weight.dtype == torch.bfloat16
    out = model(torch.randint(0, 1024, (1, 4)))
    assert out.dtype == torch.bfloat16


def test_yarn_matches_reference_formula():
    cfg = tiny(rope_scaling={"factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                             "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707})
    inv_freq, amplitude = rope_frequencies(cfg)
    m = 0.1 * 0.707 * math.log(40) + 1
    assert math.isclose(cfg.softmax_scale, 48 ** -0.5 * m * m, rel_tol=1e-9)
    assert math.isclose(amplitude, 1.0)
    base = 1.0 / 10000 ** (torch.arange(0, 16, 2) / 16)
    assert torch.allclose(inv_freq[0], base[0])  # fastest dim extrapolates
    assert torch.allclose(inv_freq[-1], base[-1] / 40)  # slowest dim interpolates


def test_bad_input_shape():
    model = Transformer(tiny())
    with pytest.raises(ValueError, match="input_ids"):
        model(torch.zeros(4, dtype=torch.long))


def test_packed_segments_equal_separate_sequences():
    cfg = tiny()
    model = model_for(cfg)
    a = torch.randint(0, cfg.vocab_size, (1, 10), generator=torch.Generator().manual_seed(5))
    b = torch.randint(0, cfg.vocab_size, (1, 7), generator=torch.Generator().manual_seed(6))
    packed = torch.cat([a, b], dim=1)
    segments = torch.tensor([[0] * 10 + [1] * 7])
    positions = torch.tensor([list(range(10)) + list(range(7))])
    with torch.no_grad():
        got, got_mtp = model(packed, positions=positions, segment_ids=segments, return_mtp=True)
        ref_a, mtp_a = model(a, return_mtp=True)
        ref_b, mtp_b = model(b, return_mtp=True)
    assert torch.allclose(got[:, :10], ref_a, atol=1e-5)
    assert torch.allclose(got[:, 10:], ref_b, atol=1e-5)
    # MTP depth 1 at position i uses token i+1: rows inside segment a (i < 9) match a alone
    assert torch.allclose(got_mtp[0][:, :9], mtp_a[0], atol=1e-5)


def test_segment_mask_is_causal_within_segments():
    seg = torch.tensor([[0, 0, 1, 1, 1, -1]])
    mask = segment_mask(seg)[0]
    assert mask.shape == (6, 6)
    assert mask[1, 0] and not mask[0, 1]         # causal
    assert not mask[2, 1] and mask[4, 2]         # no attention across documents
    assert mask[5, 5] and not mask[5, 4]         # padding attends only itself


def test_cached_forward_logits_of_the_last_position_and_an_mtp_draft():
    """What the engine calls: forward_cached (hidden states, last-position logits, the cache advances),
    then mtp_draft + mtp_head over the same slots, equal to the training forward's MTP logits."""
    cfg = tiny(num_nextn_predict_layers=1)
    model = model_for(cfg)
    x = torch.randint(0, cfg.vocab_size, (2, 12), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        full, (mtp,) = model(x, return_mtp=True)
        cache = LatentCache(cfg, 2, 16)
        positions = torch.arange(11)[None]
        main = model.forward_cached(x[:, :11], cache, positions, last_only=True)
        assert cache.length == 11 and main.hidden.shape == (2, 11, cfg.hidden_size) and main.mask is None
        assert main.logits.shape == (2, 1, cfg.vocab_size)
        assert torch.allclose(main.logits[:, 0], full[:, 10], atol=1e-5)
        draft = model.mtp_head(model.mtp_draft(main, x[:, 1:12], positions, cache, 0))
        assert torch.allclose(draft, mtp, atol=1e-5)
        step = model.forward_cached(x[:, 11:], cache).logits  # the next token attends to the 11 cached ones
        assert cache.length == 12 and torch.allclose(step[:, 0], full[:, 11], atol=1e-5)


def test_dispatch_and_permutation_gradients_are_bitwise_index_selects():
    """The routed experts' gather of each token's rows (`_Dispatch`) and the permutation back
    (`_Permute`) have hand-written backwards (a gather and k adds instead of index_select's CPU
    scatter_add): values and gradients bitwise those of plain index_select."""
    from nanoseek.model.moe import _Dispatch, _Permute
    torch.manual_seed(4)
    N, k, D, E = 37, 3, 8, 5
    flat = torch.stack([torch.randperm(E)[:k] for _ in range(N)]).flatten()
    order = flat.argsort(stable=True)
    inverse = order.argsort()
    x = torch.randn(N, D, requires_grad=True)
    g = torch.randn(N * k, D)
    ours = _Permute.apply(_Dispatch.apply(x, order, inverse, k), inverse, order)
    plain = x.index_select(0, order // k).index_select(0, inverse)
    assert torch.equal(ours, plain)
    (got,) = torch.autograd.grad(ours, x, g)
    (want,) = torch.autograd.grad(plain, x, g)
    assert torch.equal(got, want)


def test_rms_norm_of_bf16_rows_is_transformers_formula_bitwise():
    """RMSNorm on bf16 rows (the q/kv latents under bf16 autocast) runs the fused kernel in fp32; its
    output and gradients are bitwise those of transformers' DeepseekV3RMSNorm formula."""
    from nanoseek.model.norm import RMSNorm
    torch.manual_seed(0)
    norm = RMSNorm(96)
    norm.weight.data = torch.randn(96)
    x = torch.randn(4, 16, 96).bfloat16().requires_grad_()
    y = norm(x)
    h = x.float()
    ref = norm.weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + norm.eps)).to(x.dtype)
    assert torch.equal(y, ref)
    g = torch.randn_like(ref)
    for a, b in zip(torch.autograd.grad(y, [x, norm.weight], g), torch.autograd.grad(ref, [x, norm.weight], g)):
        assert torch.equal(a, b)
