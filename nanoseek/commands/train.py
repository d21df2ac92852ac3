"""`nanoseek train` (pretrain or SFT from a recipe) and `nanoseek cost` (what training a config costs)."""

from __future__ import annotations

import argparse
import json

from ..cli import (EXIT_OK, add_model_source, add_recipe_arguments, command, how_run_ended, load_config,
                   recipe_overrides)
from ..cost import DEFAULT_MFU, GPUS, PUBLISHED, estimate, format_cost_table
from ..train import load_recipe, train
from ..train.recipe import recipe_fields


# ---- nanoseek train ------------------------------------------------------------------------------
def _train_arguments(parser: argparse.ArgumentParser) -> None:
    add_recipe_arguments(parser, recipe_fields())


@command("train", "pretrain or SFT a model from a recipe (checkpoints, resume, metrics, cost.json)",
         _train_arguments)
def cmd_train(args: argparse.Namespace) -> int:
    recipe = load_recipe(args.recipe, recipe_overrides(args))
    summary = train(recipe)
    print(f"{how_run_ended(summary)} step {summary['step']} ({summary['tokens']:,} tokens, {summary['wall_seconds']:.0f}s)")
    print(f"model: {summary['model']}\ncost:  {summary['cost']}")
    return EXIT_OK


# ---- nanoseek cost -------------------------------------------------------------------------------
def _cost_arguments(parser: argparse.ArgumentParser) -> None:
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
    est = estimate(load_config(args), args.tokens, args.gpu, args.mfu, args.usd_per_hour, args.seq_len,
                   n_gpus=args.gpus, label=args.preset or str(args.config))
    if args.json:
        print(json.dumps(est.as_dict(), indent=2))
    else:
        print(format_cost_table(est, published=PUBLISHED.get(args.preset)))
    return EXIT_OK
