"""Behaviour specs for ModelConfig: HF config.json in both RoPE spellings, round trips, agreement with
transformers' DeepseekV3Config / DeepseekV2Config, routing defaults, the published DeepSeek-V3 values."""

from __future__ import annotations

import json
import math

import pytest
import torch

from nanoseek import ConfigError, ModelConfig
from nanoseek.config import PRESETS

ARCH_FIELDS = (
    "vocab_size", "hidden_size", "intermediate_size", "moe_intermediate_size", "num_hidden_layers",
    "first_k_dense_replace", "num_attention_heads", "num_key_value_heads", "n_routed_experts",
    "n_shared_experts", "num_experts_per_tok", "n_group", "topk_group", "norm_topk_prob",
    "routed_scaling_factor", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
    "v_head_dim", "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "hidden_act",
    "attention_bias", "bos_token_id", "eos_token_id",
)
YARN = {"factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
        "mscale": 1.0, "mscale_all_dim": 1.0}


@pytest.fixture(scope="module")
def transformers():
    tf = pytest.importorskip("transformers")
    tf.logging.set_verbosity_error()
    return tf


def _hf_dict(**overrides) -> dict:
    d = ModelConfig.preset("tiny").to_hf()
    d.pop("rope_scaling")
    d.pop("rope_theta")
    d.update(overrides)
    return d


# ---- reading config.json -------------------------------------------------------------------------
def test_old_and_new_rope_spellings_read_the_same():
    old = _hf_dict(rope_theta=50000.0, rope_scaling={"type": "yarn", **YARN})
    new = _hf_dict(rope_parameters={"rope_type": "yarn", "rope_theta": 50000.0, **YARN})
    a, b = ModelConfig.from_hf(old), ModelConfig.from_hf(new)
    assert a == b
    assert a.rope_theta == 50000.0
    assert a.rope_scaling == YARN
    assert a.yarn["factor"] == 40.0 and a.yarn["mscale_all_dim"] == 1.0


def test_rope_type_spelling_in_old_field_and_default_rope():
    a = ModelConfig.from_hf(_hf_dict(rope_theta=1e4, rope_scaling={"rope_type": "yarn", **YARN}))
    assert a.rope_scaling == YARN
    plain_old = ModelConfig.from_hf(_hf_dict(rope_theta=20000.0, rope_scaling=None))
    plain_new = ModelConfig.from_hf(_hf_dict(rope_parameters={"rope_type": "default", "rope_theta": 20000.0}))
    assert plain_old == plain_new
    assert plain_new.rope_scaling is None and plain_new.rope_theta == 20000.0


def test_unsupported_rope_scaling_is_a_config_error():
    with pytest.raises(ConfigError, match="rope_scaling"):
        ModelConfig.from_hf(_hf_dict(rope_parameters={"rope_type": "linear", "rope_theta": 1e4, "factor": 2.0}))


@pytest.mark.parametrize("model_type, scoring, method", [
    ("deepseek_v3", "sigmoid", "noaux_tc"),
    ("deepseek_v2", "softmax", "greedy"),
])
def test_missing_routing_fields_default_by_model_type(model_type, scoring, method):
    d = _hf_dict(model_type=model_type, rope_theta=1e4)
    del d["scoring_func"], d["topk_method"]
    if model_type == "deepseek_v2":
        d["n_group"], d["topk_group"] = 1, 1
    cfg = ModelConfig.from_hf(d)
    assert (cfg.scoring_func, cfg.topk_method) == (scoring, method)


def test_v2_group_limited_greedy_is_kept():
    d = _hf_dict(model_type="deepseek_v2", topk_method="group_limited_greedy", rope_theta=1e4)
    del d["scoring_func"]
    cfg = ModelConfig.from_hf(d)
    assert (cfg.scoring_func, cfg.topk_method) == ("softmax", "group_limited_greedy")


def test_from_hf_reads_a_file_or_its_folder(tmp_path):
    cfg = ModelConfig.preset("tiny")
    cfg.save(tmp_path / "config.json")
    assert ModelConfig.from_hf(tmp_path / "config.json") == cfg
    assert ModelConfig.from_hf(tmp_path) == cfg
    assert ModelConfig.from_hf(str(tmp_path)) == cfg


def test_from_hf_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        ModelConfig.from_hf(tmp_path / "config.json")
    (tmp_path / "config.json").write_text('{\n"model_type": "deepseek_v3"\n"x": 1}')
    with pytest.raises(ConfigError, match=r"config\.json.*line 3"):
        ModelConfig.from_hf(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(_hf_dict(model_type="mistral")))
    with pytest.raises(ConfigError, match=r"model_type.*config\.json"):
        ModelConfig.from_hf(tmp_path)


@pytest.mark.parametrize("changes, field", [
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),
    ({"n_group": 2, "topk_group": 3}, "topk_group"),
    ({"n_group": 3}, "n_group"),
    ({"qk_rope_head_dim": 15}, "qk_rope_head_dim"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"model_type": "llama"}, "model_type"),
])
def test_invalid_fields_raise_config_error_naming_the_field(changes, field):
    with pytest.raises(ConfigError, match=field):
        ModelConfig.preset("tiny", **changes)
    with pytest.raises(ConfigError, match=field):
        ModelConfig.from_hf(_hf_dict(rope_theta=1e4, **changes))


# ---- writing config.json -------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_hf_from_hf_round_trip(name, tmp_path):
    cfg = ModelConfig.preset(name)
    assert ModelConfig.from_hf(cfg.to_hf()) == cfg
    cfg.save(tmp_path / "config.json")  # through JSON too
    assert ModelConfig.from_hf(tmp_path / "config.json") == cfg


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_to_hf_writes_routing_explicitly(name):
    d = ModelConfig.preset(name).to_hf()
    assert d["scoring_func"] in ("sigmoid", "softmax") and d["topk_method"]
    assert d["architectures"] == [{"deepseek_v3": "DeepseekV3ForCausalLM",
                                   "deepseek_v2": "DeepseekV2ForCausalLM"}[d["model_type"]]]


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_transformers_config_agrees(name, transformers):
    cfg = ModelConfig.preset(name)
    d = cfg.to_hf()
    cls = {"deepseek_v3": transformers.DeepseekV3Config, "deepseek_v2": transformers.DeepseekV2Config}[cfg.model_type]
    hf = cls(**d)
    auto = transformers.AutoConfig.for_model(**d)
    assert type(auto) is cls
    for field in ARCH_FIELDS:
        assert getattr(hf, field) == getattr(cfg, field), field
        assert getattr(auto, field) == getattr(cfg, field), field
    rope = hf.rope_parameters
    assert rope["rope_theta"] == cfg.rope_theta
    if cfg.rope_scaling:
        assert rope["rope_type"] == "yarn"
        for key, value in cfg.rope_scaling.items():
            assert rope[key] == value, key
    else:
        assert rope["rope_type"] == "default"
    if cfg.model_type == "deepseek_v2":
        assert hf.topk_method == cfg.topk_method
    # transformers' own save format reads back to the same config
    assert ModelConfig.from_hf(hf.to_dict()) == cfg


@pytest.mark.parametrize("name", ["deepseek-v3", "deepseek-v2-lite", "tiny"])
def test_softmax_scale_matches_transformers(name, transformers):
    cfg = ModelConfig.preset(name)
    hf_cfg = transformers.AutoConfig.for_model(**cfg.to_hf())
    if cfg.model_type == "deepseek_v3":
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention as Attention
    else:
        from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2Attention as Attention
    with torch.device("meta"):  # no weights allocated
        attn = Attention(hf_cfg, layer_idx=0)
    assert cfg.softmax_scale == pytest.approx(attn.scaling, rel=1e-12)


# ---- published values ----------------------------------------------------------------------------
def test_deepseek_v3_preset_has_published_values():
    cfg = ModelConfig.preset("deepseek-v3")
    expected = dict(
        model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=61, first_k_dense_replace=3, num_attention_heads=128,
        num_key_value_heads=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8, n_group=8,
        topk_group=4, routed_scaling_factor=2.5, scoring_func="sigmoid", topk_method="noaux_tc",
        norm_topk_prob=True, q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, rms_norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=163840, bos_token_id=0,
        eos_token_id=1, tie_word_embeddings=False, num_nextn_predict_layers=1, moe_layer_freq=1,
        hidden_act="silu", attention_bias=False,
    )
    for field, value in expected.items():
        assert getattr(cfg, field) == value, field
    assert cfg.rope_scaling == {"factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                                "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
    assert cfg.qk_head_dim == 192
    assert [cfg.is_moe_layer(i) for i in range(5)] == [False, False, False, True, True]


def test_deepseek_v2_lite_preset_has_published_values():
    cfg = ModelConfig.preset("deepseek-v2-lite")
    expected = dict(
        model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
        moe_intermediate_size=1408, num_hidden_layers=27, first_k_dense_replace=1, num_attention_heads=16,
        n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
        topk_method="greedy", scoring_func="softmax", norm_topk_prob=False, routed_scaling_factor=1.0,
        q_lora_rank=None, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
        bos_token_id=100000, eos_token_id=100001,
    )
    for field, value in expected.items():
        assert getattr(cfg, field) == value, field
    assert cfg.rope_scaling == {"factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32,
                                "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707}


def test_yarn_softmax_scale_formula():
    cfg = ModelConfig.preset("deepseek-v3")
    mscale = 0.1 * 1.0 * math.log(40) + 1.0
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * mscale ** 2, rel=1e-12)
    assert ModelConfig.preset("tiny").softmax_scale == pytest.approx(48 ** -0.5, rel=1e-12)


def test_missing_fields_take_transformers_defaults_for_the_model_type():
    transformers = pytest.importorskip("transformers")
    for model_type, cls in (("deepseek_v2", transformers.DeepseekV2Config),
                            ("deepseek_v3", transformers.DeepseekV3Config)):
        partial = {"model_type": model_type, "num_experts_per_tok": 6}
        ours = ModelConfig.from_hf(partial)
        ref = cls(num_experts_per_tok=6)
        for name in ("norm_topk_prob", "q_lora_rank", "n_shared_experts", "vocab_size", "hidden_size",
                     "max_position_embeddings", "first_k_dense_replace", "routed_scaling_factor"):
            assert getattr(ours, name) == getattr(ref, name), (model_type, name)
