"""`nanoseek export gguf MODEL --out FILE.gguf`: a model for llama.cpp, Ollama and LM Studio."""

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


FORMATS = {"gguf": ("write a GGUF file (llama.cpp's deepseek2) for llama.cpp, Ollama and LM Studio",
                     _gguf_arguments, cmd_export_gguf)}


def _export_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="export_format", metavar="<format>", required=True)
    for name, (help, add_arguments, run) in FORMATS.items():
        p = sub.add_parser(name, help=help, description=help)
        add_arguments(p)
        p.set_defaults(action=run)


@command("export", "export a model to other runtimes: GGUF for llama.cpp, Ollama and LM Studio", _export_arguments)
def cmd_export(args: argparse.Namespace) -> int:
    return args.action(args)
