"""`nanoseek demo` (the main job) and `nanoseek report RUN`."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli import EXIT_OK, command
from ..demo import DEMO_SEEDS, DemoSettings, run_demo
from ..errors import ConfigError, DataError
from ..eval.report import render


def _demo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="run folder (default runs/demo)")
    p.add_argument("--quick", action="store_true", help="a one-minute version (what the tests run)")
    p.add_argument("--task", default=None, help="reasoning task (default addition3)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--seeds", type=int, default=None, metavar="N",
                   help="seeds seed .. seed+N-1, run in parallel one-thread processes (RUN/seeds/); the report "
                        f"card's verdicts pair the models per seed (default {DEMO_SEEDS}; with --quick 1)")
    p.add_argument("--no-progress", action="store_true")


def demo_seeds(args: argparse.Namespace) -> int:
    """--seeds, defaulting to DEMO_SEEDS for the full demo (its verdicts need seeds) and to 1 for --quick."""
    seeds = args.seeds if args.seeds is not None else (1 if args.quick else DEMO_SEEDS)
    if seeds < 1:
        raise ConfigError(f"invalid --seeds: must be >= 1 (got {seeds})")
    return seeds


@command("demo", "train a tiny MoE reasoner end to end (SFT, GRPO, evaluation), write a report card",
         _demo_arguments)
def cmd_demo(args: argparse.Namespace) -> int:
    kw = {"seed": args.seed}
    if args.task:
        kw["task"] = args.task
    settings = DemoSettings.quick(**kw) if args.quick else DemoSettings(**kw)
    seeds = demo_seeds(args)
    results = run_demo(args.out, settings, progress=not args.no_progress, seeds=seeds)
    acc = results["accuracy"]
    print(f"\nnanoseek demo finished in {results['wall_seconds'] / 60:.1f} min ({settings.task}).")
    for label, r in acc.items():
        print(f"  {label:<28} {100 * r['accuracy']:5.1f}%  [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"
              f"  on {r['n']} held-out problems")
    for v in results.get("verdicts", []):
        print(f"  {v['verdict']:<13} {v['claim']}")
    print(f"\nreport card:  {results['report']}")
    print(f"model:        {args.out / 'model'}")
    print(f"chat with it: nanoseek chat {args.out / 'model'}")
    print(f"serve it:     nanoseek serve {args.out / 'model'} --port 8000")
    return EXIT_OK


def _report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("folder", metavar="RUN", type=Path, help="a run folder written by `nanoseek demo`")


@command("report", "(re)write the report card of a run folder", _report_arguments)
def cmd_report(args: argparse.Namespace) -> int:
    if not (args.folder / "results.json").exists():
        raise DataError(f"{args.folder}: no results.json (run `nanoseek demo --out {args.folder}` first)")
    print(render(args.folder))
    return EXIT_OK
