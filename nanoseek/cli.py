"""The `nanoseek` command: a registry of subcommands, the argument helpers they share, and `main`.

Each subcommand is one function registered with `@command(name, help, add_arguments)` in a module of
nanoseek/commands/ (one per area); COMMAND_MODULES lists those modules and `main` imports every one of
them, so adding a command is one decorated function (and, for a new module, one line here). A module
that fails to import is an error, never a silently missing command.
Errors the user can fix (NanoseekError, missing or unreadable files, bad arguments) print one line,
`error: <message>`, on stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from . import __version__
from .config import PRESETS, ModelConfig
from .errors import NanoseekError

EXIT_OK, EXIT_USAGE = 0, 2

# The modules that register commands, in the order `nanoseek --help` lists their commands.
COMMAND_MODULES = (
    "nanoseek.commands.model",
    "nanoseek.commands.data",
    "nanoseek.commands.train",
    "nanoseek.commands.infer",
    "nanoseek.commands.rl",
    "nanoseek.commands.report",
    "nanoseek.commands.export",
)


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


def load_commands(modules: tuple[str, ...] | None = None) -> dict[str, Command]:
    """Import every command module (default COMMAND_MODULES; each registers its commands on import)
    and return the registry. An import error propagates: a renamed or broken module must not
    silently drop its commands."""
    for name in COMMAND_MODULES if modules is None else modules:
        importlib.import_module(name)
    return COMMANDS


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


def add_actions(parser: argparse.ArgumentParser, dest: str, actions) -> None:
    """Sub-actions of a command (`data prepare`, `data shakespeare`): (name, help, add_arguments, run);
    the chosen one's run is `args.action`."""
    sub = parser.add_subparsers(dest=dest, metavar="<action>", required=True)
    for name, help, add_arguments, run in actions:
        p = sub.add_parser(name, help=help, description=help)
        add_arguments(p)
        p.set_defaults(action=run)


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


def human(n: float, unit: str = "") -> str:
    """1234567 -> '1.23M': K, M, B, T by powers of 1000."""
    for factor, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= factor:
            return f"{n / factor:.2f}{suffix}{unit}"
    return f"{n:g}{unit}" if isinstance(n, float) else f"{n}{unit}"


def how_run_ended(summary: dict) -> str:
    """'finished at', 'stopped by a signal at' or 'reached max_seconds at' for a run loop's summary."""
    return {"signal": "stopped by a signal at", "max_seconds": "reached max_seconds at"}.get(
        summary.get("stopped_by"), "finished at")


def human_bytes(n: float) -> str:
    """Bytes in binary units: 70272 -> '68.6 KiB'."""
    for factor, suffix in ((2 ** 40, "TiB"), (2 ** 30, "GiB"), (2 ** 20, "MiB"), (2 ** 10, "KiB")):
        if n >= factor:
            return f"{n / factor:.1f} {suffix}"
    return f"{n:.0f} B"


# ---- entry point ---------------------------------------------------------------------------------
class Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line too (exit code 2), like every other error."""

    def error(self, message: str):
        self.exit(EXIT_USAGE, f"error: {self.prog}: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="nanoseek", description="DeepSeek-style MoE models: "
                                     "define, train, teach to reason, serve and evaluate.")
    parser.add_argument("--version", action="version", version=f"nanoseek {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="<command>")
    for cmd in load_commands().values():
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
