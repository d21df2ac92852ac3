"""GGUF export: a nanoseek model folder -> one .gguf file that llama.cpp runs as its `deepseek2` architecture
(and so Ollama and LM Studio, which are built on llama.cpp).

The file holds what llama.cpp's deepseek2 loader reads (src/models/deepseek2.cpp, llama-model.cpp):
- hyperparameters under `deepseek2.*`: sizes, MLA ranks and head dims (MLA is stored as one shared KV
  "head" of kv_lora_rank + qk_rope values, which is what the latent cache holds), expert counts, groups,
  gating function, routed scaling, top-k normalisation, leading dense layers, RoPE / YaRN, MTP count;
- tensors in the layout of llama.cpp's own converter: routed experts stacked per layer, kv_b_proj split
  per head into `attn_k_b` (transposed, for the absorbed attention) and `attn_v_b`, MTP modules
  appended as blocks L .. L+n-1 with their `nextn.*` tensors;
- the tokenizer: byte-level BPE ("gpt2") tokens, merges, token types, special ids, the chat template
  and a pre-tokenizer name whose split regex is nanoseek's.

Arrays are in torch order (rows, cols); gguf stores dimensions innermost first, so an HF weight
(out, in) becomes ggml {in, out}, the orientation llama.cpp's loader expects. Norms, the router and
its bias stay f32 whatever the type (as llama.cpp's converter does); q8_0 goes through gguf's own
quantizer, and a weight whose rows do not split into q8_0's 32-value blocks falls back to f16.
"""

from __future__ import annotations

import json
import math
import os
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch

from ..checkpoint import load_model
from ..config import ModelConfig
from ..errors import CheckpointError, DataError, NanoseekError
from ..tokenizer import (BOS, CHAT_TEMPLATE, CONFIG_FILE, END_THINK, EOS, SPLIT_PATTERN, THINK,
                         TOKENIZER_FILE, Tokenizer)

ARCH = "deepseek2"
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
# llama.cpp pre-tokenizer names whose regex is exactly nanoseek's SPLIT_PATTERN (GPT-4's). "dbrx" applies
# BPE merges to every word, as HF tokenizers do with ignore_merges=false (what nanoseek trains);
# "llama-bpe" first looks a whole word up in the vocabulary, as ignore_merges=true does.
PRE_TOKENIZER = {False: "dbrx", True: "llama-bpe"}
# Tokens shown as text (never hidden as control tokens) and split out of any text, like R1's GGUFs.
TEXT_SPECIALS = (THINK, END_THINK)


@dataclass
class ExportSummary:
    """What `export_gguf` wrote."""
    path: Path
    type: str
    tensors: int
    bytes: int
    mtp_layers: int  # MTP modules written as nextn blocks
    pre_tokenizer: str
    notes: list[str] = field(default_factory=list)  # fallbacks and llama.cpp differences worth knowing


def _ggml_types():
    import gguf
    Q = gguf.GGMLQuantizationType
    F = gguf.LlamaFileType
    return {"f32": (Q.F32, F.ALL_F32), "f16": (Q.F16, F.MOSTLY_F16), "bf16": (Q.BF16, F.MOSTLY_BF16),
            "q8_0": (Q.Q8_0, F.MOSTLY_Q8_0)}


# ---- what llama.cpp's deepseek2 can run -----------------------------------------------------------
def check_llama_cpp(config: ModelConfig) -> list[str]:
    """Raise NanoseekError for a config llama.cpp's deepseek2 cannot express; return notes on the
    parts it runs differently (group scores, norm epsilon)."""
    notes = []
    if config.attention_bias:
        raise NanoseekError("attention_bias=true cannot be exported: llama.cpp's deepseek2 has no "
                            "attention biases")
    if config.n_routed_experts and config.moe_layer_freq != 1:
        raise NanoseekError(f"moe_layer_freq={config.moe_layer_freq} cannot be exported: llama.cpp's "
                            "deepseek2 makes every layer after first_k_dense_replace an MoE layer")
    lite_shape = config.num_hidden_layers in (26, 27) or (config.num_hidden_layers == 48 and
                                                          config.vocab_size == 128256)
    if lite_shape and config.q_lora_rank is not None:
        raise NanoseekError(f"num_hidden_layers={config.num_hidden_layers} with q_lora_rank set cannot be "
                            "exported: llama.cpp takes deepseek2 models of that depth for DeepSeek-V2-Lite "
                            "and ignores q_lora_rank")
    y = config.yarn
    if y and y["factor"] < 1:
        raise NanoseekError(f"YaRN factor {y['factor']} < 1 cannot be exported (llama.cpp's deepseek2 "
                            "attention scale assumes factor >= 1)")
    if config.n_routed_experts and config.n_group > 1 and config.topk_method == "group_limited_greedy":
        notes.append("group_limited_greedy scores an expert group by its best expert; llama.cpp scores "
                     "groups by the sum of their top 2, so routing can differ")
    if config.rms_norm_eps != 1e-6:
        notes.append(f"llama.cpp uses rms_norm_eps={config.rms_norm_eps:g} for the q_a / kv_a norms too "
                     "(nanoseek: 1e-6)")
    return notes


def yarn_metadata(config: ModelConfig) -> dict[str, float]:
    """RoPE scaling keys that make llama.cpp's deepseek2 apply nanoseek's YaRN exactly.

    nanoseek (as DeepSeek and transformers): cos/sin amplitude A = M(mscale) / M(mscale_all_dim) when both
    are set, else M(1); softmax scale (nope+rope)^-0.5 * K^2 with K = M(mscale_all_dim), or 1 without it;
    M(m) = 0.1 m ln(factor) + 1. llama.cpp (llama-context.cpp, deepseek2.cpp): with
    yarn_log_multiplier = 0.1 b != 0 the amplitude is `rope.scaling.attn_factor` r and the scale is
    multiplied by (r M(b))^2; with no multiplier the amplitude is r M(1) and the scale (r M(1))^2.
    So: r = A and M(b) = K / A (b = mscale_all_dim when mscale equals it, the usual case), or, when that
    gives b = 0, no multiplier and r = A / M(1).
    """
    y = config.yarn
    if not y:
        return {}
    f = y["factor"]

    def M(m: float) -> float:
        return 0.1 * m * math.log(f) + 1.0 if f > 1 else 1.0

    a, b = y["mscale"], y["mscale_all_dim"]
    amplitude = M(a) / M(b) if a and b else M(1.0)
    k = M(b) if b else 1.0
    out = {"factor": f, "original_context_length": y["original_max_position_embeddings"],
           "beta_fast": y["beta_fast"], "beta_slow": y["beta_slow"]}
    mul = (k / amplitude - 1.0) / (0.1 * math.log(f)) if f > 1 else 0.0
    if abs(mul) > 1e-9:
        out["log_mul"] = 0.1 * mul
        r = amplitude
    else:
        r = amplitude / M(1.0)
    if abs(r - 1.0) > 1e-9:
        out["attn_factor"] = r
    return out


# ---- metadata -------------------------------------------------------------------------------------
def _write_hparams(w, config: ModelConfig, mtp_layers: int, file_type) -> None:
    """Every deepseek2 hyperparameter llama.cpp reads (keys spelled by gguf's writer methods)."""
    import gguf
    L = config.num_hidden_layers
    moe = config.n_routed_experts > 0
    w.add_type(gguf.GGUFType.MODEL)
    w.add_file_type(file_type)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(L + mtp_layers)
    w.add_nextn_predict_layers(mtp_layers)
    w.add_context_length(config.max_position_embeddings)
    w.add_embedding_length(config.hidden_size)
    w.add_feed_forward_length(config.intermediate_size)
    w.add_head_count(config.num_attention_heads)
    w.add_head_count_kv(1)  # MLA runs as one shared latent "head" (MQA), decompressed per head
    w.add_layer_norm_rms_eps(config.rms_norm_eps)
    w.add_vocab_size(config.vocab_size)
    w.add_leading_dense_block_count(config.first_k_dense_replace if moe else L)
    w.add_q_lora_rank(config.q_lora_rank or 0)  # 0: a plain q_proj (attn_q)
    w.add_kv_lora_rank(config.kv_lora_rank)
    w.add_key_length(config.kv_lora_rank + config.qk_rope_head_dim)
    w.add_value_length(config.kv_lora_rank)
    w.add_key_length_mla(config.qk_head_dim)
    w.add_value_length_mla(config.v_head_dim)
    w.add_rope_dimension_count(config.qk_rope_head_dim)
    w.add_rope_freq_base(config.rope_theta)
    w.add_expert_feed_forward_length(config.moe_intermediate_size if moe else config.intermediate_size)
    w.add_expert_shared_count(config.n_shared_experts if moe else 0)
    if moe:
        grouped = config.n_group > 1 and config.topk_method != "greedy"  # greedy ignores groups
        w.add_expert_count(config.n_routed_experts)
        w.add_expert_used_count(config.num_experts_per_tok)
        w.add_expert_group_count(config.n_group if grouped else 1)
        w.add_expert_group_used_count(config.topk_group if grouped else 1)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID if config.scoring_func == "sigmoid"
                                 else gguf.ExpertGatingFuncType.SOFTMAX)
        w.add_expert_weights_scale(config.routed_scaling_factor)
        # nanoseek (like DeepSeek's top-1 case) leaves a single weight unnormalised
        w.add_expert_weights_norm(bool(config.norm_topk_prob and config.num_experts_per_tok > 1))
    yarn = yarn_metadata(config)
    if yarn:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(yarn["factor"])
        w.add_rope_scaling_orig_ctx_len(yarn["original_context_length"])
        w.add_rope_scaling_yarn_beta_fast(yarn["beta_fast"])
        w.add_rope_scaling_yarn_beta_slow(yarn["beta_slow"])
        if "log_mul" in yarn:
            w.add_rope_scaling_yarn_log_mul(yarn["log_mul"])
        if "attn_factor" in yarn:
            w.add_rope_scaling_attn_factors(yarn["attn_factor"])


def tokenizer_pre_name(tok: Tokenizer, where: Path) -> str:
    """The llama.cpp pre-tokenizer that splits text as `tok` does; DataError naming the part that differs."""
    spec = json.loads(tok.backend.to_str())
    model = spec.get("model") or {}
    if model.get("type") != "BPE" or model.get("byte_fallback"):
        raise DataError(f"{where}: only byte-level BPE tokenizers can be exported (model type "
                        f"{model.get('type')!r})")
    if spec.get("normalizer") is not None:
        raise DataError(f"{where}: a tokenizer with a normalizer cannot be exported (llama.cpp's BPE "
                        "does not normalize)")
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]
    ok = (len(steps) == 2 and steps[0].get("type") == "Split"
          and (steps[0].get("pattern") or {}).get("Regex") == SPLIT_PATTERN
          and steps[0].get("behavior") == "Isolated" and not steps[0].get("invert")
          and steps[1].get("type") == "ByteLevel" and not steps[1].get("add_prefix_space")
          and not steps[1].get("use_regex"))
    if not ok:
        raise DataError(f"{where}: the tokenizer's pre-tokenizer is not nanoseek's (GPT-4 split regex, then "
                        "byte-level): llama.cpp has no pre-tokenizer known to match it")
    return PRE_TOKENIZER[bool(model.get("ignore_merges"))]


def _write_tokenizer(w, tok: Tokenizer, folder: Path, vocab_size: int, pre: str) -> None:
    """Tokens, types, merges, special ids, BOS flag and the chat template."""
    import gguf
    spec = json.loads(tok.backend.to_str())
    added = {t["id"]: t for t in spec.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        text = tok.id_to_token(i) if i < tok.vocab_size else None
        if text is None:  # ids the model has beyond the tokenizer's (padding rows)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(text)
            special = added[i].get("special") and text not in TEXT_SPECIALS
            types.append(gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(text)
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    if not merges:
        # llama.cpp refuses a BPE file without merges; a merge of two special tokens can never apply
        # (BPE merges symbols inside one pre-tokenized word, and special tokens are split out first).
        merges = [f"{BOS} {EOS}"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(tok.bos_id)
    w.add_eos_token_id(tok.eos_id)
    w.add_pad_token_id(tok.pad_id)
    hf = _tokenizer_config(folder)
    w.add_add_bos_token(bool(hf.get("add_bos_token", True)))
    w.add_add_eos_token(bool(hf.get("add_eos_token", False)))
    w.add_chat_template(hf.get("chat_template") or CHAT_TEMPLATE)


def _tokenizer_config(folder: Path) -> dict:
    path = folder / CONFIG_FILE
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: not valid JSON ({e})") from None
    return data if isinstance(data, dict) else {}


# ---- tensors --------------------------------------------------------------------------------------
def _names():
    import gguf
    T = gguf.MODEL_TENSOR

    def name(kind, bid=None, suffix="weight") -> str:
        return f"{gguf.TENSOR_NAMES[kind].format(bid=bid)}.{suffix}"
    return T, name


# our block-local parameter -> the llama.cpp tensor it becomes (kv_b_proj and experts handled apart)
_BLOCK = {
    "input_layernorm.weight": "ATTN_NORM", "self_attn.q_a_proj.weight": "ATTN_Q_A",
    "self_attn.q_a_layernorm.weight": "ATTN_Q_A_NORM", "self_attn.q_b_proj.weight": "ATTN_Q_B",
    "self_attn.q_proj.weight": "ATTN_Q", "self_attn.kv_a_proj_with_mqa.weight": "ATTN_KV_A_MQA",
    "self_attn.kv_a_layernorm.weight": "ATTN_KV_A_NORM", "self_attn.o_proj.weight": "ATTN_OUT",
    "post_attention_layernorm.weight": "FFN_NORM", "mlp.gate_proj.weight": "FFN_GATE",
    "mlp.up_proj.weight": "FFN_UP", "mlp.down_proj.weight": "FFN_DOWN", "mlp.gate.weight": "FFN_GATE_INP",
    "mlp.experts.down": "FFN_DOWN_EXP", "mlp.shared_experts.gate_proj.weight": "FFN_GATE_SHEXP",
    "mlp.shared_experts.up_proj.weight": "FFN_UP_SHEXP", "mlp.shared_experts.down_proj.weight": "FFN_DOWN_SHEXP",
}
_MTP = {"enorm.weight": "NEXTN_ENORM", "hnorm.weight": "NEXTN_HNORM", "eh_proj.weight": "NEXTN_EH_PROJ",
        "shared_head.norm.weight": "NEXTN_SHARED_HEAD_NORM"}
_TOP = {"embed_tokens.weight": "TOKEN_EMBD", "norm.weight": "OUTPUT_NORM", "lm_head.weight": "OUTPUT"}
_ALWAYS_F32 = ("FFN_GATE_INP", "FFN_EXP_PROBS_B")  # routing decisions: never rounded


def gguf_tensors(model, mtp_layers: int) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(llama.cpp tensor name, fp32 tensor in torch order, keep in f32) for every tensor of the file.
    MTP modules beyond `mtp_layers` are left out; an unknown parameter raises (nothing is dropped silently)."""
    T, name = _names()
    cfg = model.config
    L = cfg.num_hidden_layers
    for key, t in model.state_dict().items():
        t = t.detach().float()
        parts = key.split(".")
        if key in _TOP:
            if key == "lm_head.weight" and cfg.tie_word_embeddings:
                continue  # llama.cpp reuses token_embd
            yield name(getattr(T, _TOP[key])), t, t.dim() == 1
            continue
        if parts[0] == "layers":
            bid, local = int(parts[1]), ".".join(parts[2:])
        elif parts[0] == "mtp":
            k = int(parts[1])
            if k >= mtp_layers:
                continue
            bid, local = L + k, ".".join(parts[2:])
            if local in _MTP:
                yield name(getattr(T, _MTP[local]), bid), t, t.dim() == 1
                continue
            if not local.startswith("block."):
                raise CheckpointError(f"cannot export parameter '{key}': no GGUF tensor for it")
            local = local[len("block."):]
        else:
            raise CheckpointError(f"cannot export parameter '{key}': no GGUF tensor for it")
        yield from _block_tensors(cfg, bid, local, t, key)


def _block_tensors(cfg: ModelConfig, bid: int, local: str, t: torch.Tensor, key: str):
    T, name = _names()
    if local == "self_attn.kv_b_proj.weight":
        # (H * (nope + v), kv_lora) -> per head: k_b (H, kv_lora, nope) transposed for q_nope absorption,
        # v_b (H, v, kv_lora); ggml {nope, kv_lora, H} and {kv_lora, v, H}
        H, nope = cfg.num_attention_heads, cfg.qk_nope_head_dim
        kv = t.view(H, nope + cfg.v_head_dim, cfg.kv_lora_rank)
        yield name(T.ATTN_K_B, bid), kv[:, :nope].transpose(1, 2), False
        yield name(T.ATTN_V_B, bid), kv[:, nope:], False
    elif local == "mlp.experts.gate_up":  # (E, 2I, D): gate rows then up rows
        inter = cfg.moe_intermediate_size
        yield name(T.FFN_GATE_EXP, bid), t[:, :inter], False
        yield name(T.FFN_UP_EXP, bid), t[:, inter:], False
    elif local == "mlp.gate.e_score_correction_bias":
        yield name(T.FFN_EXP_PROBS_B, bid, "bias"), t, True
    elif local in _BLOCK:
        kind = _BLOCK[local]
        yield name(getattr(T, kind), bid), t, t.dim() == 1 or kind in _ALWAYS_F32
    else:
        raise CheckpointError(f"cannot export parameter '{key}': no GGUF tensor for it")


def _encode(t: torch.Tensor, qtype) -> np.ndarray:
    """The bytes gguf writes for `t` as `qtype` (f16 / bf16 / q8_0 through gguf's quantizer)."""
    import gguf
    data = t.contiguous().numpy()
    if qtype == gguf.GGMLQuantizationType.F32:
        return data
    return gguf.quants.quantize(data, qtype)


# ---- the export -----------------------------------------------------------------------------------
def export_gguf(model_dir: str | Path, out: str | Path, type: str = "f32", *,
                log: Callable[[str], None] | None = None) -> ExportSummary:
    """Write the model folder `model_dir` (config.json, safetensors, tokenizer files) to the GGUF file
    `out` as llama.cpp's deepseek2, weights as `type` (f32, f16, bf16 or q8_0). The file is written under
    a temporary name and renamed into place: a failed export leaves no partial file."""
    import gguf
    if type not in GGUF_TYPES:
        raise NanoseekError(f"unknown GGUF type {type!r}: choose one of {', '.join(GGUF_TYPES)}")
    folder, out = Path(model_dir), Path(out)
    if not folder.is_dir():
        raise CheckpointError(f"model folder not found: {folder}")
    if not (folder / TOKENIZER_FILE).is_file():
        raise DataError(f"{folder} has no {TOKENIZER_FILE}: a GGUF file carries the tokenizer; copy the "
                        "tokenizer's files into the model folder (nanoseek train does when its recipe names one)")
    if out.is_dir():
        raise NanoseekError(f"--out {out} is a folder: give the .gguf file to write")
    say = log or (lambda _: None)
    config = ModelConfig.from_hf(folder)
    notes = check_llama_cpp(config)
    tok = Tokenizer.load(folder)
    if tok.vocab_size > config.vocab_size:
        raise DataError(f"{folder}: the tokenizer has {tok.vocab_size} tokens but the model only "
                        f"{config.vocab_size}")
    pre = tokenizer_pre_name(tok, folder / TOKENIZER_FILE)
    mtp = config.num_nextn_predict_layers if config.n_routed_experts > 0 else 0
    if config.num_nextn_predict_layers and not mtp:
        notes.append("MTP modules left out: llama.cpp runs deepseek2 MTP blocks as MoE blocks only")
    if mtp > 1:
        notes.append(f"{mtp} MTP modules written; llama.cpp drafts with the first only")

    say(f"loading {folder}")
    model = load_model(folder, dtype=torch.float32)
    qtype, file_type = _ggml_types()[type]
    F32, F16 = gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16
    block = gguf.GGML_QUANT_SIZES
    plan = []
    for name, t, keep_f32 in gguf_tensors(model, mtp):
        q = F32 if keep_f32 else qtype
        if q != F32 and t.shape[-1] % block[q][0]:
            notes.append(f"{name}: rows of {t.shape[-1]} values do not split into {type} blocks of "
                         f"{block[q][0]}; written as f16")
            q = F16
        plan.append((name, t, q))

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex}")
    w = gguf.GGUFWriter(None, ARCH)
    try:
        w.add_name(folder.resolve().name)
        _write_hparams(w, config, mtp, file_type)
        _write_tokenizer(w, tok, folder, config.vocab_size, pre)
        for name, t, q in plan:
            size, nbytes = block[q]
            w.add_tensor_info(name, tuple(t.shape), np.dtype(np.float32), t.numel() // size * nbytes, raw_dtype=q)
        w.write_header_to_file(tmp)
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        say(f"writing {len(plan)} tensors ({type}) to {out}")
        for name, t, q in plan:
            w.write_tensor_data(_encode(t, q))
        w.close()
        os.replace(tmp, out)
    except BaseException:
        w.close()
        tmp.unlink(missing_ok=True)
        raise
    return ExportSummary(path=out, type=type, tensors=len(plan), bytes=out.stat().st_size, mtp_layers=mtp,
                         pre_tokenizer=pre, notes=notes)
