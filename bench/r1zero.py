"""The R1-Zero result at CPU scale: cold-start SFT on solver traces, then GRPO, against an equal-compute
control that keeps doing SFT. Prints a table and writes JSON, markdown and curves.

For each seed:
  1. write `--cold-start` solver traces of the task (train split), a byte-level tokenizer, token shards;
  2. SFT a tiny MoE from scratch on them for `--sft-steps` steps (recipes/r1zero-sft.toml): "before";
  3. GRPO from that model for `--budget` CPU-seconds (recipes/r1zero-grpo.toml): "GRPO";
  4. control: the same SFT run resumed (same data, optimizer state and schedule) for as many steps as
     fit in the CPU-seconds GRPO actually used, at the SFT phase's measured CPU-seconds per step;
  5. evaluate all three on `--eval-n` held-out (test split) problems: greedy accuracy and pass@1 over
     `--eval-k` samples at T=0.6 / top_p=0.95, with 95% intervals.
Compute is counted in CPU-seconds of this process (time.process_time), which other jobs on a shared
machine disturb far less than wall time; wall time is reported too. Training curves are measured on a
dev set drawn from the train split; the test split is only used for the final numbers.

    .venv/bin/python bench/r1zero.py                      # the documented result (2 seeds)
    .venv/bin/python bench/r1zero.py --quick              # a smoke run (a minute or two)
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
from nanoseek.eval.tasks import evaluate_task  # noqa: E402
from nanoseek.tasks import get_task, prepare_cold_start  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402
from nanoseek.train import load_recipe, train  # noqa: E402
from nanoseek.train.common import read_metrics  # noqa: E402
from nanoseek.train.grpo import grpo, load_grpo_recipe  # noqa: E402

DEV_SEED = 1234  # dev problems: train split, never the test split


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="addition3")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--cold-start", type=int, default=1000, help="solver traces for SFT (default 1000)")
    p.add_argument("--sft-recipe", type=Path, default=REPO / "recipes" / "r1zero-sft.toml")
    p.add_argument("--grpo-recipe", type=Path, default=REPO / "recipes" / "r1zero-grpo.toml")
    p.add_argument("--sft-steps", type=int, help="exactly this many cold-start SFT steps (default: until --modest)")
    p.add_argument("--modest", type=float, default=0.3, help="stop SFT once dev greedy accuracy reaches this")
    p.add_argument("--sft-chunk", type=int, default=100, help="SFT steps between dev evaluations")
    p.add_argument("--sft-max-steps", type=int, default=2000)
    p.add_argument("--budget", type=float, default=300.0, help="CPU-seconds for each arm after SFT")
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
        args.cold_start, args.sft_steps, args.sft_chunk, args.budget = 200, 20, 10, 15.0
        args.eval_n, args.eval_k, args.dev_n, args.seeds, args.control_chunks = 50, 2, 20, args.seeds[:1], 2
        args.work, args.out = args.work.with_name(args.work.name + "-quick"), args.out.with_name(args.out.name + "-quick")
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

    # 2. GRPO for the budget
    grpo_recipe = load_grpo_recipe(args.grpo_recipe, {
        "init_from": str(root / "sft" / "model"), "out": str(root / "grpo"), "task": task.name, "seed": seed,
        "max_seconds": args.budget, "eval_split": "train", "eval_n": args.dev_n, "progress": False})
    if args.quick:
        grpo_recipe.eval_every = 2
    w0 = time.perf_counter()
    g = grpo(grpo_recipe)
    grpo_wall = time.perf_counter() - w0
    print(f"[seed {seed}] GRPO {g['step']} steps: {g['cpu_seconds']:.0f} CPU-s", flush=True)

    # 3. the control: the SFT run resumed until it has used at least GRPO's CPU-seconds
    control = root / "control"
    shutil.copytree(root / "sft", control)
    ctl_steps, ctl_cpu, ctl_wall = steps, 0.0, 0.0
    while ctl_cpu < 0.98 * g["cpu_seconds"]:
        more = max(1, round((g["cpu_seconds"] - ctl_cpu) / per_step))
        ctl_steps += more
        recipe = dataclasses.replace(base, out=str(control), max_steps=ctl_steps, resume=True,
                                     save_every=max(1, more // args.control_chunks), keep_last=100)
        c0, w0 = time.process_time(), time.perf_counter()
        train(recipe)
        ctl_cpu, ctl_wall = ctl_cpu + time.process_time() - c0, ctl_wall + time.perf_counter() - w0
    print(f"[seed {seed}] control {ctl_steps - steps} more SFT steps: {ctl_cpu:.0f} CPU-s", flush=True)

    # curves on the dev set, against CPU-seconds after the cold start
    grpo_curve = [(r.get("cpu_seconds", 0.0), r["eval_accuracy"]) for r in read_metrics(root / "grpo")
                  if "eval_accuracy" in r]
    ctl_curve = [(0.0, sft_curve[-1][2])]
    for ckpt in sorted((control / "checkpoints").glob("step-*")):
        extra = int(ckpt.name.split("-")[1]) - steps
        if extra > 0:
            ctl_curve.append((extra * ctl_cpu / (ctl_steps - steps), dev_accuracy(ckpt / "model", tok, task, dev)))

    # 4. held-out evaluation
    results = {}
    for name, folder in (("before", root / "sft" / "model"), ("grpo", root / "grpo" / "model"),
                         ("control", control / "model")):
        res = evaluate_task(load_model(folder), tok, task, n=args.eval_n, k=args.eval_k, seed=seed)
        results[name] = {k: v for k, v in res.items() if not k.startswith("per_problem")}
        print(f"[seed {seed}] {name:<8} greedy {fmt_metric(res['greedy_accuracy'])}  "
              f"pass@1 {fmt_metric(res['pass@1'])}", flush=True)
    return {"seed": seed, "sft_steps": steps, "sft_cpu_seconds": sft_cpu, "sft_wall_seconds": sft_wall,
            "sft_cpu_per_step": per_step, "sft_curve": sft_curve, "grpo_steps": g["step"],
            "grpo_cpu_seconds": g["cpu_seconds"], "grpo_wall_seconds": grpo_wall,
            "control_steps": ctl_steps - steps, "control_cpu_seconds": ctl_cpu,
            "control_wall_seconds": ctl_wall, "grpo_curve": grpo_curve, "control_curve": ctl_curve,
            "grpo_metrics": read_metrics(root / "grpo"), "results": results}


def table(runs: list[dict], k: int) -> str:
    lines = [f"| seed | model | CPU-s after SFT | greedy acc (95% CI) | pass@1, k={k}, T=0.6 (95% CI) |",
             "|---|---|---|---|---|"]
    for run in runs:
        r = run["results"]
        cpu = {"before": 0.0, "grpo": run["grpo_cpu_seconds"], "control": run["control_cpu_seconds"]}
        label = {"before": f"after cold-start SFT ({run['sft_steps']} steps)",
                 "grpo": f"+ GRPO ({run['grpo_steps']} steps)",
                 "control": f"+ SFT control ({run['control_steps']} steps)"}
        for name in ("before", "grpo", "control"):
            lines.append(f"| {run['seed']} | {label[name]} | {cpu[name]:.0f} | "
                         f"{fmt_metric(r[name]['greedy_accuracy'])} | {fmt_metric(r[name]['pass@1'])} |")
    return "\n".join(lines)


def mean_row(runs: list[dict]) -> str:
    def mean(name, metric):
        return sum(r["results"][name][metric]["value"] for r in runs) / len(runs)
    parts = [f"{name} {100 * mean(name, 'greedy_accuracy'):.1f}%" for name in ("before", "grpo", "control")]
    delta = 100 * (mean("grpo", "greedy_accuracy") - mean("control", "greedy_accuracy"))
    return f"mean greedy accuracy over {len(runs)} seed(s): " + ", ".join(parts) + f"; GRPO - control = {delta:+.1f} points"


def plot(runs: list[dict], out: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for run in runs:
        s = run["seed"]
        g = [(c, a) for c, a in run["grpo_curve"]]
        c = [(x, a) for x, a in run["control_curve"] if a is not None]
        if g:
            axes[0].plot(*zip(*g), "o-", label=f"GRPO seed {s}")
        if c:
            axes[0].plot(*zip(*c), "s--", label=f"SFT control seed {s}")
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
    fig.tight_layout()
    fig.savefig(out / "curves.png", dpi=110)
    plt.close(fig)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    runs = []
    if args.report_only:
        runs = json.loads((args.out / "r1zero.json").read_text())["runs"]
    for seed in ([] if args.report_only else args.seeds):
        runs.append(run_seed(args, seed))
        (args.out / "r1zero.json").write_text(json.dumps({"settings": settings, "runs": runs,
                                                          "wall_seconds": time.perf_counter() - t0}, indent=2))
    md = (f"R1-Zero at CPU scale: {args.task}, {args.cold_start} cold-start traces, budget {args.budget:.0f} "
          f"CPU-s per arm, test n={args.eval_n}\n\n{table(runs, args.eval_k)}\n\n{mean_row(runs)}\n")
    print("\n" + md)
    (args.out / "r1zero.md").write_text(md)
    plot(runs, args.out)
    for run in runs:  # the GRPO run's own curves, beside the table
        src = args.work / f"seed{run['seed']}" / "grpo" / "grpo.png"
        if src.exists():
            shutil.copy(src, args.out / f"grpo-seed{run['seed']}.png")
    print(f"wrote {args.out / 'r1zero.md'}, r1zero.json, curves.png")


if __name__ == "__main__":
    main()
