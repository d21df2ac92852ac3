"""ModelConfig: every DeepSeek-V3/V2 hyperparameter in one dataclass, with presets and HF config.json I/O.

Field names follow transformers' DeepseekV3Config / DeepseekV2Config so a config.json maps one to one.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ConfigError

MODEL_TYPES = ("deepseek_v3", "deepseek_v2")
SCORING_FUNCS = ("sigmoid", "softmax")
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
ARCHITECTURES = {"deepseek_v3": "DeepseekV3ForCausalLM", "deepseek_v2": "DeepseekV2ForCausalLM"}
# Fields missing from a config.json take transformers' defaults for that model_type (transformers
# 5.24 does not even write scoring_func / topk_method for deepseek_v3). MTP defaults to none.
HF_DEFAULTS = {
    "deepseek_v3": dict(scoring_func="sigmoid", topk_method="noaux_tc", vocab_size=129280, hidden_size=7168,
                        intermediate_size=18432, moe_intermediate_size=2048, num_hidden_layers=61,
                        num_attention_heads=128, n_shared_experts=1, n_routed_experts=256,
                        routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
                        v_head_dim=128, qk_nope_head_dim=128, n_group=8, topk_group=4, num_experts_per_tok=8,
                        first_k_dense_replace=3, norm_topk_prob=True, max_position_embeddings=4096,
                        bos_token_id=0, eos_token_id=1, num_nextn_predict_layers=0),
    "deepseek_v2": dict(scoring_func="softmax", topk_method="greedy", vocab_size=102400, hidden_size=4096,
                        intermediate_size=11008, moe_intermediate_size=1407, num_hidden_layers=32,
                        num_attention_heads=32, n_shared_experts=2, n_routed_experts=64,
                        routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
                        v_head_dim=128, qk_nope_head_dim=128, n_group=1, topk_group=1,
                        num_experts_per_tok=None, first_k_dense_replace=0, norm_topk_prob=False,
                        max_position_embeddings=2048, bos_token_id=1, eos_token_id=2,
                        num_nextn_predict_layers=0),
}
YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "mscale", "mscale_all_dim")


@dataclass
class ModelConfig:
    model_type: str = "deepseek_v3"
    vocab_size: int = 4096
    hidden_size: int = 256
    intermediate_size: int = 1024  # dense MLP layers (the first `first_k_dense_replace`)
    moe_intermediate_size: int = 128  # each routed / shared expert
    num_hidden_layers: int = 4
    first_k_dense_replace: int = 1
    moe_layer_freq: int = 1
    num_attention_heads: int = 4
    num_key_value_heads: int | None = None  # unused by MLA (every head has its own K/V); kept for HF
    # DeepSeekMoE
    n_routed_experts: int = 16
    n_shared_experts: int = 1
    num_experts_per_tok: int = 4
    n_group: int = 1
    topk_group: int = 1
    topk_method: str = "noaux_tc"
    scoring_func: str = "sigmoid"
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    # MLA
    q_lora_rank: int | None = 96
    kv_lora_rank: int = 64
    qk_nope_head_dim: int = 32
    qk_rope_head_dim: int = 16
    v_head_dim: int = 32
    # positions
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None  # yarn: factor, original_max_position_embeddings, beta_*, mscale*
    max_position_embeddings: int = 4096
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    hidden_act: str = "silu"
    attention_bias: bool = False
    initializer_range: float = 0.02
    num_nextn_predict_layers: int = 0  # MTP depth
    bos_token_id: int | None = 0
    eos_token_id: int | None = 1
    # a field of DeepSeek's published config.json files (V2, V3), kept for the round trip: the weight of
    # the sequence-wise balance loss. It only gives the MoE layers their starting `aux_loss_alpha`; a
    # training run takes it (like the bias update speed and the MTP loss weight) from its recipe and sets
    # it on the layers, never on this config.
    aux_loss_alpha: float = 0.0

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        self.validate()

    # ---- derived sizes -------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    def is_moe_layer(self, layer_idx: int) -> bool:
        """DeepSeek's rule: dense for the first k layers, then MoE every `moe_layer_freq` layers."""
        return (
            self.n_routed_experts > 0
            and layer_idx >= self.first_k_dense_replace
            and layer_idx % self.moe_layer_freq == 0
        )

    # ---- validation ----------------------------------------------------------------------
    def validate(self, source: str | None = None) -> None:
        where = f" in {source}" if source else ""

        def bad(name: str, why: str):
            raise ConfigError(f"invalid config field '{name}'{where}: {why} (got {getattr(self, name)!r})")

        if self.model_type not in MODEL_TYPES:
            bad("model_type", f"must be one of {MODEL_TYPES}")
        positive = (
            "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "max_position_embeddings",
            "moe_layer_freq",
        )
        for name in positive:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                bad(name, "must be a positive integer")
        for name in ("n_routed_experts", "n_shared_experts", "first_k_dense_replace", "num_nextn_predict_layers"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                bad(name, "must be a non-negative integer")
        if self.q_lora_rank is not None and (not isinstance(self.q_lora_rank, int) or self.q_lora_rank <= 0):
            bad("q_lora_rank", "must be a positive integer or null")
        if self.qk_rope_head_dim % 2:
            bad("qk_rope_head_dim", "must be even: RoPE rotates pairs of dimensions")
        if self.first_k_dense_replace > self.num_hidden_layers:
            bad("first_k_dense_replace", f"exceeds num_hidden_layers ({self.num_hidden_layers})")
        if not (self.rms_norm_eps > 0):
            bad("rms_norm_eps", "must be positive")
        if not (self.rope_theta > 0):
            bad("rope_theta", "must be positive")
        if self.hidden_act != "silu":
            bad("hidden_act", "only 'silu' is supported")
        if self.n_routed_experts > 0:
            if self.moe_intermediate_size is None or self.moe_intermediate_size <= 0:
                bad("moe_intermediate_size", "must be a positive integer")
            if self.scoring_func not in SCORING_FUNCS:
                bad("scoring_func", f"must be one of {SCORING_FUNCS}")
            if self.topk_method not in TOPK_METHODS:
                bad("topk_method", f"must be one of {TOPK_METHODS}")
            if not isinstance(self.num_experts_per_tok, int) or self.num_experts_per_tok <= 0:
                bad("num_experts_per_tok", "must be a positive integer")
            if self.num_experts_per_tok > self.n_routed_experts:
                bad("num_experts_per_tok", f"exceeds n_routed_experts ({self.n_routed_experts})")
            if not isinstance(self.n_group, int) or self.n_group <= 0:
                bad("n_group", "must be a positive integer")
            if not isinstance(self.topk_group, int) or self.topk_group <= 0:
                bad("topk_group", "must be a positive integer")
            if self.topk_group > self.n_group:
                bad("topk_group", f"exceeds n_group ({self.n_group})")
            if self.n_routed_experts % self.n_group:
                bad("n_group", f"n_routed_experts ({self.n_routed_experts}) is not divisible into {self.n_group} groups")
            per_group = self.n_routed_experts // self.n_group
            if self.topk_group * per_group < self.num_experts_per_tok:
                bad("topk_group", f"{self.topk_group} groups of {per_group} experts cannot supply "
                                  f"num_experts_per_tok={self.num_experts_per_tok}")
            if self.topk_method == "noaux_tc" and self.n_group > 1 and per_group < 2:
                bad("n_group", "noaux_tc scores a group by its top-2 experts: groups need at least 2 experts")
            if not self.routed_scaling_factor > 0:
                bad("routed_scaling_factor", "must be positive")
        if self.rope_scaling is not None:
            self._validate_rope_scaling(bad)

    def _validate_rope_scaling(self, bad):
        rs = self.rope_scaling
        if not isinstance(rs, dict):
            bad("rope_scaling", "must be a mapping or null")
        kind = rs.get("type", rs.get("rope_type", "yarn"))
        if kind != "yarn":
            bad("rope_scaling", f"only 'yarn' scaling is supported, not {kind!r}")
        for key in ("factor", "original_max_position_embeddings"):
            v = rs.get(key)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                bad("rope_scaling", f"yarn needs a positive number for '{key}'")
        for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim"):
            v = rs.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))):
                bad("rope_scaling", f"'{key}' must be a number")

    # ---- RoPE / attention scaling ------------------------------------------------------
    @property
    def yarn(self) -> dict | None:
        """The yarn parameters with DeepSeek's defaults filled in, or None without scaling."""
        if not self.rope_scaling:
            return None
        rs = self.rope_scaling
        return {
            "factor": float(rs["factor"]),
            "original_max_position_embeddings": int(rs["original_max_position_embeddings"]),
            "beta_fast": float(rs.get("beta_fast") or 32),
            "beta_slow": float(rs.get("beta_slow") or 1),
            "mscale": float(rs.get("mscale") or 0) or None,
            "mscale_all_dim": float(rs.get("mscale_all_dim") or 0) or None,
        }

    @property
    def softmax_scale(self) -> float:
        """(qk_nope + qk_rope)^-0.5, times mscale(factor, mscale_all_dim)^2 under YaRN."""
        scale = self.qk_head_dim ** -0.5
        y = self.yarn
        if y and y["mscale_all_dim"]:
            m = yarn_mscale(y["factor"], y["mscale_all_dim"])
            scale *= m * m
        return scale

    # ---- HF config.json ----------------------------------------------------------------
    @classmethod
    def from_hf(cls, source: str | Path | dict) -> "ModelConfig":
        """Read an HF config.json (path to the file or its folder, or the parsed dict)."""
        name = None
        if isinstance(source, dict):
            raw = dict(source)
        else:
            p = Path(source)
            if p.is_dir():
                p = p / "config.json"
            name = str(p)
            if not p.exists():
                raise ConfigError(f"config file not found: {p}")
            try:
                raw = json.loads(p.read_text(encoding="utf-8"))
            except json.JSONDecodeError as e:
                raise ConfigError(f"{p} is not valid JSON: line {e.lineno}: {e.msg}") from None
            except UnicodeDecodeError as e:
                raise ConfigError(f"{p} is not UTF-8 text (byte {e.start})") from None
            if not isinstance(raw, dict):
                raise ConfigError(f"{p} must hold a JSON object")
        where = f" in {name}" if name else ""
        model_type = raw.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ConfigError(f"unknown model_type {model_type!r}{where}: nanoseek reads {MODEL_TYPES}")
        if "num_mtp_layers" in raw and "num_nextn_predict_layers" not in raw:
            raw["num_nextn_predict_layers"] = raw["num_mtp_layers"]
        for key, default in HF_DEFAULTS[model_type].items():
            if key not in raw or (key in ("scoring_func", "topk_method") and raw[key] is None):
                raw[key] = default
        rope_theta, rope_scaling = _read_rope(raw, name)
        raw["rope_theta"] = rope_theta
        raw["rope_scaling"] = rope_scaling
        if raw.get("n_routed_experts") is None:
            raw["n_routed_experts"] = 0
        if raw.get("n_shared_experts") is None:
            raw["n_shared_experts"] = 0
        for k in ("n_group", "topk_group"):
            if raw.get(k) is None:
                raw[k] = 1
        eos = raw.get("eos_token_id")
        if isinstance(eos, list):
            raw["eos_token_id"] = eos[0] if eos else None
        known = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in raw.items() if k in known}
        try:
            cfg = cls(**kwargs)
        except ConfigError as e:
            raise ConfigError(f"{e}{where}") from None
        except TypeError as e:
            raise ConfigError(f"invalid config{where}: {e}") from None
        return cfg

    def to_hf(self) -> dict[str, Any]:
        """A config.json dict that transformers' DeepseekV3/V2 (and DeepSeek's own code) accept."""
        d = {
            "architectures": [ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
        }
        skip = {"rope_scaling", "rope_theta"}
        for f in dataclasses.fields(self):
            if f.name not in skip and f.name != "model_type":
                d[f.name] = getattr(self, f.name)
        d["rope_theta"] = self.rope_theta
        # Older spelling, read by DeepSeek's code, vLLM, llama.cpp and transformers alike.
        d["rope_scaling"] = ({"type": "yarn", "rope_type": "yarn", **self.rope_scaling}
                             if self.rope_scaling else None)
        d["num_mtp_layers"] = self.num_nextn_predict_layers
        d["rope_interleave"] = True
        d["use_cache"] = True
        d["torch_dtype"] = "float32"
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_hf(), indent=2) + "\n")

    # ---- presets -----------------------------------------------------------------------
    @classmethod
    def preset(cls, name: str, **overrides) -> "ModelConfig":
        if name not in PRESETS:
            raise ConfigError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        values = {**PRESETS[name], **overrides}
        return cls(**values)

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN attention temperature: 0.1 * m * ln(f) + 1 (1 when not extending)."""
    if factor <= 1:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


def _read_rope(raw: dict, name: str | None) -> tuple[float, dict | None]:
    """Both spellings: older `rope_theta` + `rope_scaling`, newer `rope_parameters` (theta inside)."""
    params = raw.get("rope_parameters")
    scaling = raw.get("rope_scaling")
    theta = raw.get("rope_theta")
    if isinstance(params, dict):
        theta = params.get("rope_theta", theta)
        if params.get("rope_type", params.get("type", "default")) != "default":
            scaling = params
    if scaling is not None:
        if not isinstance(scaling, dict):
            where = f" in {name}" if name else ""
            raise ConfigError(f"invalid config field 'rope_scaling'{where}: must be a mapping or null")
        kind = scaling.get("rope_type", scaling.get("type", "yarn"))
        if kind == "default":
            scaling = None
        else:
            scaling = {"type": kind, **{k: scaling[k] for k in YARN_KEYS if k in scaling}}
            if kind == "yarn":
                scaling.pop("type")
    return float(theta if theta is not None else 10000.0), scaling


_V3_YARN = {"factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
            "mscale": 1.0, "mscale_all_dim": 1.0}
_V2_YARN = {"factor": 40, "original_max_position_embeddings": 4096, "beta_fast": 32, "beta_slow": 1,
            "mscale": 0.707, "mscale_all_dim": 0.707}

PRESETS: dict[str, dict] = {
    # A few M params: fast enough for every test on a 2-core CPU.
    "tiny": dict(vocab_size=1024, hidden_size=128, intermediate_size=384, moe_intermediate_size=64,
                 num_hidden_layers=3, first_k_dense_replace=1, num_attention_heads=4,
                 n_routed_experts=8, n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1,
                 routed_scaling_factor=2.5, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32,
                 qk_rope_head_dim=16, v_head_dim=32, max_position_embeddings=2048,
                 num_nextn_predict_layers=1),
    # Tens of M params: the demo / Shakespeare scale.
    "small": dict(vocab_size=8192, hidden_size=384, intermediate_size=1152, moe_intermediate_size=192,
                  num_hidden_layers=6, first_k_dense_replace=1, num_attention_heads=6,
                  n_routed_experts=32, n_shared_experts=1, num_experts_per_tok=4, n_group=4, topk_group=2,
                  routed_scaling_factor=2.5, q_lora_rank=128, kv_lora_rank=96, qk_nope_head_dim=48,
                  qk_rope_head_dim=16, v_head_dim=48, max_position_embeddings=4096,
                  num_nextn_predict_layers=1),
    # The benchmark configs of the performance issue.
    "bench-8m": dict(vocab_size=4096, hidden_size=256, intermediate_size=1024, moe_intermediate_size=128,
                     num_hidden_layers=4, first_k_dense_replace=1, num_attention_heads=4,
                     n_routed_experts=16, n_shared_experts=1, num_experts_per_tok=4, n_group=1, topk_group=1,
                     q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32, qk_rope_head_dim=16,
                     v_head_dim=32),
    "bench-192m": dict(vocab_size=4096, hidden_size=512, intermediate_size=1024, moe_intermediate_size=256,
                       num_hidden_layers=8, first_k_dense_replace=1, num_attention_heads=4,
                       n_routed_experts=64, n_shared_experts=1, num_experts_per_tok=6, n_group=1,
                       topk_group=1, q_lora_rank=96, kv_lora_rank=64, qk_nope_head_dim=32,
                       qk_rope_head_dim=16, v_head_dim=32),
    "deepseek-v2-lite": dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048,
                             intermediate_size=10944, moe_intermediate_size=1408, num_hidden_layers=27,
                             first_k_dense_replace=1, num_attention_heads=16, n_routed_experts=64,
                             n_shared_experts=2, num_experts_per_tok=6, n_group=1, topk_group=1,
                             topk_method="greedy", scoring_func="softmax", norm_topk_prob=False,
                             routed_scaling_factor=1.0, q_lora_rank=None, kv_lora_rank=512,
                             qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
                             rope_scaling=dict(_V2_YARN), max_position_embeddings=163840,
                             bos_token_id=100000, eos_token_id=100001, aux_loss_alpha=0.001),
    "deepseek-v3": dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                        moe_intermediate_size=2048, num_hidden_layers=61, first_k_dense_replace=3,
                        num_attention_heads=128, n_routed_experts=256, n_shared_experts=1,
                        num_experts_per_tok=8, n_group=8, topk_group=4, topk_method="noaux_tc",
                        scoring_func="sigmoid", norm_topk_prob=True, routed_scaling_factor=2.5,
                        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                        v_head_dim=128, rope_scaling=dict(_V3_YARN), max_position_embeddings=163840,
                        num_nextn_predict_layers=1, bos_token_id=0, eos_token_id=1,
                        aux_loss_alpha=0.0001),
}
