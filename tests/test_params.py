"""Parameter and KV-cache accounting: published DeepSeek figures, meta == real, closed-form arithmetic."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors import safe_open

import nanoseek
from nanoseek import LatentCache, ModelConfig, Transformer
from nanoseek.params import COMPONENTS, count_parameters, dtype_bytes, kv_cache_size


@pytest.fixture(scope="module")
def v3():
    return count_parameters(ModelConfig.preset("deepseek-v3"))


@pytest.fixture(scope="module")
def v2_lite():
    return count_parameters(ModelConfig.preset("deepseek-v2-lite"))


# ---- published figures -------------------------------------------------------------------------
def test_deepseek_v3_published_figures(v3):
    assert v3.total == pytest.approx(671.0e9, rel=0.005)  # "671B"
    assert 36.5e9 <= v3.activated <= 38e9  # "37B"
    assert 36.5e9 <= v3.activated_with_embedding <= 38e9  # ~37.5B with embedding, head and gates
    assert v3.mtp == pytest.approx(11.5e9, rel=0.02)  # README_WEIGHTS: 11.5B unique MTP params
    assert v3.on_disk == pytest.approx(685e9, rel=0.01)  # "685B" on disk


def test_deepseek_v2_lite_published_figures(v2_lite):
    assert 15.5e9 <= v2_lite.total <= 16.0e9  # 15.7B
    assert 2.3e9 <= v2_lite.activated <= 2.5e9  # 2.4B
    assert v2_lite.mtp == 0 and v2_lite.on_disk == v2_lite.total  # no MTP, no gate bias (softmax/greedy)


def _closed_form(c: ModelConfig) -> dict[str, int]:
    """The same breakdown by hand from the config fields (SwiGLU: 3 matrices per MLP)."""
    D, H, L = c.hidden_size, c.num_attention_heads, c.num_hidden_layers
    q = D * c.q_lora_rank + c.q_lora_rank + c.q_lora_rank * H * c.qk_head_dim if c.q_lora_rank \
        else D * H * c.qk_head_dim
    kv = D * (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank + c.kv_lora_rank * H * (
        c.qk_nope_head_dim + c.v_head_dim)
    moe = sum(c.is_moe_layer(i) for i in range(L))
    expert = 3 * D * c.moe_intermediate_size
    return {
        "embedding": c.vocab_size * D, "head": c.vocab_size * D,
        "attention": L * (q + kv + H * c.v_head_dim * D),
        "dense_mlp": (L - moe) * 3 * D * c.intermediate_size,
        "routed_experts": moe * c.n_routed_experts * expert,
        "shared_experts": moe * c.n_shared_experts * expert,
        "gates": moe * c.n_routed_experts * D,
        "norms": (2 * L + 1) * D,
    }


@pytest.mark.parametrize("preset", ["deepseek-v3", "deepseek-v2-lite"])
def test_breakdown_matches_closed_form(preset):
    config = ModelConfig.preset(preset)
    counts = count_parameters(config)
    expected = _closed_form(config)
    assert {k: counts.components[k] for k in expected} == expected
    assert counts.components["other"] == 0
    assert counts.total == sum(expected.values())
    routed_active = expected["routed_experts"] * config.num_experts_per_tok // config.n_routed_experts
    assert counts.activated_with_embedding == counts.total - expected["routed_experts"] + routed_active
    assert counts.activated == counts.activated_with_embedding - expected["embedding"]


def test_v3_exact_total_and_on_disk(v3):
    assert v3.total == 671_026_404_352  # "671.03B by arithmetic"
    assert v3.buffers == (58 + 1) * 256  # an fp32 e_score_correction_bias per MoE layer, MTP's included
    assert v3.on_disk == v3.total + v3.mtp + v3.buffers + 2 * 129280 * 7168  # + MTP's embed/head copies


# ---- meta counts equal a real model --------------------------------------------------------------
def test_meta_count_equals_instantiated_model():
    config = ModelConfig.preset("tiny")
    model = Transformer(config)
    counts = count_parameters(config)
    assert counts.total + counts.mtp == sum(p.numel() for p in model.parameters())
    assert counts.mtp == sum(p.numel() for p in model.mtp.parameters())
    assert counts == count_parameters(model)
    main = {k: v for k, v in counts.components.items() if k != "mtp"}
    assert sum(main.values()) == counts.total
    assert set(main) == set(COMPONENTS)


def test_meta_build_allocates_nothing():
    from nanoseek.params import meta_model
    model = meta_model(ModelConfig.preset("deepseek-v3"))
    assert all(p.is_meta for p in model.parameters())


def test_tied_embedding_counts_once():
    config = ModelConfig.preset("tiny", tie_word_embeddings=True)
    model = Transformer(config)
    counts = count_parameters(config)
    assert counts.components["head"] == 0
    assert counts.total + counts.mtp == sum(p.numel() for p in model.parameters())
    # the tied table is the head's matmul: it stays in the activated count
    assert counts.activated == counts.activated_with_embedding


def test_on_disk_equals_saved_checkpoint(tmp_path):
    config = ModelConfig.preset("tiny")
    nanoseek.save_model(Transformer(config), tmp_path)
    stored = 0
    for file in sorted(tmp_path.glob("*.safetensors")):
        with safe_open(str(file), "pt") as f:
            stored += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
    assert stored == count_parameters(config).on_disk


def test_lazy_package_attribute():
    assert nanoseek.count_parameters is count_parameters


# ---- KV cache ------------------------------------------------------------------------------------
def test_deepseek_v3_kv_cache_bytes():
    cache = kv_cache_size(ModelConfig.preset("deepseek-v3"))  # bf16
    assert cache.latent_values == 576  # 512 latent + 64 rope key, per layer per token
    assert cache.per_head_values == 128 * (192 + 128)  # 40,960
    assert cache.latent_bytes == 61 * 576 * 2 == 70_272
    assert cache.per_head_bytes == 61 * 40_960 * 2 == 4_997_120
    assert cache.ratio == pytest.approx(71.11, abs=0.01)
    assert kv_cache_size(ModelConfig.preset("deepseek-v3"), "fp32").latent_bytes == 2 * 70_272


def test_kv_cache_matches_latent_cache_buffers():
    config = ModelConfig.preset("tiny")
    for with_mtp in (False, True):
        cache = LatentCache(config, batch_size=1, max_len=4, with_mtp=with_mtp, dtype=torch.bfloat16)
        assert cache.bytes_per_token() == kv_cache_size(config, torch.bfloat16, with_mtp=with_mtp).latent_bytes


def test_dtype_bytes():
    assert dtype_bytes("bf16") == dtype_bytes(torch.bfloat16) == 2
    assert dtype_bytes("fp8") == 1 and dtype_bytes("float32") == 4
    with pytest.raises(ValueError, match="int3"):
        dtype_bytes("int3")
