"""`nanoseek params`: parameter counts, KV-cache bytes and per-GPU training memory of any config.

The model is built on the meta device, so even DeepSeek-V3's 671B parameters take no memory.
"""

from __future__ import annotations

import argparse
import json

from ..cli import EXIT_OK, add_model_source, command, human, human_bytes, load_config
from ..errors import NanoseekError
from ..params import DTYPE_BYTES, PRECISIONS, count_parameters, kv_cache_size, training_memory


def _params_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_source(parser)
    parser.add_argument("--dtype", default="bf16", choices=sorted(DTYPE_BYTES), metavar="DTYPE",
                        help="storage dtype of the KV cache: bf16 (default), fp16, fp32, fp8 or a torch name")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    train = parser.add_argument_group("training memory per GPU under FSDP2 + expert parallelism "
                                      "(printed when --world-size is given)")
    train.add_argument("--world-size", type=int, metavar="N", help="GPUs in the job (FSDP shards over all)")
    train.add_argument("--ep", type=int, default=1, metavar="N",
                       help="expert-parallel degree: GPUs a layer's routed experts are split over (default 1)")
    train.add_argument("--tokens-per-gpu", type=int, default=4096, metavar="N",
                       help="tokens in one GPU's micro-batch, for the activations (default 4096)")
    train.add_argument("--precision", default="fp32", choices=sorted(PRECISIONS),
                       help="fp32 (what nanoseek train runs, default) or bf16 compute with fp32 master weights, "
                            "gradients and Adam states")
    train.add_argument("--recompute", action="store_true",
                       help="activation checkpointing per block (keeps each block's input only)")


@command("params", "count parameters (total, activated, MTP, on disk), KV-cache bytes per token and "
         "per-GPU training memory", _params_arguments)
def cmd_params(args: argparse.Namespace) -> int:
    """Print parameter counts and KV-cache sizes for a config; the model is built on meta (no memory)."""
    config = load_config(args)
    counts = count_parameters(config)
    cache = kv_cache_size(config, args.dtype)
    memory = None
    if args.world_size is not None:
        memory = training_memory(config, args.world_size, args.ep, tokens_per_gpu=args.tokens_per_gpu,
                                 precision=args.precision, recompute=args.recompute)
    elif args.ep != 1:
        raise NanoseekError("--ep needs --world-size (the number of GPUs)")
    if args.json:
        data = _params_json(counts, cache, args.dtype)
        if memory is not None:
            data["training_memory"] = memory.as_dict()
        print(json.dumps(data, indent=2))
    else:
        name = args.preset or str(args.config)
        lines = _params_table(name, config, counts, cache, args.dtype)
        if memory is not None:
            lines += [""] + _memory_table(config, memory)
        print("\n".join(lines))
    return EXIT_OK


def _memory_table(config, m) -> list[str]:
    """Per-GPU training memory: sharded states, FSDP's transient gathers, activations."""
    w, g, o, c = PRECISIONS[m.precision]
    E = config.n_routed_experts
    layout = (f"EP {m.ep}: {E // m.ep} routed experts per GPU per MoE layer, each sharded over "
              f"{m.world_size // m.ep} GPU(s)" if m.ep > 1 else "no EP: every GPU all-gathers all "
              f"{E} experts of a layer")
    row = "  {:<58} {:>12}"
    lines = [f"Training memory per GPU: FSDP2 over {m.world_size:,} GPUs, {layout}",
             f"  {human(m.params)} trained parameters ({human(m.routed_params)} in routed experts), "
             f"{m.precision}: {w}+{g}+{o} bytes/param sharded, compute copy {c} bytes/param",
             row.format(f"weights ({w} B/param, 1/{m.world_size:,} of each)", human_bytes(m.weights)),
             row.format(f"gradients ({g} B/param)", human_bytes(m.gradients)),
             row.format(f"Adam m + v ({o} B/param)", human_bytes(m.optimizer)),
             row.format("sharded states", human_bytes(m.sharded)),
             row.format("all-gathered by FSDP (transient)", human_bytes(m.gathered)),
             f"    the root unit ({human(m.root_unit_params)}) + 2 x the largest unit, {m.largest_unit} "
             f"({human(m.largest_unit_params)}), + one unit's unsharded gradient",
             row.format(f"activations ({m.tokens_per_gpu:,} tokens, "
                        f"{'recompute per block' if m.recompute else 'no recompute'}; estimate)",
                        human_bytes(m.activations)),
             row.format("total (plan 10-20% more: allocator, kernel workspaces)", human_bytes(m.total))]
    return lines


COMPONENT_LABELS = {
    "embedding": "embedding", "head": "output head", "attention": "attention (MLA)", "dense_mlp": "dense MLPs",
    "routed_experts": "routed experts", "shared_experts": "shared experts", "gates": "gates",
    "norms": "norms", "other": "other",
}


def _params_table(name, config, counts, cache, dtype: str) -> list[str]:
    """The human-readable report: header, totals, per-component rows, KV cache."""
    moe_layers = sum(config.is_moe_layer(i) for i in range(config.num_hidden_layers))
    lines = [f"{name} ({config.model_type}): {config.num_hidden_layers} layers "
             f"({config.num_hidden_layers - moe_layers} dense, {moe_layers} MoE), "
             f"{config.n_routed_experts} routed experts (top-{config.num_experts_per_tok}), "
             f"{config.n_shared_experts} shared, {config.num_nextn_predict_layers} MTP", ""]
    row = "  {:<36} {:>9} {:>20} {:>8}"

    def share(n: int) -> str:  # of the main model
        return f"{100 * n / counts.total:.2f}%"

    lines.append(row.format("parameters", "count", "exact", "% total"))
    for label, n in (("total (main model, MTP excluded)", counts.total),
                     ("activated per token (no embed table)", counts.activated),
                     ("activated incl. embedding table", counts.activated_with_embedding),
                     ("MTP modules (unique)", counts.mtp),
                     ("on disk (+ MTP embed/head copies)", counts.on_disk)):
        lines.append(row.format(label, human(n), f"{n:,}", share(n)))
    lines += ["", row.format("main model by component", "count", "exact", "% total")]
    for key, n in counts.components.items():
        if key == "mtp" or (key == "other" and n == 0):
            continue
        lines.append(row.format(COMPONENT_LABELS[key], human(n), f"{n:,}", share(n)))
    lines += [""] + _cache_table(config, cache, dtype)
    return lines


def _cache_table(config, cache, dtype: str) -> list[str]:
    """KV-cache bytes per token (all layers), and per sequence at the model's maximum context."""
    ctx = config.max_position_embeddings
    row = "  {:<44} {:>12} {:>11} {:>14}"
    lines = [f"KV cache ({dtype}, {cache.layers} layers)",
             row.format("", "bytes/token", "", f"at {ctx:,} tok")]
    latent = f"MLA latent ({config.kv_lora_rank} + {config.qk_rope_head_dim} values/layer)"
    per_head = (f"per-head K/V ({config.num_attention_heads} x ({config.qk_head_dim} + "
                f"{config.v_head_dim}) values/layer)")
    for label, n in ((latent, cache.latent_bytes), (per_head, cache.per_head_bytes)):
        lines.append(row.format(label, f"{n:,}", human_bytes(n), human_bytes(n * ctx)))
    lines.append(f"  latent cache is {cache.ratio:.1f}x smaller")
    return lines


def _params_json(counts, cache, dtype: str) -> dict:
    return {**counts.as_dict(), "kv_cache": {
        "dtype": dtype, "layers": cache.layers, "latent_values_per_layer": cache.latent_values,
        "per_head_values_per_layer": cache.per_head_values, "latent_bytes_per_token": cache.latent_bytes,
        "per_head_bytes_per_token": cache.per_head_bytes, "ratio": cache.ratio}}
