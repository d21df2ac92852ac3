"""`nanoseek export gguf MODEL --out FILE.gguf`: a model for llama.cpp, Ollama and LM Studio.
`nanoseek export consolidate RUN --out DIR`: a sharded training checkpoint as an HF model folder."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..cli import EXIT_OK, command, human_bytes

GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")  # nanoseek.export.GGUF_TYPES (not imported: --help stays fast)


def _gguf_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", type=Path, metavar="MODEL", help="a model folder (config.json, safetensors, tokenizer)")
    p.add_argument("--out", type=Path, required=True, metavar="FILE.gguf", help="the GGUF file to write")
    p.add_argument("--type", default="f32", choices=GGUF_TYPES,
                   help="weight type: f32 (default, exact), f16, bf16 or q8_0 (8-bit, ~3.7x smaller than f32); "
                        "norms and the router stay f32")


def cmd_export_gguf(args: argparse.Namespace) -> int:
    """Write the model as llama.cpp's deepseek2 architecture with its tokenizer and chat template."""
    from ..export import export_gguf
    summary = export_gguf(args.model, args.out, args.type, log=lambda m: print(m, file=sys.stderr))
    for note in summary.notes:
        print(f"note: {note}", file=sys.stderr)
    mtp = f", {summary.mtp_layers} MTP block(s)" if summary.mtp_layers else ""
    print(f"{summary.path}: {summary.tensors} tensors, {summary.type}, {human_bytes(summary.bytes)}{mtp}, "
          f"pre-tokenizer {summary.pre_tokenizer}")
    print(f"run it:  llama-cli -m {summary.path} --jinja -cnv")
    return EXIT_OK


CONSOLIDATE_DTYPES = ("fp32", "bf16", "fp16")


def _consolidate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("source", type=Path, metavar="RUN",
                   help="a run folder (its newest checkpoint), a checkpoint folder (step-N) or its sharded/ folder")
    p.add_argument("--out", type=Path, required=True, metavar="DIR", help="the HF model folder to write")
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest safetensors file, e.g. 5GB (default) or 500MiB: about what memory holds at once")
    p.add_argument("--dtype", default="fp32", choices=CONSOLIDATE_DTYPES,
                   help="weight type (default fp32, as trained); the router stays fp32")


def cmd_export_consolidate(args: argparse.Namespace) -> int:
    """Stream the shards every rank wrote into safetensors files, one output shard at a time."""
    import torch

    from ..checkpoint import consolidate, resolve_sharded_dir
    dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    source = resolve_sharded_dir(args.source)
    summary = consolidate(source, args.out, max_shard_size=args.max_shard_size, dtype=dtype)
    print(f"{summary.path}: {summary.tensors} tensors in {summary.files} file(s), {human_bytes(summary.bytes)} "
          f"(largest file {human_bytes(summary.largest_shard)}), from {source}")
    return EXIT_OK


FORMATS = {"gguf": ("write a GGUF file (llama.cpp's deepseek2) for llama.cpp, Ollama and LM Studio",
                    _gguf_arguments, cmd_export_gguf),
           "consolidate": ("write a sharded training checkpoint (torchrun) as an HF model folder, shard by shard",
                           _consolidate_arguments, cmd_export_consolidate)}


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="export_format", metavar="<format>", required=True)
    for name, (help, add_arguments, run) in FORMATS.items():
        p = sub.add_parser(name, help=help, description=help)
        add_arguments(p)
        p.set_defaults(action=run)


@command("export", "export a model to other runtimes (GGUF for llama.cpp, Ollama and LM Studio), or a sharded "
                   "checkpoint to an HF folder", _export_arguments)
def cmd_export(args: argparse.Namespace) -> int:
    return args.action(args)
