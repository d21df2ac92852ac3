"""Behaviour specs for nanoseek.checkpoint: HF-format folders in and out.

Round trips (fp32/bf16/fp16, tied, sharded, MTP), compatibility with transformers, the on-disk key
layout, DeepSeek-V3 FP8 dequantization, precise errors on bad input, atomic saves.
"""

from __future__ import annotations

import copy
import json
import math
import os
import pickle
import re
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import nanoseek.checkpoint as ckpt
from nanoseek import CheckpointError, ConfigError, ModelConfig, Transformer
from nanoseek.checkpoint import INDEX_NAME, load_model, read_header, save_model
from nanoseek.model import Gate

SHARD_RE = re.compile(r"model-(\d{5})-of-(\d{5})\.safetensors")


# ---- helpers -------------------------------------------------------------------------------------
def tiny(**overrides) -> ModelConfig:
    """The tiny preset: 3 layers (1 dense, 2 MoE with 8 experts in 2 groups) and 1 MTP layer."""
    return ModelConfig.preset("tiny", **overrides)


def make_model(config: ModelConfig, seed: int = 0) -> Transformer:
    """A model whose every tensor is distinct: random norms and routing bias, not ones and zeros."""
    torch.manual_seed(seed)
    model = Transformer(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                p.add_(0.1 * torch.randn_like(p))
        for moe in model.moe_layers():
            if moe.gate.e_score_correction_bias is not None:
                moe.gate.e_score_correction_bias.copy_(0.01 * torch.randn(config.n_routed_experts))
    return model


def tokens(config: ModelConfig, batch: int = 2, length: int = 12, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, config.vocab_size, (batch, length), generator=g)


def stored_as(model: Transformer, dtype: torch.dtype) -> Transformer:
    """What a checkpoint stored in `dtype` holds: every float tensor cast, except the router gate weight
    and e_score_correction_bias, which keep their exact fp32 values. (Built tensor by tensor rather
    than with Module.to, so the expectation does not depend on the model's own dtype handling.)"""
    out = copy.deepcopy(model)
    for mod in out.modules():
        keep = {"weight", "e_score_correction_bias"} if isinstance(mod, Gate) else set()
        for name, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            if t is not None and name not in keep and t.is_floating_point():
                t.data = t.data.to(dtype)
    out.rotary.inv_freq.data = model.rotary.inv_freq.data.clone()  # RoPE frequencies are computed in fp32
    return out


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype, k
        assert torch.equal(sa[k], sb[k]), k


def all_headers(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(read_header(f))
    return out


def edit_weights(file: Path, fn) -> None:
    """Rewrite a safetensors file after fn(dict of tensors) changed it in place."""
    tensors = load_file(file)
    fn(tensors)
    save_file(tensors, file, metadata={"format": "pt"})


def edit_config(folder: Path, **changes) -> None:
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update(changes)
    path.write_text(json.dumps(cfg))


@pytest.fixture(scope="module")
def tiny_model() -> Transformer:
    return make_model(tiny())


@pytest.fixture(scope="module")
def hf_auto():
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    return transformers.AutoModelForCausalLM


# ---- round trips ---------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_round_trip_identical_state_and_logits(tmp_path, tiny_model, dtype):
    save_model(tiny_model, tmp_path / "m", dtype=dtype)
    loaded = load_model(tmp_path / "m")  # dtype None: keep what is stored
    reference = stored_as(tiny_model, dtype)
    assert loaded.dtype == dtype
    assert_same_state(loaded, reference)
    for moe in loaded.moe_layers():
        assert moe.gate.weight.dtype == torch.float32
        assert moe.gate.e_score_correction_bias.dtype == torch.float32
    x = tokens(tiny_model.config)
    with torch.no_grad():
        assert torch.equal(loaded(x), reference(x))


def test_gate_and_bias_stored_fp32_and_exact(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path / "m", dtype=torch.bfloat16)
    headers = all_headers(tmp_path / "m")
    for key, info in headers.items():
        if key.endswith("mlp.gate.weight") or key.endswith("e_score_correction_bias"):
            assert info.dtype == torch.float32, key
        else:
            assert info.dtype == torch.bfloat16, key
    loaded = load_model(tmp_path / "m")
    for ours, theirs in zip(tiny_model.moe_layers(), loaded.moe_layers()):
        assert torch.equal(ours.gate.e_score_correction_bias, theirs.gate.e_score_correction_bias)
        assert torch.equal(ours.gate.weight, theirs.gate.weight)


def test_load_with_explicit_dtype_converts(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path / "m", dtype=torch.bfloat16)
    loaded = load_model(tmp_path / "m", dtype=torch.float32)
    assert loaded.dtype == torch.float32
    reference = stored_as(stored_as(tiny_model, torch.bfloat16), torch.float32)
    assert_same_state(loaded, reference)


def test_load_downcast_keeps_gate_exact(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path / "m")  # fp32
    loaded = load_model(tmp_path / "m", dtype=torch.bfloat16)
    assert loaded.dtype == torch.bfloat16
    assert_same_state(loaded, stored_as(tiny_model, torch.bfloat16))


def test_tied_word_embeddings(tmp_path, hf_auto):
    cfg = tiny(tie_word_embeddings=True, num_nextn_predict_layers=0)
    model = make_model(cfg)
    assert model.lm_head.weight is model.embed_tokens.weight
    save_model(model, tmp_path / "m")
    assert "lm_head.weight" not in all_headers(tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert loaded.lm_head.weight is loaded.embed_tokens.weight
    assert_same_state(loaded, model)
    x = tokens(cfg)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))
        hf = hf_auto.from_pretrained(tmp_path / "m").eval()
        assert torch.allclose(hf(x).logits, model(x), atol=1e-5, rtol=0)


def test_tied_checkpoint_that_also_stores_lm_head_loads(tmp_path):
    model = make_model(tiny(tie_word_embeddings=True, num_nextn_predict_layers=0))
    save_model(model, tmp_path / "m")
    edit_weights(tmp_path / "m" / "model.safetensors",
                 lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()))
    loaded = load_model(tmp_path / "m")
    assert loaded.lm_head.weight is loaded.embed_tokens.weight


def test_sharded_save_index_and_reload(tmp_path, tiny_model, hf_auto):
    folder = save_model(tiny_model, tmp_path / "m", max_shard_size="300KB")
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 1 and "model.safetensors" not in shards
    n = len(shards)
    assert shards == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    assert all(SHARD_RE.fullmatch(s) for s in shards)

    index = json.loads((folder / INDEX_NAME).read_text())
    stored = {}
    for shard in shards:
        stored.update({k: shard for k in read_header(folder / shard)})
    assert index["weight_map"] == stored  # every key, each pointing at the shard that holds it
    total = sum(info.nbytes for info in all_headers(folder).values())
    assert index["metadata"]["total_size"] == total

    loaded = load_model(folder)
    assert_same_state(loaded, tiny_model)
    x = tokens(tiny_model.config)
    with torch.no_grad():
        ref, ref_mtp = tiny_model(x, return_mtp=True)
        out, out_mtp = loaded(x, return_mtp=True)
        assert torch.equal(out, ref) and torch.equal(out_mtp[0], ref_mtp[0])
        hf = hf_auto.from_pretrained(folder).eval()
        assert torch.allclose(hf(x).logits, ref, atol=1e-5, rtol=0)


def test_max_shard_size_spellings():
    assert ckpt._parse_size(1000) == 1000
    assert ckpt._parse_size("5GB") == 5 * 10**9
    assert ckpt._parse_size("2MiB") == 2 * 2**20
    assert ckpt._parse_size("300kb") == 300_000
    with pytest.raises(CheckpointError, match="max_shard_size"):
        ckpt._parse_size("lots")


# ---- on-disk layout ------------------------------------------------------------------------------
def test_hf_key_names_on_disk(tmp_path, tiny_model):
    cfg = tiny_model.config
    save_model(tiny_model, tmp_path / "m", dtype=torch.bfloat16)
    h = all_headers(tmp_path / "m")
    L, D, I, E = cfg.num_hidden_layers, cfg.hidden_size, cfg.moe_intermediate_size, cfg.n_routed_experts
    assert h["model.embed_tokens.weight"].shape == (cfg.vocab_size, D)
    assert h["lm_head.weight"].shape == (cfg.vocab_size, D)
    assert "model.norm.weight" in h
    assert h["model.layers.0.self_attn.q_a_proj.weight"].shape == (cfg.q_lora_rank, D)
    for name in ("q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj", "o_proj"):
        assert f"model.layers.0.self_attn.{name}.weight" in h
    for name in ("gate_proj", "up_proj", "down_proj"):  # layer 0 is dense
        assert f"model.layers.0.mlp.{name}.weight" in h
    for j in range(E):
        assert h[f"model.layers.1.mlp.experts.{j}.gate_proj.weight"].shape == (I, D)
        assert h[f"model.layers.1.mlp.experts.{j}.up_proj.weight"].shape == (I, D)
        assert h[f"model.layers.1.mlp.experts.{j}.down_proj.weight"].shape == (D, I)
    for name in ("gate_proj", "up_proj", "down_proj"):
        assert f"model.layers.1.mlp.shared_experts.{name}.weight" in h
    bias = h["model.layers.1.mlp.gate.e_score_correction_bias"]
    assert bias.dtype == torch.float32 and bias.shape == (E,)
    assert h["model.layers.1.mlp.gate.weight"].shape == (E, D)
    # MTP depth 1 lives at layer L, with copies of the shared embedding and head
    mtp = f"model.layers.{L}."
    assert h[mtp + "eh_proj.weight"].shape == (D, 2 * D)
    for name in ("enorm", "hnorm", "shared_head.norm", "embed_tokens", "shared_head.head",
                 "input_layernorm", "post_attention_layernorm", "self_attn.q_a_proj", "mlp.gate"):
        assert mtp + name + ".weight" in h, name
    assert mtp + "mlp.experts.0.gate_proj.weight" in h
    assert not any(".mtp." in k or k.startswith("mtp.") or "gate_up" in k or k.endswith("experts.down")
                   for k in h), "internal names leaked to disk"


def test_experts_and_mtp_copies_hold_the_right_values(tmp_path, tiny_model):
    cfg = tiny_model.config
    save_model(tiny_model, tmp_path / "m")
    w = load_file(tmp_path / "m" / "model.safetensors")
    experts = tiny_model.layers[1].mlp.experts
    I = cfg.moe_intermediate_size
    for j in range(cfg.n_routed_experts):
        assert torch.equal(w[f"model.layers.1.mlp.experts.{j}.gate_proj.weight"], experts.gate_up[j, :I])
        assert torch.equal(w[f"model.layers.1.mlp.experts.{j}.up_proj.weight"], experts.gate_up[j, I:])
        assert torch.equal(w[f"model.layers.1.mlp.experts.{j}.down_proj.weight"], experts.down[j])
    L = cfg.num_hidden_layers
    assert torch.equal(w[f"model.layers.{L}.embed_tokens.weight"], tiny_model.embed_tokens.weight)
    assert torch.equal(w[f"model.layers.{L}.shared_head.head.weight"], tiny_model.lm_head.weight)
    assert torch.equal(w[f"model.layers.{L}.eh_proj.weight"], tiny_model.mtp[0].eh_proj.weight)


def test_mtp_round_trip(tmp_path):
    cfg = tiny(num_nextn_predict_layers=2)
    model = make_model(cfg)
    save_model(model, tmp_path / "m")
    loaded = load_model(tmp_path / "m")
    assert len(loaded.mtp) == 2
    x = tokens(cfg)
    with torch.no_grad():
        ref_logits, ref_mtp = model(x, return_mtp=True)
        logits, mtp = loaded(x, return_mtp=True)
    assert torch.equal(logits, ref_logits)
    assert len(mtp) == 2
    for a, b in zip(mtp, ref_mtp):
        assert torch.equal(a, b)


def test_declared_mtp_without_weights_loads_without_mtp(tmp_path):
    model = make_model(tiny(num_nextn_predict_layers=0))
    save_model(model, tmp_path / "m")
    edit_config(tmp_path / "m", num_nextn_predict_layers=1, num_mtp_layers=1)
    with pytest.warns(UserWarning, match="MTP"):
        loaded = load_model(tmp_path / "m")
    assert loaded.config.num_nextn_predict_layers == 0 and len(loaded.mtp) == 0
    x = tokens(model.config)
    with torch.no_grad():
        assert torch.equal(loaded(x), model(x))


def test_loads_a_transformers_saved_deepseek_v3(tmp_path):
    """transformers writes no MTP weights (while its config says num_mtp_layers=1), spells RoPE as
    rope_parameters and may omit scoring_func/topk_method."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    hf_cfg = transformers.DeepseekV3Config(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        first_k_dense_replace=1, num_attention_heads=2, num_key_value_heads=2, n_routed_experts=8,
        n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=2.5,
        q_lora_rank=48, kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        max_position_embeddings=256)
    torch.manual_seed(0)
    hf = transformers.DeepseekV3ForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, buf in hf.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.01 * torch.randn_like(buf))
    hf.save_pretrained(tmp_path / "hf")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the MTP warning, when the config declares MTP layers
        model = load_model(tmp_path / "hf")
    assert model.config.scoring_func == "sigmoid" and model.config.topk_method == "noaux_tc"
    assert len(model.mtp) == 0
    x = tokens(model.config)
    with torch.no_grad():
        assert torch.allclose(model(x), hf(x).logits, atol=1e-5, rtol=0)


# ---- FP8 (DeepSeek-V3's released format) ---------------------------------------------------------
FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _fp8_config() -> ModelConfig:
    """Weight matrices with dims above 128 and not multiples of it: partial edge blocks."""
    return ModelConfig(vocab_size=300, hidden_size=136, intermediate_size=272, moe_intermediate_size=72,
                       num_hidden_layers=2, first_k_dense_replace=1, num_attention_heads=2, n_routed_experts=4,
                       n_shared_experts=1, num_experts_per_tok=2, n_group=1, topk_group=1, q_lora_rank=144,
                       kv_lora_rank=132, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
                       max_position_embeddings=256)


def _is_quantized(key: str, t: torch.Tensor) -> bool:
    """As DeepSeek-V3: every linear weight, not the embedding, head, norms, router gate or its bias."""
    return t.dim() == 2 and (key.endswith("_proj.weight") or key.endswith("_proj_with_mqa.weight"))


def _quantize_blocks(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per 128x128 block: scale_inv = amax / 448, q = fp8(w / scale_inv)."""
    rows, cols = w.shape
    nr, nc = math.ceil(rows / 128), math.ceil(cols / 128)
    q = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
    scale_inv = torch.empty(nr, nc, dtype=torch.float32)
    for i in range(nr):
        for j in range(nc):
            block = w[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128].float()
            s = block.abs().amax().clamp(min=1e-12) / FP8_MAX
            scale_inv[i, j] = s
            q[i * 128:(i + 1) * 128, j * 128:(j + 1) * 128] = (block / s).to(torch.float8_e4m3fn)
    return q, scale_inv


def _dequantize_by_hand(q: torch.Tensor, scale_inv: torch.Tensor) -> torch.Tensor:
    out = torch.empty(q.shape, dtype=torch.float32)
    for i in range(scale_inv.shape[0]):
        for j in range(scale_inv.shape[1]):
            rows, cols = slice(i * 128, (i + 1) * 128), slice(j * 128, (j + 1) * 128)
            out[rows, cols] = q[rows, cols].float() * scale_inv[i, j].item()
    return out


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    """(folder, {key: expected fp32 dequantized weight}) for a hand-made FP8 checkpoint."""
    folder = tmp_path_factory.mktemp("fp8") / "m"
    cfg = _fp8_config()
    save_model(make_model(cfg), folder, dtype=torch.bfloat16)
    tensors = load_file(folder / "model.safetensors")
    expected = {}
    for key in list(tensors):
        if _is_quantized(key, tensors[key]):
            q, scale_inv = _quantize_blocks(tensors[key])
            tensors[key], tensors[key + "_scale_inv"] = q, scale_inv
            expected[key] = _dequantize_by_hand(q, scale_inv)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    edit_config(folder, torch_dtype="bfloat16", quantization_config={
        "activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8", "weight_block_size": [128, 128]})
    return folder, expected


def test_fp8_dequantizes_per_128_block(fp8_checkpoint):
    folder, expected = fp8_checkpoint
    shapes = [w.shape for w in expected.values()]
    assert any(r > 128 and r % 128 for r, _ in shapes) and any(c > 128 and c % 128 for _, c in shapes)
    model = load_model(folder, dtype=torch.float32)
    state = model.state_dict()
    cfg = model.config
    I = cfg.moe_intermediate_size
    for key, want in expected.items():
        m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(\w+)_proj\.weight", key)
        if m:
            layer, j, kind = int(m[1]), int(m[2]), m[3]
            experts = model.layers[layer].mlp.experts
            got = {"gate": experts.gate_up[j, :I], "up": experts.gate_up[j, I:], "down": experts.down[j]}[kind]
        else:
            got = state[key.removeprefix("model.")]
        assert torch.equal(got, want), key


def test_fp8_loads_as_bf16_by_default(fp8_checkpoint):
    folder, expected = fp8_checkpoint
    model = load_model(folder)
    assert model.dtype == torch.bfloat16
    assert model.layers[0].self_attn.q_a_proj.weight.dtype == torch.bfloat16
    want = expected["model.layers.0.self_attn.q_a_proj.weight"].to(torch.bfloat16)
    assert torch.equal(model.layers[0].self_attn.q_a_proj.weight, want)
    assert model.layers[1].mlp.gate.weight.dtype == torch.float32
    x = tokens(model.config)
    with torch.no_grad():
        assert torch.isfinite(model(x).float()).all()


def test_fp8_without_scale_is_an_error(tmp_path, fp8_checkpoint):
    folder, _ = fp8_checkpoint
    target = tmp_path / "m"
    target.mkdir()
    (target / "config.json").write_bytes((folder / "config.json").read_bytes())
    tensors = load_file(folder / "model.safetensors")
    key = "model.layers.1.mlp.experts.2.down_proj.weight"
    del tensors[key + "_scale_inv"]
    save_file(tensors, target / "model.safetensors")
    with pytest.raises(CheckpointError) as err:
        load_model(target)
    assert "model.safetensors" in str(err.value) and key in str(err.value)


def test_fp8_scale_of_wrong_shape_is_an_error(tmp_path, fp8_checkpoint):
    folder, _ = fp8_checkpoint
    target = tmp_path / "m"
    target.mkdir()
    (target / "config.json").write_bytes((folder / "config.json").read_bytes())
    tensors = load_file(folder / "model.safetensors")
    key = "model.layers.0.self_attn.q_a_proj.weight"  # (144, 136): needs 2 x 2 scales
    tensors[key + "_scale_inv"] = tensors[key + "_scale_inv"][:1].clone()
    save_file(tensors, target / "model.safetensors")
    with pytest.raises(CheckpointError, match=re.escape(key + "_scale_inv")):
        load_model(target)


# ---- bad input -----------------------------------------------------------------------------------
@pytest.fixture
def saved(tmp_path) -> Path:
    """A fresh small checkpoint per test, free to damage."""
    cfg = tiny(num_nextn_predict_layers=0, num_hidden_layers=2)
    return save_model(make_model(cfg), tmp_path / "m")


def _error(folder: Path, kind=CheckpointError) -> str:
    with pytest.raises(kind) as err:
        load_model(folder)
    return str(err.value)


def test_missing_tensor(saved):
    key = "model.layers.1.mlp.experts.3.up_proj.weight"
    edit_weights(saved / "model.safetensors", lambda t: t.pop(key))
    msg = _error(saved)
    assert str(saved) in msg and key in msg and "missing" in msg


def test_unexpected_tensor(saved):
    key = "model.layers.0.self_attn.extra_proj.weight"
    edit_weights(saved / "model.safetensors", lambda t: t.__setitem__(key, torch.zeros(2, 2)))
    msg = _error(saved)
    assert "model.safetensors" in msg and key in msg and "unexpected" in msg


def test_wrongly_shaped_tensor(saved):
    key = "model.layers.0.self_attn.q_a_proj.weight"
    edit_weights(saved / "model.safetensors", lambda t: t.__setitem__(key, t[key][:-1].clone()))
    msg = _error(saved)
    assert "model.safetensors" in msg and key in msg and "shape" in msg


def test_truncated_file(saved):
    file = saved / "model.safetensors"
    data = file.read_bytes()
    file.write_bytes(data[: len(data) // 2])
    msg = _error(saved)
    assert "model.safetensors" in msg and "truncated" in msg
    assert re.search(r"tensor '[\w.]+'", msg)


def test_header_only_file_is_an_error(saved):
    (saved / "model.safetensors").write_bytes(b"\x05\x00")
    assert "model.safetensors" in _error(saved)


def test_missing_shard_named_by_index(tmp_path):
    folder = save_model(make_model(tiny(num_nextn_predict_layers=0)), tmp_path / "m", max_shard_size="300KB")
    victim = sorted(folder.glob("model-*.safetensors"))[-1]
    victim.unlink()
    msg = _error(folder)
    assert INDEX_NAME in msg and victim.name in msg


def test_pickle_weights_are_refused_without_unpickling(tmp_path, monkeypatch):
    folder = tmp_path / "m"
    folder.mkdir()
    ModelConfig.preset("tiny").save(folder / "config.json")
    # a pickle that would run code if loaded
    (folder / "pytorch_model.bin").write_bytes(pickle.dumps({"x": 1}))
    calls = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("a pickle was loaded")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    msg = _error(folder)
    assert "pytorch_model.bin" in msg and str(folder) in msg and "safetensors" in msg
    assert calls == []


def test_folder_without_weights(tmp_path):
    folder = tmp_path / "m"
    folder.mkdir()
    ModelConfig.preset("tiny").save(folder / "config.json")
    assert "safetensors" in _error(folder)


def test_missing_folder(tmp_path):
    assert "nowhere" in _error(tmp_path / "nowhere")


def test_missing_config(saved):
    (saved / "config.json").unlink()
    with pytest.raises((CheckpointError, ConfigError)) as err:
        load_model(saved)
    assert "config.json" in str(err.value) and str(saved) in str(err.value)


@pytest.mark.parametrize("changes, field", [
    ({"model_type": "llama"}, "model_type"),
    ({"num_experts_per_tok": 9}, "num_experts_per_tok"),  # tiny has 8 routed experts
    ({"n_group": 2, "topk_group": 3}, "topk_group"),
    ({"n_group": 3, "topk_group": 1}, "n_group"),  # 8 experts do not split into 3 groups
    ({"qk_rope_head_dim": 15}, "qk_rope_head_dim"),
    ({"hidden_size": 0}, "hidden_size"),
    ({"hidden_size": -128}, "hidden_size"),
])
def test_invalid_config_names_file_and_field(saved, changes, field):
    edit_config(saved, **changes)
    with pytest.raises(ConfigError) as err:
        load_model(saved)
    msg = str(err.value)
    assert field in msg and str(saved / "config.json") in msg


def test_invalid_json_names_the_line(saved):
    (saved / "config.json").write_text('{\n  "model_type": "deepseek_v3",\n  "hidden_size": 128,,\n}\n')
    with pytest.raises(ConfigError) as err:
        load_model(saved)
    assert "config.json" in str(err.value) and "line 3" in str(err.value)


# ---- atomic save ---------------------------------------------------------------------------------
def _snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def _fail_after_first_shard(monkeypatch):
    real = ckpt.save_file
    calls = []

    def flaky(*args, **kwargs):
        calls.append(args[1])
        if len(calls) > 1:
            raise OSError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(ckpt, "save_file", flaky)
    return calls


def test_failed_save_leaves_existing_folder_intact(tmp_path, monkeypatch):
    old = make_model(tiny(num_nextn_predict_layers=0), seed=0)
    target = save_model(old, tmp_path / "m")
    before = _snapshot(target)
    calls = _fail_after_first_shard(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        save_model(make_model(tiny(num_nextn_predict_layers=0), seed=1), target, max_shard_size="300KB")
    assert len(calls) == 2
    assert _snapshot(target) == before
    assert [p.name for p in tmp_path.iterdir()] == ["m"], "temporary folders left behind"
    monkeypatch.undo()
    assert_same_state(load_model(target), old)


def test_failed_first_save_leaves_nothing(tmp_path, monkeypatch):
    _fail_after_first_shard(monkeypatch)
    with pytest.raises(OSError):
        save_model(make_model(tiny()), tmp_path / "m", max_shard_size="300KB")
    assert list(tmp_path.iterdir()) == []


def test_save_over_existing_folder(tmp_path):
    """Old weights, index and config are replaced; other files (a tokenizer, logs) are kept."""
    cfg = tiny(num_nextn_predict_layers=0)
    target = save_model(make_model(cfg, seed=0), tmp_path / "m", max_shard_size="300KB")
    (target / "tokenizer.json").write_text("{}")
    new = make_model(cfg, seed=1)
    save_model(new, target)
    names = sorted(p.name for p in target.iterdir())
    assert names == ["config.json", "model.safetensors", "tokenizer.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]
    assert_same_state(load_model(target), new)


def test_saved_folder_is_not_private(tmp_path):
    target = save_model(make_model(tiny(num_nextn_predict_layers=0)), tmp_path / "m")
    umask = os.umask(0)
    os.umask(umask)
    assert target.stat().st_mode & 0o777 == 0o777 & ~umask


def test_config_json_records_routing_and_dtype(tmp_path, tiny_model):
    save_model(tiny_model, tmp_path / "m", dtype=torch.bfloat16)
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["model_type"] == "deepseek_v3"
    assert cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    # llama.cpp's converter falls back to softmax gating when these are absent
    assert cfg["scoring_func"] == "sigmoid" and cfg["topk_method"] == "noaux_tc"
    assert cfg["torch_dtype"] == "bfloat16"
    assert ModelConfig.from_hf(tmp_path / "m") == tiny_model.config


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_saved_files_get_the_umask_mode_not_0600(tmp_path, umask):
    """safetensors' save_file writes through mkstemp (0600); a saved model is as readable as any file
    the user makes: 0666 & ~umask, sharded or not."""
    from conftest import random_tiny_model
    model = random_tiny_model()
    old = os.umask(umask)
    try:
        save_model(model, tmp_path / "one")
        save_model(model, tmp_path / "sharded", max_shard_size="200KB")
    finally:
        os.umask(old)
    files = list((tmp_path / "one").iterdir()) + list((tmp_path / "sharded").iterdir())
    assert len(files) > 3 and {p.stat().st_mode & 0o777 for p in files} == {0o666 & ~umask}
