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
from .errors import ConfigError
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


# ---- training memory per GPU under FSDP2 + expert parallelism -----------------------------------
# Bytes per parameter: (sharded weights, sharded gradients, sharded Adam m + v, unsharded compute copy)
PRECISIONS = {
    "fp32": (4, 4, 8, 4),  # what `nanoseek train` runs: fp32 everywhere
    "bf16": (4, 4, 8, 2),  # FSDP2 MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32): fp32 master
}
FSDP_UNITS_IN_FLIGHT = 2  # block-level units gathered at once: the one computing and the one prefetched
ROOT_UNIT = "root (embedding, head, norms, MTP projections)"


@dataclass(frozen=True)
class TrainingMemory:
    """Estimated bytes per GPU for training `config` on `world_size` GPUs with FSDP2 over all of them
    and expert parallelism of degree `ep` (the layout of nanoseek.train.distributed.parallelize).

    Sharded (persistent): every parameter, its gradient and its Adam m and v are split over the W
    GPUs. With EP a GPU owns E/ep experts per MoE layer, sharded over the W/ep GPUs owning the same
    experts: still 1/W of the routed-expert parameters, so EP does not change this part.
    Transient: FSDP all-gathers a unit (a block's attention + gate + shared experts; a layer's routed
    experts, E/ep of them with EP, all E without) for its forward and backward, `FSDP_UNITS_IN_FLIGHT`
    at a time, while the root unit (embedding, head, MTP projections) stays gathered around them; and
    it holds a unit's unsharded gradient until its reduce-scatter. This is where EP matters.
    Activations: the large tensors saved for backward, for `tokens_per_gpu` tokens (see
    `activation_bytes_per_token`), an estimate that ignores allocator fragmentation and kernel
    workspaces: plan for 10-20% more.
    """

    world_size: int
    ep: int
    precision: str
    tokens_per_gpu: int
    recompute: bool
    params: int  # trained parameters: main model + MTP modules
    routed_params: int  # of which routed experts
    root_unit_params: int  # embedding, head, final norm, MTP projections: gathered for the whole forward
    largest_unit: str  # the largest other unit (a block without its experts, or a layer's experts)
    largest_unit_params: int
    weights: int  # bytes per GPU
    gradients: int
    optimizer: int
    gathered: int  # transient all-gathered weights + one unit's unsharded gradient
    activations: int

    @property
    def sharded(self) -> int:
        return self.weights + self.gradients + self.optimizer

    @property
    def total(self) -> int:
        return self.sharded + self.gathered + self.activations

    def as_dict(self) -> dict:
        return {**asdict(self), "sharded": self.sharded, "total": self.total}


def training_memory(config: ModelConfig, world_size: int, ep: int = 1, *, tokens_per_gpu: int = 4096,
                    precision: str = "fp32", recompute: bool = False) -> TrainingMemory:
    """Per-GPU training memory under FSDP2 + EP (see TrainingMemory for what each figure holds)."""
    if world_size < 1:
        raise ConfigError(f"world size must be at least 1 (got {world_size})")
    if ep < 1 or world_size % ep:
        raise ConfigError(f"expert-parallel degree {ep} must divide the world size {world_size}")
    if ep > 1 and config.n_routed_experts % ep:
        raise ConfigError(f"expert-parallel degree {ep} must divide n_routed_experts {config.n_routed_experts}")
    if precision not in PRECISIONS:
        raise ConfigError(f"unknown precision {precision!r}; choose one of {', '.join(PRECISIONS)}")
    if tokens_per_gpu < 1:
        raise ConfigError(f"tokens per GPU must be at least 1 (got {tokens_per_gpu})")
    w_bytes, g_bytes, o_bytes, c_bytes = PRECISIONS[precision]
    model = meta_model(config)
    params = sum(p.numel() for p in model.parameters())
    routed = sum(p.numel() for m in model.modules() if isinstance(m, MoE) for p in m.experts.parameters())
    units = _fsdp_units(model, ep)
    root = units.pop(ROOT_UNIT)
    name, largest = max(units.items(), key=lambda kv: kv[1])
    per_gpu = params / world_size
    gathered = (root + FSDP_UNITS_IN_FLIGHT * largest) * c_bytes + max(root, largest) * g_bytes
    return TrainingMemory(
        world_size=world_size, ep=ep, precision=precision, tokens_per_gpu=tokens_per_gpu, recompute=recompute,
        params=params, routed_params=routed, root_unit_params=root, largest_unit=name, largest_unit_params=largest,
        weights=round(per_gpu * w_bytes), gradients=round(per_gpu * g_bytes), optimizer=round(per_gpu * o_bytes),
        gathered=gathered,
        activations=tokens_per_gpu * activation_bytes_per_token(config, c_bytes, recompute=recompute))


def _fsdp_units(model: Transformer, ep: int) -> dict[str, int]:
    """Parameters each FSDP unit all-gathers (as parallelize wraps the model), by a readable name."""
    units: dict[str, int] = {}
    blocks = [(f"layer {i}", b) for i, b in enumerate(model.layers)] + \
             [(f"MTP block {k}", m.block) for k, m in enumerate(model.mtp)]
    in_blocks = 0
    for name, block in blocks:
        n = sum(p.numel() for p in block.parameters())
        in_blocks += n
        if ep > 1 and isinstance(block.mlp, MoE):
            experts = sum(p.numel() for p in block.mlp.experts.parameters())
            units[f"{name} routed experts (1/{ep})"] = experts // ep
            n -= experts
        units[name] = n
    units[ROOT_UNIT] = sum(p.numel() for p in model.parameters()) - in_blocks
    return units


def activation_bytes_per_token(config: ModelConfig, compute_bytes: int = 2, *, recompute: bool = False) -> int:
    """Bytes saved for backward per token: every layer, the logits (+ fp32 log-softmax) and the MTP depths.

    Per layer, the tensors a backward reads: block input and normed input; MLA's q latent and its norm,
    q, the kv latent (+ rope key) and its norm, kv_b's output, q/k after RoPE, v and the attention
    output; the FFN's input and normed input; a dense MLP's gate, up and product (3 I); a MoE layer's
    fp32 router scores (E), per routed slot (top_k) the dispatched input, gate, up, product and output,
    and the shared experts' 3 I. With `recompute` (activation checkpointing per block) only each
    block's input is kept, plus one block recomputed at a time.
    """
    c = config
    H, D = c.num_attention_heads, c.hidden_size
    attn = 2 * D + (2 * c.q_lora_rank if c.q_lora_rank else 0) + H * c.qk_head_dim
    attn += (c.kv_lora_rank + c.qk_rope_head_dim) + c.kv_lora_rank + H * (c.qk_nope_head_dim + c.v_head_dim)
    attn += 2 * H * c.qk_head_dim + H * c.v_head_dim + H * c.v_head_dim
    dense = (2 * D + 3 * c.intermediate_size) * compute_bytes
    I = c.moe_intermediate_size
    moe = (2 * D + c.num_experts_per_tok * (2 * D + 3 * I) + c.n_shared_experts * 3 * I) * compute_bytes
    moe += 4 * c.n_routed_experts
    layers = [attn * compute_bytes + (moe if c.is_moe_layer(i) else dense) for i in range(c.num_hidden_layers)]
    n_mtp = c.num_nextn_predict_layers
    mtp_layer = (attn + 4 * D) * compute_bytes + moe  # + the eh_proj input [emb; h] and its norms
    logits = (1 + n_mtp) * c.vocab_size * (compute_bytes + 4)
    if not recompute:
        return sum(layers) + n_mtp * mtp_layer + logits
    kept = (len(layers) + n_mtp) * D * compute_bytes
    return kept + max(layers + [mtp_layer] * n_mtp) + logits
