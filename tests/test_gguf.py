"""`nanoseek export gguf`: the file read back with gguf's own reader (no llama.cpp needed).

Every tensor is mapped back to its HF checkpoint key by a table written here independently of the
exporter and compared with the safetensors file: exactly in f32, within q8_0's error bound in q8_0.
llama.cpp itself runs in bench/gguf_parity.py; the one test that needs it is skipped without llama_cpp.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

gguf = pytest.importorskip("gguf")

from nanoseek import ModelConfig, NanoseekError, Transformer, save_model  # noqa: E402
from nanoseek.cli import main  # noqa: E402
from nanoseek.export import export_gguf  # noqa: E402
from nanoseek.export.gguf import check_llama_cpp, yarn_metadata  # noqa: E402
from nanoseek.model.rope import rope_frequencies  # noqa: E402
from nanoseek.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS, Tokenizer  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")

TEXT = ["The quick brown fox jumps over the lazy dog 12345. 我想在苹果公司工作。 It's 2024!"] * 40
YARN = dict(factor=4.0, original_max_position_embeddings=512, beta_fast=32, beta_slow=1, mscale=1.0,
            mscale_all_dim=1.0)
# V3-like (MTP, YaRN, sigmoid, groups, bias) and V2-like (no q LoRA, softmax, greedy, tied, no MTP)
VARIANTS = {
    "v3": dict(vocab_size=320, rope_scaling=YARN),
    "v2": dict(model_type="deepseek_v2", vocab_size=300, q_lora_rank=None, scoring_func="softmax",
               topk_method="greedy", norm_topk_prob=False, routed_scaling_factor=1.0, tie_word_embeddings=True,
               num_nextn_predict_layers=0),
}


def _save(root, tokenizer, **overrides):
    torch.manual_seed(0)
    model = Transformer(ModelConfig.preset("tiny", **overrides))
    with torch.no_grad():
        for m in model.moe_layers():
            if m.gate.e_score_correction_bias is not None:
                m.gate.e_score_correction_bias.normal_(0, 0.1)
    save_model(model, root)
    tokenizer.save(root)
    return root


@pytest.fixture(scope="module")
def bpe():
    return Tokenizer.train(TEXT, vocab_size=300)


@pytest.fixture(scope="module")
def models(tmp_path_factory, bpe):
    root = tmp_path_factory.mktemp("gguf")
    return {name: _save(root / name, bpe, **o) for name, o in VARIANTS.items()}


@pytest.fixture(scope="module")
def exported(models, tmp_path_factory):
    """(variant, type) -> GGUFReader of the exported file."""
    out = tmp_path_factory.mktemp("gguf-out")
    cache = {}

    def get(variant: str, type: str):
        if (variant, type) not in cache:
            path = out / f"{variant}-{type}.gguf"
            export_gguf(models[variant], path, type)
            cache[variant, type] = gguf.GGUFReader(path)
        return cache[variant, type]
    return get


# ---- GGUF -> HF keys, independently of the exporter -----------------------------------------------
BLOCK = {"attn_norm": "input_layernorm", "attn_q_a": "self_attn.q_a_proj", "attn_q_a_norm": "self_attn.q_a_layernorm",
         "attn_q_b": "self_attn.q_b_proj", "attn_q": "self_attn.q_proj", "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
         "attn_kv_a_norm": "self_attn.kv_a_layernorm", "attn_output": "self_attn.o_proj",
         "ffn_norm": "post_attention_layernorm", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
         "ffn_down": "mlp.down_proj", "ffn_gate_inp": "mlp.gate", "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
         "ffn_up_shexp": "mlp.shared_experts.up_proj", "ffn_down_shexp": "mlp.shared_experts.down_proj",
         "nextn.enorm": "enorm", "nextn.hnorm": "hnorm", "nextn.eh_proj": "eh_proj",
         "nextn.shared_head_norm": "shared_head.norm"}
TOP = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
       "output.weight": "lm_head.weight"}


def values(t) -> np.ndarray:
    """A GGUF tensor as float32 in torch order."""
    return np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)


def to_hf(reader, config: ModelConfig) -> dict[str, np.ndarray]:
    tensors = {t.name: values(t) for t in reader.tensors}
    out, kb = {}, {}
    for name, v in tensors.items():
        if name in TOP:
            out[TOP[name]] = v
            continue
        _, bid, rest = name.split(".", 2)
        local, suffix = rest.rsplit(".", 1)
        p = f"model.layers.{bid}."
        if local in BLOCK:
            out[f"{p}{BLOCK[local]}.weight"] = v
        elif local == "exp_probs_b":
            out[f"{p}mlp.gate.e_score_correction_bias"] = v
        elif local in ("ffn_gate_exps", "ffn_up_exps", "ffn_down_exps"):
            proj = local.split("_")[1]
            for j in range(v.shape[0]):
                out[f"{p}mlp.experts.{j}.{proj}_proj.weight"] = v[j]
        elif local in ("attn_k_b", "attn_v_b"):
            kb.setdefault(bid, {})[local] = v
        else:
            raise AssertionError(f"unexpected tensor {name}")
    H = config.num_attention_heads
    for bid, parts in kb.items():  # k_b (H, r, nope), v_b (H, v, r) -> kv_b (H * (nope + v), r)
        kv = np.concatenate([parts["attn_k_b"].transpose(0, 2, 1), parts["attn_v_b"]], axis=1)
        out[f"model.layers.{bid}.self_attn.kv_b_proj.weight"] = kv.reshape(H * kv.shape[1], -1)
    return out


def source(folder, config: ModelConfig) -> dict[str, np.ndarray]:
    """The checkpoint's tensors, less what GGUF does not store (MTP copies of embedding and head)."""
    L = config.num_hidden_layers
    skip = {f"model.layers.{L + k}.{n}.weight" for k in range(config.num_nextn_predict_layers)
            for n in ("embed_tokens", "shared_head.head")}
    if config.tie_word_embeddings:
        skip.add("lm_head.weight")
    return {k: v.float().numpy() for k, v in load_file(folder / "model.safetensors").items() if k not in skip}


def fields(reader) -> dict:
    return {k: f.contents() for k, f in reader.fields.items() if not k.startswith("GGUF.")}


# ---- tensors --------------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_f32_tensors_equal_the_checkpoint(models, exported, variant):
    config = ModelConfig.from_hf(models[variant])
    reader = exported(variant, "f32")
    got, want = to_hf(reader, config), source(models[variant], config)
    assert sorted(got) == sorted(want)
    for key in want:
        assert got[key].shape == want[key].shape, key
        assert np.array_equal(got[key], want[key]), key
    assert {t.tensor_type for t in reader.tensors} == {gguf.GGMLQuantizationType.F32}


def test_layout_matches_llama_cpp(models, exported):
    """Names, ggml shapes ({in, out}, experts last) and types of the tensors llama.cpp's loader asks for."""
    reader = exported("v3", "q8_0")
    cfg = ModelConfig.from_hf(models["v3"])
    T = {t.name: t for t in reader.tensors}
    D, E, I, r, H = cfg.hidden_size, cfg.n_routed_experts, cfg.moe_intermediate_size, cfg.kv_lora_rank, \
        cfg.num_attention_heads
    L = cfg.num_hidden_layers
    expect = {"token_embd.weight": [D, 320], "output.weight": [D, 320],
              "blk.0.ffn_gate.weight": [D, cfg.intermediate_size],
              "blk.1.attn_kv_a_mqa.weight": [D, r + cfg.qk_rope_head_dim],
              "blk.1.attn_k_b.weight": [cfg.qk_nope_head_dim, r, H], "blk.1.attn_v_b.weight": [r, cfg.v_head_dim, H],
              "blk.1.ffn_gate_exps.weight": [D, I, E], "blk.1.ffn_down_exps.weight": [I, D, E],
              "blk.1.ffn_gate_inp.weight": [D, E], "blk.1.exp_probs_b.bias": [E],
              f"blk.{L}.nextn.eh_proj.weight": [2 * D, D], f"blk.{L}.ffn_up_exps.weight": [D, I, E]}
    for name, shape in expect.items():
        assert list(T[name].shape) == shape, name
    Q = gguf.GGMLQuantizationType
    for t in reader.tensors:
        f32 = t.name.endswith(("norm.weight", "enorm.weight", "hnorm.weight", "ffn_gate_inp.weight", ".bias"))
        assert t.tensor_type == (Q.F32 if f32 else Q.Q8_0), t.name
    assert f"blk.{L}.nextn.embed_tokens.weight" not in T  # llama.cpp falls back to token_embd / output


def test_q8_0_within_its_error_bound(exported):
    """q8_0: blocks of 32 along a row, scale d = max|x| / 127 stored in f16, q = round(x / d): |error| <=
    d/2 plus the f16 rounding of d times |q| <= 127. Compared tensor by tensor with the f32 file (equal to
    the checkpoint, test above), so the blocks are the file's own rows."""
    exact = {t.name: values(t) for t in exported("v3", "f32").tensors}
    for t in exported("v3", "q8_0").tensors:
        got, w = values(t), exact[t.name]
        if t.tensor_type == gguf.GGMLQuantizationType.F32:
            assert np.array_equal(got, w), t.name  # norms, router and bias stay f32
            continue
        blocks = w.reshape(-1, 32)
        d = np.abs(blocks).max(axis=1, keepdims=True) / 127
        err = np.abs(got.reshape(-1, 32) - blocks)
        assert (err <= d * (0.5 + 127 * 2.0 ** -11) + 1e-12).all(), t.name
        assert err.max() > 0  # really quantized


@pytest.mark.parametrize("type,dtype", [("f16", np.float16), ("bf16", None)])
def test_half_types_round_to_nearest(models, exported, type, dtype):
    config = ModelConfig.from_hf(models["v2"])
    got, want = to_hf(exported("v2", type), config), source(models["v2"], config)
    key = "model.layers.1.self_attn.q_proj.weight"
    expect = (want[key].astype(dtype).astype(np.float32) if dtype else
              torch.from_numpy(want[key]).bfloat16().float().numpy())
    assert np.array_equal(got[key], expect)
    assert np.array_equal(got["model.layers.1.mlp.gate.weight"], want["model.layers.1.mlp.gate.weight"])


# ---- metadata -------------------------------------------------------------------------------------
def test_hyperparameters(models, exported):
    f = fields(exported("v3", "q8_0"))
    cfg = ModelConfig.from_hf(models["v3"])
    a = "deepseek2."
    expect = {
        "general.architecture": "deepseek2", "general.name": "v3", "general.file_type": gguf.LlamaFileType.MOSTLY_Q8_0,
        a + "block_count": cfg.num_hidden_layers + 1, a + "nextn_predict_layers": 1,
        a + "context_length": cfg.max_position_embeddings, a + "embedding_length": cfg.hidden_size,
        a + "feed_forward_length": cfg.intermediate_size, a + "attention.head_count": cfg.num_attention_heads,
        a + "attention.head_count_kv": 1, a + "vocab_size": 320, a + "leading_dense_block_count": 1,
        a + "attention.q_lora_rank": cfg.q_lora_rank, a + "attention.kv_lora_rank": cfg.kv_lora_rank,
        a + "attention.key_length": cfg.kv_lora_rank + cfg.qk_rope_head_dim,
        a + "attention.value_length": cfg.kv_lora_rank, a + "attention.key_length_mla": cfg.qk_head_dim,
        a + "attention.value_length_mla": cfg.v_head_dim, a + "rope.dimension_count": cfg.qk_rope_head_dim,
        a + "expert_feed_forward_length": cfg.moe_intermediate_size, a + "expert_shared_count": 1,
        a + "expert_count": 8, a + "expert_used_count": 2, a + "expert_group_count": 2,
        a + "expert_group_used_count": 1, a + "expert_gating_func": 2, a + "expert_weights_norm": True,
        a + "rope.scaling.type": "yarn", a + "rope.scaling.original_context_length": 512,
        "tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "dbrx", "tokenizer.ggml.bos_token_id": 0,
        "tokenizer.ggml.eos_token_id": 1, "tokenizer.ggml.padding_token_id": 2,
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_eos_token": False,
        "tokenizer.chat_template": CHAT_TEMPLATE,
    }
    for key, value in expect.items():
        assert f[key] == value, key
    floats = {a + "attention.layer_norm_rms_epsilon": 1e-6, a + "rope.freq_base": 1e4,
              a + "expert_weights_scale": 2.5, a + "rope.scaling.factor": 4.0, a + "rope.scaling.yarn_beta_fast": 32,
              a + "rope.scaling.yarn_beta_slow": 1, a + "rope.scaling.yarn_log_multiplier": 0.1}
    for key, value in floats.items():
        assert f[key] == pytest.approx(value, rel=1e-6), key
    assert a + "rope.scaling.attn_factor" not in f  # mscale == mscale_all_dim: amplitude 1


def test_v2_hyperparameters(exported):
    f = fields(exported("v2", "f32"))
    a = "deepseek2."
    assert f[a + "attention.q_lora_rank"] == 0  # llama.cpp then loads attn_q
    assert f[a + "expert_gating_func"] == 1  # softmax
    assert f[a + "expert_group_count"] == 1  # greedy routing ignores the 2 groups
    assert f[a + "expert_weights_norm"] is False and f[a + "nextn_predict_layers"] == 0
    assert a + "rope.scaling.type" not in f
    names = {t.name for t in exported("v2", "f32").tensors}
    assert "output.weight" not in names and "blk.1.attn_q.weight" in names  # tied head: token_embd serves
    assert "blk.1.exp_probs_b.bias" not in names


def test_tokenizer_metadata(models, exported, bpe):
    f = fields(exported("v3", "f32"))
    tokens, types = f["tokenizer.ggml.tokens"], f["tokenizer.ggml.token_type"]
    assert len(tokens) == 320  # the model's vocab: ids past the tokenizer's are padding
    assert tokens[:bpe.vocab_size] == [bpe.id_to_token(i) for i in range(bpe.vocab_size)]
    T = gguf.TokenType
    kinds = {t: types[bpe.token_to_id(t)] for t in SPECIAL_TOKENS}
    assert kinds == {t: T.USER_DEFINED if "think" in t else T.CONTROL for t in SPECIAL_TOKENS}
    assert set(types[len(SPECIAL_TOKENS):bpe.vocab_size]) == {T.NORMAL}
    assert tokens[bpe.vocab_size] == f"[PAD{bpe.vocab_size}]" and set(types[bpe.vocab_size:]) == {T.UNUSED}
    spec = json.loads(bpe.backend.to_str())
    assert f["tokenizer.ggml.merges"] == [" ".join(m) for m in spec["model"]["merges"]]
    assert len(f["tokenizer.ggml.merges"]) > 0


def test_byte_level_vocabulary_without_merges_gets_a_placeholder(tmp_path):
    """llama.cpp refuses a BPE file without merges; the placeholder joins two special tokens, which
    BPE never sees inside a word, so it cannot change any tokenization."""
    tok = Tokenizer.train(TEXT, vocab_size=263)
    folder = _save(tmp_path / "bytes", tok, vocab_size=263, num_nextn_predict_layers=0)
    export_gguf(folder, tmp_path / "b.gguf")
    f = fields(gguf.GGUFReader(tmp_path / "b.gguf"))
    assert f["tokenizer.ggml.merges"] == ["<｜begin▁of▁sentence｜> <｜end▁of▁sentence｜>"]
    assert len(f["tokenizer.ggml.tokens"]) == 263


# ---- YaRN: llama.cpp's formulas applied to the exported keys give nanoseek's RoPE and scale ----------
def llama_cpp_yarn(meta: dict, factor: float, head_dim: int) -> tuple[float, float]:
    """(cos/sin amplitude, softmax scale) as llama.cpp's deepseek2 computes them (llama-context.cpp,
    models/deepseek2.cpp, ggml's rope_yarn) from the file's keys."""
    def M(m):
        return 0.1 * m * math.log(factor) + 1 if factor > 1 else 1.0
    log_mul = meta.get("log_mul", 0.0) / 0.1  # the loader divides by 0.1
    if log_mul != 0:
        mscale = log_mul if log_mul != 1 else 1.0
        attn = M(mscale) / M(log_mul)
    else:
        attn = M(1.0)
    attn *= 1 / (1 + 0.1 * math.log(factor))
    attn *= meta.get("attn_factor", 1.0)
    amplitude = attn * (1 + 0.1 * math.log(factor))  # ggml's rope_yarn multiplies by this
    kq = (amplitude * (1 + 0.1 * log_mul * math.log(factor))) ** 2 / math.sqrt(head_dim)
    return amplitude, kq


@pytest.mark.parametrize("mscale,mscale_all_dim", [(1.0, 1.0), (0.707, 0.707), (0.707, 1.0), (1.0, 0.5),
                                                   (None, None), (1.0, None), (None, 1.0)])
def test_yarn_keys_reproduce_nanoseek_scaling(mscale, mscale_all_dim):
    rope = dict(factor=40.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1)
    rope.update({k: v for k, v in (("mscale", mscale), ("mscale_all_dim", mscale_all_dim)) if v is not None})
    cfg = ModelConfig.preset("tiny", rope_scaling=rope)
    amplitude, kq = llama_cpp_yarn(yarn_metadata(cfg), 40.0, cfg.qk_head_dim)
    assert amplitude == pytest.approx(rope_frequencies(cfg)[1], rel=1e-9)
    assert kq == pytest.approx(cfg.softmax_scale, rel=1e-9)


# ---- errors and the command -----------------------------------------------------------------------
def test_unknown_type_and_folder_without_tokenizer(models, tmp_path, capsys):
    with pytest.raises(NanoseekError, match="unknown GGUF type 'q4_0'"):
        export_gguf(models["v3"], tmp_path / "x.gguf", "q4_0")
    bare = tmp_path / "bare"
    ModelConfig.preset("tiny").save(bare.mkdir() or bare / "config.json")
    with pytest.raises(NanoseekError, match="has no tokenizer.json"):
        export_gguf(bare, tmp_path / "x.gguf")
    assert main(["export", "gguf", str(bare), "--out", str(tmp_path / "x.gguf")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "tokenizer.json" in err
    with pytest.raises(SystemExit) as e:
        main(["export", "gguf", str(models["v3"]), "--out", str(tmp_path / "x.gguf"), "--type", "q4_0"])
    assert e.value.code == 2 and "invalid choice: 'q4_0'" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".*tmp*"))


@pytest.mark.parametrize("overrides,message", [
    (dict(moe_layer_freq=2), "moe_layer_freq=2"),
    (dict(num_hidden_layers=27), "num_hidden_layers=27 with q_lora_rank"),
    (dict(attention_bias=True), "attention_bias"),
])
def test_configs_llama_cpp_cannot_run_are_refused(tmp_path, bpe, overrides, message):
    folder = tmp_path / "m"
    folder.mkdir()
    ModelConfig.preset("tiny", **overrides).save(folder / "config.json")
    bpe.save(folder)
    with pytest.raises(NanoseekError, match=message):
        export_gguf(folder, tmp_path / "x.gguf")


def test_routing_llama_cpp_runs_differently_is_noted():
    notes = check_llama_cpp(ModelConfig.preset("tiny", topk_method="group_limited_greedy", scoring_func="softmax"))
    assert any("group_limited_greedy" in n for n in notes)
    assert check_llama_cpp(ModelConfig.preset("tiny")) == []


def test_dense_model_all_leading_dense_layers_no_mtp(tmp_path, bpe):
    folder = _save(tmp_path / "dense", bpe, n_routed_experts=0, n_shared_experts=0, first_k_dense_replace=3)
    summary = export_gguf(folder, tmp_path / "d.gguf")
    f = fields(gguf.GGUFReader(tmp_path / "d.gguf"))
    assert f["deepseek2.leading_dense_block_count"] == 3 and f["deepseek2.block_count"] == 3
    assert f["deepseek2.nextn_predict_layers"] == 0 and "deepseek2.expert_count" not in f
    assert summary.mtp_layers == 0 and any("MTP modules left out" in n for n in summary.notes)


def test_command_prints_a_summary(models, tmp_path, capsys):
    out = tmp_path / "m.gguf"
    assert main(["export", "gguf", str(models["v3"]), "--out", str(out), "--type", "bf16"]) == 0
    printed = capsys.readouterr().out
    assert f"{out}: 74 tensors, bf16" in printed and "1 MTP block" in printed and "dbrx" in printed
    assert gguf.GGUFReader(out).fields["general.file_type"].contents() == gguf.LlamaFileType.MOSTLY_BF16


def test_llama_cpp_tokenizes_as_nanoseek(models, exported, tmp_path):
    """llama.cpp's own tokenizer on the exported vocabulary gives nanoseek's ids (mixed English, Chinese,
    digits, special tokens). Needs llama-cpp-python (bench/gguf_parity.py installs it in a side env)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    path = tmp_path / "vocab.gguf"
    export_gguf(models["v3"], path)
    llm = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    tok = Tokenizer.load(models["v3"])
    for text in TEXT[:1] + ["<｜User｜>3 + 45 = ?<｜Assistant｜><think>\n嗯，好的 1234567\n</think>\n\nok"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=True) == tok.encode(text)
