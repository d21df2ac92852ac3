"""int8 weight-only decoding: close to fp32 logits, same greedy path on a tiny model, and bad-free."""

import torch

from conftest import random_experts
from nanoseek import ModelConfig, Transformer, generate
from nanoseek.infer.quant import Int8Linear, Int8RoutedExperts, int8_matmul, quantize_int8, quantize_rows


def test_quantize_rows_round_trip_error_is_half_a_step():
    w = torch.randn(64, 48)
    q, s = quantize_rows(w)
    assert q.dtype == torch.int8 and s.shape == (64,)
    assert ((q.float() * s[:, None] - w).abs() <= s[:, None] / 2 + 1e-7).all()
    x = torch.randn(3, 48)
    deq = q.float() * s[:, None]
    # activations travel as two int8 digits: each within max|x| / (2 * 127^2) of x, so each output
    # within that times the row's sum |w| of the product with the dequantized weights
    bound = x.abs().amax(dim=1, keepdim=True) / (2 * 127**2) * deq.abs().sum(dim=1) + 1e-5
    err = (int8_matmul(x, q, s) - x @ deq.T).abs()
    assert (err <= bound).all() and err.max() > 0  # (> 0: the digits path ran, not a dequantized copy)


def test_quantized_model_tracks_fp32():
    cfg = ModelConfig.preset("tiny", num_nextn_predict_layers=0, initializer_range=0.05)
    torch.manual_seed(0)
    model = Transformer(cfg).eval()
    x = torch.randint(0, cfg.vocab_size, (2, 32))
    with torch.no_grad():
        ref = model(x)
    prompts = x[:, :8].tolist()
    ref_tokens = generate(model, prompts, max_new_tokens=8)
    quantize_int8(model)
    assert isinstance(model.lm_head, Int8Linear)
    assert isinstance(model.layers[1].mlp.experts, Int8RoutedExperts)
    assert model.layers[1].mlp.gate.weight.dtype == torch.float32  # routing stays full precision
    with torch.no_grad():
        got = model(x)
    # mean error: a random model's routing is near ties, so a few tokens may switch experts
    rel = (got - ref).abs().mean() / ref.abs().mean()
    assert rel < 0.1, f"int8 mean relative logit error {rel:.3g}"
    out = generate(model, prompts, max_new_tokens=8)
    assert [len(r) for r in out] == [len(r) for r in ref_tokens]


def test_int8_experts_decode_path_equals_the_dequantized_experts():
    """One or two tokens take the pair-by-pair int8 path, more the sorted loop: both compute the
    experts with the dequantized weights (to the activations' two-digit precision)."""
    experts = random_experts(8, 32, 16, seed=4)
    q = Int8RoutedExperts(experts)
    with torch.no_grad():  # the float model with the int8 model's (dequantized) weights
        experts.gate_up.copy_(q.gate_up_q.float() * q.gate_up_scale[..., None])
        experts.down.copy_(q.down_q.float() * q.down_scale[..., None])
    for N in (1, 2, 5):
        x = torch.randn(N, 32)
        idx = torch.stack([torch.randperm(8)[:3] for _ in range(N)])
        w = torch.rand(N, 3)
        with torch.no_grad():
            assert torch.allclose(q(x, idx, w), experts(x, idx, w), atol=1e-3, rtol=1e-3), N
