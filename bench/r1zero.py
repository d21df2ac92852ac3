"""The R1-Zero result at CPU scale: cold-start SFT on a few solver traces, then GRPO, against an
equal-compute control that keeps doing SFT. Prints a table and writes JSON, markdown and curves.

For each seed:
  1. write `--cold-start` solver traces of the task (train split; 200 by default), a byte-level
     tokenizer and token shards (nanoseek.tasks.prepare_cold_start);
  2. SFT a tiny MoE from scratch on them (recipes/r1zero-sft.toml), evaluating greedy accuracy on a dev
     set (train-split problems) every `--sft-chunk` steps, until it reaches `--modest` (0.3): "before";
  3. for each budget in `--budgets` (CPU-seconds after the cold start; 150 and 300 by default):
     GRPO from that model (recipes/r1zero-grpo.toml) continued until it has used the budget, and the
     control, the same SFT run resumed (same traces, optimizer state and constant learning rate),
     continued until it has used at least as many CPU-seconds as GRPO did;
  4. evaluate every model on `--eval-n` held-out (test split) problems: greedy accuracy and pass@1
     over `--eval-k` samples at T=0.6 / top_p=0.95, with 95% intervals.
Compute is counted in CPU-seconds of this process (time.process_time), which other jobs on a shared
machine disturb far less than wall time; wall time is reported too. Curves are measured on the dev
set; the test split is used only for the final numbers. Hyperparameters were chosen on the dev set.

    .venv/bin/python bench/r1zero.py --seeds 0 & .venv/bin/python bench/r1zero.py --seeds 1; wait
    .venv/bin/python bench/r1zero.py --report-only        # the table over every seed*.json in --out
    .venv/bin/python bench/r1zero.py --quick              # a smoke run of the pipeline (a few minutes)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nanoseek import load_model  # noqa: E402
from nanoseek.eval import fmt_metric  # noqa: E402
from nanoseek.eval.report import paired_interval  # noqa: E402
from nanoseek.eval.tasks import evaluate_task  # noqa: E402
from nanoseek.tasks import get_task, prepare_cold_start  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402
from nanoseek.train import load_recipe, train  # noqa: E402
from nanoseek.runio import pyplot, read_metrics, save_figure  # noqa: E402
from nanoseek.train.grpo import grpo, load_grpo_recipe  # noqa: E402

DEV_SEED = 1234  # dev problems: train split, never the test split


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="addition3")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--cold-start", type=int, default=200, help="solver traces for SFT (default 200)")
    p.add_argument("--sft-recipe", type=Path, default=REPO / "recipes" / "r1zero-sft.toml")
    p.add_argument("--grpo-recipe", type=Path, default=REPO / "recipes" / "r1zero-grpo.toml")
    p.add_argument("--sft-steps", type=int, help="exactly this many cold-start SFT steps (default: until --modest)")
    p.add_argument("--modest", type=float, default=0.3, help="stop SFT once dev greedy accuracy reaches this")
    p.add_argument("--sft-chunk", type=int, default=100, help="SFT steps between dev evaluations")
    p.add_argument("--sft-max-steps", type=int, default=2000)
    p.add_argument("--budgets", type=float, nargs="+", default=[150.0, 300.0],
                   help="CPU-seconds for each arm after SFT; both arms are evaluated at each (default 150 300)")
    p.add_argument("--annealed-control", action=argparse.BooleanOptionalAction, default=False,
                   help="also run the SFT control with its learning rate annealed (default off; not yet "
                        "part of the documented result)")
    p.add_argument("--anneal-to", type=float, default=0.1, help="final LR of the annealed control, x the SFT LR")
    p.add_argument("--control-chunks", type=int, default=4, help="control checkpoints evaluated for the curve")
    p.add_argument("--eval-n", type=int, default=1000)
    p.add_argument("--eval-k", type=int, default=4)
    p.add_argument("--dev-n", type=int, default=200)
    p.add_argument("--threads", type=int, default=1, help="torch threads (1 is robust on a shared CPU)")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "r1zero-bench")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "r1zero")
    p.add_argument("--report-only", action="store_true", help="rebuild the table and plots from --out's JSON")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline, not the claim")
    args = p.parse_args(argv)
    if args.quick:
        args.cold_start, args.sft_steps, args.sft_chunk, args.budgets = 200, 20, 10, [8.0, 16.0]
        args.eval_n, args.eval_k, args.dev_n, args.seeds, args.control_chunks = 50, 2, 20, args.seeds[:1], 2
        args.work = args.work.with_name(args.work.name + "-quick")
        args.out = args.out.with_name(args.out.name + "-quick")
    return args


def dev_accuracy(model_dir: Path, tok: Tokenizer, task, dev) -> float:
    res = evaluate_task(load_model(model_dir), tok, task, problems=dev, k=0)
    return res["greedy_accuracy"]["value"]


def run_seed(args, seed: int) -> dict:
    task = get_task(args.task)
    root = args.work / f"seed{seed}"
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    paths = prepare_cold_start(task, root, args.cold_start, seed=seed)
    tok_dir, data = paths["tokenizer"], paths["data"]
    tok = Tokenizer.load(tok_dir)
    dev = task.generate(args.dev_n, seed=DEV_SEED, split="train")

    # 1. cold-start SFT, in chunks, until the dev accuracy is modest (or --sft-steps exactly)
    sft_fields = {"out": str(root / "sft"), "data": str(data), "tokenizer": str(tok_dir), "seed": seed,
                  "progress": False}
    base = load_recipe(args.sft_recipe, sft_fields)
    cap = args.sft_steps or args.sft_max_steps
    chunk = min(args.sft_chunk, cap)
    steps, sft_cpu, sft_wall, sft_curve = 0, 0.0, 0.0, []
    while steps < cap:
        steps = min(steps + chunk, cap)
        recipe = dataclasses.replace(base, max_steps=steps, save_every=chunk, resume=steps > chunk)
        c0, w0 = time.process_time(), time.perf_counter()
        train(recipe)
        sft_cpu, sft_wall = sft_cpu + time.process_time() - c0, sft_wall + time.perf_counter() - w0
        acc = dev_accuracy(root / "sft" / "model", tok, task, dev)
        sft_curve.append((steps, sft_cpu, acc))
        print(f"[seed {seed}] SFT step {steps}: {sft_cpu:.0f} CPU-s, dev acc {acc:.3f}", flush=True)
        if not args.sft_steps and acc >= args.modest:
            break
    per_step = sft_cpu / steps

    # 2-3. for each budget in turn: GRPO continued to that many CPU-seconds, then the control (the SFT run
    # resumed) continued until it has used as many (its CPU-s per step measured on its own chunks), and,
    # with --annealed-control, the SFT run resumed from the cold start with its learning rate decayed
    # linearly to --anneal-to x over the same compute (GRPO runs at a 10x lower learning rate than SFT:
    # this control tells the RL signal from the effect of annealing)
    grpo_fields = {"init_from": str(root / "sft" / "model"), "out": str(root / "grpo"), "task": task.name,
                   "seed": seed, "eval_split": "train", "eval_n": args.dev_n, "progress": False,
                   "max_steps": 100_000}
    control = root / "control"
    shutil.copytree(root / "sft", control)
    ctl_steps, ctl_cpu, ctl_wall, grpo_wall = steps, 0.0, 0.0, 0.0
    models = {"before": root / "sft" / "model"}
    legs, annealed_points, rate = [], [], per_step
    for i, budget in enumerate(sorted(args.budgets)):
        recipe = load_grpo_recipe(args.grpo_recipe, {**grpo_fields, "max_seconds": budget, "resume": i > 0})
        if args.quick:
            recipe.eval_every = 2
        w0 = time.perf_counter()
        g = grpo(recipe)
        grpo_wall += time.perf_counter() - w0
        models[f"grpo@{budget:g}"] = snapshot(root / "grpo" / "model", root / f"grpo-{budget:g}")
        while ctl_cpu < 0.97 * g["cpu_seconds"]:
            more = max(5, round((g["cpu_seconds"] - ctl_cpu) / rate))
            ctl_steps += more
            recipe = dataclasses.replace(base, out=str(control), max_steps=ctl_steps, resume=True,
                                         save_every=max(1, more // args.control_chunks), keep_last=100)
            c0, w0 = time.process_time(), time.perf_counter()
            train(recipe)
            ctl_cpu, ctl_wall = ctl_cpu + time.process_time() - c0, ctl_wall + time.perf_counter() - w0
            rate = ctl_cpu / (ctl_steps - steps)  # the control's own CPU-s per step, overheads included
        models[f"control@{budget:g}"] = snapshot(control / "model", root / f"control-{budget:g}")
        leg = {"budget": budget, "grpo_steps": g["step"], "grpo_cpu_seconds": g["cpu_seconds"],
               "grpo_wall_seconds": grpo_wall, "control_steps": ctl_steps - steps, "control_cpu_seconds": ctl_cpu,
               "control_wall_seconds": ctl_wall}
        if args.annealed_control:
            extra = max(1, round(g["cpu_seconds"] / rate))
            folder = root / f"annealed-{budget:g}"
            shutil.copytree(root / "sft", folder)
            decay = extra / (steps + extra - base.warmup_steps)  # WSD: the decay starts right at the resume
            recipe = dataclasses.replace(base, out=str(folder), max_steps=steps + extra, resume=True, schedule="wsd",
                                         wsd_decay_fraction=decay, min_lr_ratio=args.anneal_to, save_every=extra,
                                         keep_last=1)
            c0 = time.process_time()
            train(recipe)
            leg.update(annealed_steps=extra, annealed_cpu_seconds=time.process_time() - c0)
            models[f"annealed@{budget:g}"] = folder / "model"
            annealed_points.append((leg["annealed_cpu_seconds"], dev_accuracy(folder / "model", tok, task, dev)))
        legs.append(leg)
        print(f"[seed {seed}] budget {budget:g}: " + ", ".join(f"{k} {v:.0f}" for k, v in leg.items()
                                                              if "steps" in k or "cpu" in k), flush=True)

    # curves on the dev set, against CPU-seconds after the cold start
    grpo_curve = [(r.get("cpu_seconds", 0.0), r["eval_accuracy"]) for r in read_metrics(root / "grpo")
                  if "eval_accuracy" in r]
    ctl_curve = [(0.0, sft_curve[-1][2])]
    for ckpt in sorted((control / "checkpoints").glob("step-*")):
        extra = int(ckpt.name.split("-")[1]) - steps
        if extra > 0:
            ctl_curve.append((extra * ctl_cpu / (ctl_steps - steps), dev_accuracy(ckpt / "model", tok, task, dev)))

    # 4. held-out evaluation (test split)
    results = {}
    for name, folder in models.items():
        res = evaluate_task(load_model(folder), tok, task, n=args.eval_n, k=args.eval_k, seed=seed)
        results[name] = {k: v for k, v in res.items() if not k.startswith("per_problem")}
        print(f"[seed {seed}] {name:<12} greedy {fmt_metric(res['greedy_accuracy'])}  "
              f"pass@1 {fmt_metric(res['pass@1'])}", flush=True)
    return {"seed": seed, "sft_steps": steps, "sft_cpu_seconds": sft_cpu, "sft_wall_seconds": sft_wall,
            "sft_cpu_per_step": per_step, "sft_curve": sft_curve, "legs": legs, "grpo_curve": grpo_curve,
            "control_curve": ctl_curve, "annealed_points": annealed_points,
            "grpo_metrics": read_metrics(root / "grpo"), "results": results}


def snapshot(model_dir: Path, dest: Path) -> Path:
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(model_dir, dest)
    return dest


def table(runs: list[dict], k: int) -> str:
    lines = [f"| seed | model | CPU-s after SFT | greedy acc (95% CI) | pass@1, k={k}, T=0.6 (95% CI) |",
             "|---|---|---|---|---|"]
    for run in runs:
        r = run["results"]
        rows = [("before", f"after cold-start SFT ({run['sft_steps']} steps)", 0.0)]
        for leg in run["legs"]:
            b = f"{leg['budget']:g}"
            rows.append((f"grpo@{b}", f"+ GRPO ({leg['grpo_steps']} steps)", leg["grpo_cpu_seconds"]))
            rows.append((f"control@{b}", f"+ SFT control ({leg['control_steps']} steps)", leg["control_cpu_seconds"]))
            if "annealed_steps" in leg:
                rows.append((f"annealed@{b}", f"+ SFT control, LR annealed ({leg['annealed_steps']} steps)",
                             leg["annealed_cpu_seconds"]))
        for name, label, cpu in rows:
            lines.append(f"| {run['seed']} | {label} | {cpu:.0f} | {fmt_metric(r[name]['greedy_accuracy'])} | "
                         f"{fmt_metric(r[name]['pass@1'])} |")
    return "\n".join(lines)


def mean_row(runs: list[dict]) -> str:
    """Mean greedy test accuracy over seeds, per budget, and GRPO minus control paired by seed, with its
    95% t interval over the seeds (nanoseek.eval.report.paired_interval; none for one seed)."""
    def acc(name):
        return [100 * r["results"][name]["greedy_accuracy"]["value"] for r in runs]

    def mean(name):
        return sum(acc(name)) / len(runs)

    def diff(a, b):
        ci = paired_interval(acc(a), acc(b))
        iv = f" [{ci['low']:+.1f}, {ci['high']:+.1f}]" if ci["low"] is not None else ""
        per = " / ".join(f"{d:+.1f}" for d in ci["diffs"])
        return f"{ci['mean']:+.1f} points{iv}; per seed {per}"

    lines = [f"mean greedy test accuracy over {len(runs)} seed(s): after cold-start SFT {mean('before'):.1f}%"
             + (" (differences: mean, 95% t interval over the seeds paired by seed)" if len(runs) > 1 else "")]
    for leg in runs[0]["legs"]:
        b = f"{leg['budget']:g}"
        g, c = mean(f"grpo@{b}"), mean(f"control@{b}")
        line = (f"- {b} CPU-s: GRPO {g:.1f}%, SFT control {c:.1f}%; GRPO - control = {diff(f'grpo@{b}', f'control@{b}')}"
                f"; GRPO - before = {diff(f'grpo@{b}', 'before')}")
        if all(f"annealed@{b}" in r["results"] for r in runs):
            a = mean(f"annealed@{b}")
            line += f", annealed SFT control {a:.1f}% (GRPO - annealed = {g - a:+.1f} points)"
        lines.append(line)
    return "\n".join(lines)


def plot(runs: list[dict], out: Path) -> None:
    fig, axes = pyplot().subplots(1, 3, figsize=(15, 4))
    for run in runs:
        s = run["seed"]
        g = [(c, a) for c, a in run["grpo_curve"]]
        c = [(x, a) for x, a in run["control_curve"] if a is not None]
        if g:
            axes[0].plot(*zip(*g), "o-", label=f"GRPO seed {s}")
        if c:
            axes[0].plot(*zip(*c), "s--", label=f"SFT control seed {s}")
        if run.get("annealed_points"):
            axes[0].plot(*zip(*run["annealed_points"]), "D", ms=8, label=f"annealed SFT control seed {s}")
        rows = [m for m in run["grpo_metrics"] if "reward_mean" in m]
        axes[1].plot([m["step"] for m in rows], [m["reward_mean"] for m in rows], label=f"reward seed {s}")
        axes[1].plot([m["step"] for m in rows], [m.get("accuracy", 0) for m in rows], ":", label=f"accuracy seed {s}")
        axes[2].plot([m["step"] for m in rows], [m["completion_len"] for m in rows], label=f"seed {s}")
    axes[0].set(title="dev greedy accuracy after the cold start", xlabel="CPU-seconds after SFT")
    axes[1].set(title="GRPO reward (T=1 samples)", xlabel="GRPO step")
    axes[2].set(title="GRPO completion length (tokens)", xlabel="GRPO step")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    save_figure(fig, out / "curves.png")


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    for seed in ([] if args.report_only else args.seeds):  # one JSON per seed: seeds may run in parallel
        run = run_seed(args, seed)
        (args.out / f"seed{seed}.json").write_text(json.dumps({"settings": settings, **run}, indent=2))
    runs = [json.loads(f.read_text()) for f in sorted(args.out.glob("seed*.json"))]
    md = (f"R1-Zero at CPU scale: {args.task}, {args.cold_start} cold-start traces, budgets "
          f"{', '.join(f'{b:g}' for b in args.budgets)} CPU-s per arm, test n={args.eval_n}\n\n"
          f"{table(runs, args.eval_k)}\n\n{mean_row(runs)}\n")
    print("\n" + md)
    (args.out / "r1zero.md").write_text(md)
    (args.out / "r1zero.json").write_text(json.dumps({"runs": runs, "wall_seconds": time.perf_counter() - t0},
                                                     indent=2))
    plot(runs, args.out)
    for run in runs:  # the GRPO run's own curves, beside the table
        src = args.work / f"seed{run['seed']}" / "grpo" / "grpo.png"
        if src.exists():
            shutil.copy(src, args.out / f"grpo-seed{run['seed']}.png")
    print(f"wrote {args.out / 'r1zero.md'}, r1zero.json, curves.png")


if __name__ == "__main__":
    main()
