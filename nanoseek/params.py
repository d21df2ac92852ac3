"""Parameter and KV-cache accounting for any ModelConfig, computed on the meta device.

The model is built under `torch.device("meta")`: shapes only, no storage, so the 671B DeepSeek-V3
config counts in about a second. The counts come from the real modules (not a formula kept in
sync by hand), so they cannot drift from what `Transformer` builds.

Conventions (what each figure means):
- total: every unique parameter of the main model, MTP excluded (a tied head counts once).
  DeepSeek-V3: 671.03B ("671B").
- mtp: the unique parameters of the multi-token-prediction modules (eh_proj, their norms, their
  block). Their embedding and output head are the main model's and are not counted again.
- on_disk: every value an HF checkpoint holds: total + mtp + persistent buffers (the fp32
  `e_score_correction_bias` of each gate) + the copies of embedding and head that each MTP layer
  carries on disk (DeepSeek-V3: "685B").
- activated: parameters one token computes with in the main model: everything except the routed
  experts it was not sent to and the embedding table (a lookup that reads one row, not a matmul;
  a table tied to the head does count), i.e. head + attention + dense MLPs + shared experts + gates
  + norms + top_k / n_routed of the routed-expert parameters. This reproduces the published
  figures: DeepSeek-V3 36.6B ("37B"; README_WEIGHTS: 36.7B), V2-Lite 2.45B ("2.4B"), V2 20.9B ("21B").
- activated_with_embedding: the same plus the embedding table (DeepSeek-V3: 37.55B, the "~37.5B with
  embedding, head and gates counted"; V2-Lite 2.66B).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from .config import ModelConfig
from .model import MoE, Transformer

# Order of the per-component breakdown; "other" collects anything a future module adds.
COMPONENTS = ("embedding", "head", "attention", "dense_mlp", "routed_experts", "shared_experts", "gates",
              "norms", "other")

# Bytes per stored value, by the names users type and torch's own names.
DTYPE_BYTES = {
    "fp32": 4, "float32": 4, "float": 4,
    "bf16": 2, "bfloat16": 2, "fp16": 2, "float16": 2, "half": 2,
    "fp8": 1, "float8_e4m3fn": 1, "float8_e5m2": 1,
}


@dataclass(frozen=True)
class ParamCount:
    """Parameter counts of one config (see the module docstring for each convention)."""

    total: int  # main model, MTP excluded
    activated: int  # per token, main model, embedding table excluded
    activated_with_embedding: int  # the same plus the embedding table
    mtp: int  # unique MTP parameters
    on_disk: int  # values in an HF checkpoint: + buffers + MTP copies of embedding and head
    buffers: int  # persistent buffers (gate bias), main model and MTP
    components: dict[str, int]  # main-model breakdown (sums to total) plus "mtp"

    def as_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class KVCacheSize:
    """KV-cache bytes per token (all layers): MLA's latent versus a per-head K/V cache.

    The latent cache stores kv_lora_rank + qk_rope_head_dim values per layer (DeepSeek-V2 Sec. 2.1.4);
    a per-head cache of the same attention would store, per head, its key (qk_nope + qk_rope) and its
    value (v_head_dim).
    """

    layers: int
    bytes_per_value: int
    latent_values: int  # per layer per token: kv_lora_rank + qk_rope_head_dim
    per_head_values: int  # per layer per token: heads * (qk_nope + qk_rope + v_head_dim)

    @property
    def latent_bytes(self) -> int:
        return self.layers * self.latent_values * self.bytes_per_value

    @property
    def per_head_bytes(self) -> int:
        return self.layers * self.per_head_values * self.bytes_per_value

    @property
    def ratio(self) -> float:
        """How many times smaller the latent cache is."""
        return self.per_head_bytes / self.latent_bytes


def meta_model(config: ModelConfig) -> Transformer:
    """The model with shapes but no storage (Transformer skips weight init on meta)."""
    with torch.device("meta"):
        return Transformer(config)


def count_parameters(source: ModelConfig | Transformer) -> ParamCount:
    """Count a config (built on meta) or an existing model. See the module docstring."""
    model = source if isinstance(source, Transformer) else meta_model(source)
    config = model.config
    seen: set[int] = set()  # parameter ids already counted: tied weights count once
    components = {name: _numel(modules, seen) for name, modules in _main_parts(model).items()}
    total = _numel(_top_modules(model), set())
    components["other"] = total - sum(components.values())
    mtp = _numel(list(model.mtp), seen)
    components["mtp"] = mtp
    buffers = sum(b.numel() for b in _persistent_buffers(model))
    copies = config.num_nextn_predict_layers * 2 * config.vocab_size * config.hidden_size
    tied = model.lm_head.weight is model.embed_tokens.weight  # then the table is also the head matmul
    with_embedding = total - components["routed_experts"] + _activated_routed(model, config)
    return ParamCount(
        total=total,
        activated=with_embedding - (0 if tied else components["embedding"]),
        activated_with_embedding=with_embedding,
        mtp=mtp,
        on_disk=total + mtp + buffers + copies,
        buffers=buffers,
        components=components,
    )


def kv_cache_size(config: ModelConfig, dtype: str | torch.dtype = "bf16", *, with_mtp: bool = False
                  ) -> KVCacheSize:
    """KV-cache size per token for `dtype` (default bf16). MTP layers only when `with_mtp`
    (they cache too when used for speculative decoding; LatentCache includes them by default)."""
    layers = config.num_hidden_layers + (config.num_nextn_predict_layers if with_mtp else 0)
    return KVCacheSize(
        layers=layers,
        bytes_per_value=dtype_bytes(dtype),
        latent_values=config.kv_lora_rank + config.qk_rope_head_dim,
        per_head_values=config.num_attention_heads * (config.qk_head_dim + config.v_head_dim),
    )


def dtype_bytes(dtype: str | torch.dtype) -> int:
    """Bytes per value: 'bf16', 'fp32', 'fp8', ... or a torch.dtype."""
    if isinstance(dtype, torch.dtype):
        return dtype.itemsize
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


# ---- helpers -----------------------------------------------------------------------------------
def _main_parts(model: Transformer) -> dict[str, list[nn.Module]]:
    """Component name -> the main-model modules whose parameters belong to it (MTP excluded)."""
    parts: dict[str, list[nn.Module]] = {name: [] for name in COMPONENTS if name != "other"}
    parts["embedding"].append(model.embed_tokens)
    parts["head"].append(model.lm_head)  # counts 0 when tied to the embedding
    parts["norms"].append(model.norm)
    for block in model.layers:
        parts["norms"] += [block.input_layernorm, block.post_attention_layernorm]
        parts["attention"].append(block.self_attn)  # includes the q_a / kv_a norms inside MLA
        if isinstance(block.mlp, MoE):
            parts["gates"].append(block.mlp.gate)
            parts["routed_experts"].append(block.mlp.experts)
            if block.mlp.shared_experts is not None:
                parts["shared_experts"].append(block.mlp.shared_experts)
        else:
            parts["dense_mlp"].append(block.mlp)
    return parts


def _top_modules(model: Transformer) -> list[nn.Module]:
    """Every direct child of the model except the MTP modules."""
    return [m for name, m in model.named_children() if name != "mtp"]


def _numel(modules: list[nn.Module], seen: set[int]) -> int:
    """Parameters of `modules` not yet in `seen` (which is updated)."""
    n = 0
    for module in modules:
        for p in module.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
    return n


def _activated_routed(model: Transformer, config: ModelConfig) -> int:
    """Routed-expert parameters one token uses: top_k experts' worth in every MoE layer."""
    n = 0
    for block in model.layers:
        if isinstance(block.mlp, MoE):
            per_expert = sum(p.numel() for p in block.mlp.experts.parameters()) // config.n_routed_experts
            n += per_expert * config.num_experts_per_tok
    return n


def _persistent_buffers(model: Transformer) -> list[torch.Tensor]:
    """Buffers a checkpoint stores (non-persistent ones, such as RoPE frequencies, excluded)."""
    return [buf for module in model.modules() for name, buf in module.named_buffers(recurse=False)
            if buf is not None and name not in module._non_persistent_buffers_set]
