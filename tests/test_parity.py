"""Logits equal transformers' DeepseekV3/V2 (installed version, offline, random weights) in both directions:
transformers saves -> nanoseek loads, and nanoseek saves -> transformers loads. fp32, max abs <= 1e-4.
"""

import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers")

from nanoseek import load_model, save_model  # noqa: E402

TOL = 1e-4
SEQ = 64
STD = 0.08  # larger than the 0.02 default so routing and attention are far from uniform

YARN_V3 = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 32,
           "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
YARN_V2 = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 8.0, "original_max_position_embeddings": 32,
           "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 0.707}

COMMON = dict(vocab_size=384, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
              num_hidden_layers=3, num_attention_heads=4, kv_lora_rank=32, qk_rope_head_dim=8,
              qk_nope_head_dim=16, v_head_dim=24, max_position_embeddings=256, initializer_range=STD)

CONFIGS = {
    # (a) V3: sigmoid + bias, group-limited top-k (4 groups, keep 2), q LoRA, YaRN
    "v3_grouped_qlora_yarn": ("v3", dict(COMMON, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
                                         n_group=4, topk_group=2, routed_scaling_factor=2.5, q_lora_rank=48,
                                         first_k_dense_replace=1, norm_topk_prob=True,
                                         rope_parameters=YARN_V3)),
    # (b) V3 without q LoRA (q_proj), no groups, no YaRN
    "v3_no_qlora": ("v3", dict(COMMON, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=2,
                               n_group=1, topk_group=1, routed_scaling_factor=1.5, q_lora_rank=None,
                               first_k_dense_replace=1, norm_topk_prob=True)),
    # (c) V2: softmax, greedy and group-limited greedy, norm_topk_prob false, YaRN with mscale != all_dim
    "v2_greedy": ("v2", dict(COMMON, n_routed_experts=8, n_shared_experts=2, num_experts_per_tok=3,
                             topk_method="greedy", routed_scaling_factor=1.0, q_lora_rank=None,
                             first_k_dense_replace=1, norm_topk_prob=False, rope_parameters=YARN_V2)),
    "v2_group_limited": ("v2", dict(COMMON, n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4,
                                    topk_method="group_limited_greedy", n_group=4, topk_group=2,
                                    routed_scaling_factor=16.0, q_lora_rank=40, first_k_dense_replace=0,
                                    norm_topk_prob=False)),
    # (d) V3 with no dense layer and a checkpoint that holds an MTP layer
    "v3_all_moe_mtp": ("v3", dict(COMMON, n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2,
                                  n_group=2, topk_group=1, routed_scaling_factor=2.5, q_lora_rank=48,
                                  first_k_dense_replace=0, num_mtp_layers=1)),
}


def build_hf(kind: str, kwargs: dict):
    if kind == "v3":
        cfg = transformers.DeepseekV3Config(**kwargs)
        cls = transformers.DeepseekV3ForCausalLM
    else:
        cfg = transformers.DeepseekV2Config(**kwargs)
        cls = transformers.DeepseekV2ForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            bias = getattr(m, "e_score_correction_bias", None)
            if bias is not None:
                bias.normal_(0.0, 0.1)  # non-zero: selection must use it, weights must not
    return model


def tokens(vocab: int, batch: int = 2) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, vocab, (batch, SEQ), generator=g)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_transformers_saves_nanoseek_loads(name, tmp_path):
    kind, kwargs = CONFIGS[name]
    hf = build_hf(kind, kwargs)
    hf.save_pretrained(tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # transformers declares num_mtp_layers but stores no MTP weights
        ours = load_model(tmp_path / "hf", dtype=torch.float32).eval()
    x = tokens(kwargs["vocab_size"])
    with torch.no_grad():
        expected, got = hf(x).logits, ours(x)
    diff = (expected - got).abs().max().item()
    assert expected.abs().max().item() > 0.5, "logits too small for a meaningful comparison"
    assert diff <= TOL, f"{name}: max abs logit difference {diff:.3g}"


@pytest.mark.parametrize("name", list(CONFIGS))
def test_nanoseek_saves_transformers_loads(name, tmp_path):
    kind, kwargs = CONFIGS[name]
    hf = build_hf(kind, kwargs)
    hf.save_pretrained(tmp_path / "hf")
    ours = load_model(tmp_path / "hf", dtype=torch.float32).eval() if not kwargs.get("num_mtp_layers") \
        else _with_random_mtp(tmp_path / "hf")
    save_model(ours, tmp_path / "ours")
    if kwargs.get("num_mtp_layers"):
        from safetensors import safe_open
        with safe_open(str(tmp_path / "ours" / "model.safetensors"), "pt") as f:
            n = kwargs["num_hidden_layers"]
            assert f"model.layers.{n}.eh_proj.weight" in f.keys()
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours", dtype=torch.float32).eval()
    x = tokens(kwargs["vocab_size"])
    with torch.no_grad():
        expected, got = back(x).logits, ours(x)
    diff = (expected - got).abs().max().item()
    assert diff <= TOL, f"{name}: max abs logit difference {diff:.3g}"


def _with_random_mtp(folder):
    """Load the main model from a transformers folder and give it a random MTP module."""
    from nanoseek import ModelConfig, Transformer
    cfg = ModelConfig.from_hf(folder / "config.json")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        main = load_model(folder, dtype=torch.float32)
    assert cfg.num_nextn_predict_layers == 1
    torch.manual_seed(2)
    model = Transformer(cfg).eval()
    missing, unexpected = model.load_state_dict(main.state_dict(), strict=False)
    assert all(k.startswith("mtp.") for k in missing) and not unexpected
    return model
