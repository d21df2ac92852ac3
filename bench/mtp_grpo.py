"""MTP draft acceptance of self-speculative decoding before GRPO, after GRPO without the MTP loss, and
after GRPO with it (mtp_loss_weight), on the same held-out prompts, greedy. Prints a table and writes JSON.

  1. cold-start SFT of the r1zero model (recipes/r1zero-sft.toml: a tiny MoE with one MTP module,
     trained with mtp_loss_weight 0.3) on `--cold-start` solver traces, `--sft-steps` steps: "before";
  2. GRPO from it twice (recipes/r1zero-grpo.toml, `--grpo-steps` steps, same seed): with
     mtp_loss_weight 0 (the MTP module is left as SFT made it) and with `--mtp-loss-weight`. The MTP
     loss does not reach the policy, so both runs must end with the same main model bit for bit (checked
     and reported): only the MTP modules differ. With --trunk-arm (default), a third run lets the MTP
     loss's gradient reach the trunk too, as pretraining does (GRPOTrainer.mtp_trunk_gradient);
  3. every model decodes `--eval-n` test-split prompts greedily with the engine's self-speculative
     decoding (infer.Engine, speculative=True): acceptance = accepted drafts / drafts (engine.stats),
     tokens per decode step, and greedy accuracy of the same outputs; then once more sampling at
     `--temperature` (seeded per prompt; a draft is accepted with probability min(1, p/q)), where
     acceptance depends on the whole next-token distribution, not only its argmax.

    OMP_NUM_THREADS=1 .venv/bin/python bench/mtp_grpo.py            # ~10 CPU-minutes
    OMP_NUM_THREADS=1 .venv/bin/python bench/mtp_grpo.py --quick    # a smoke run of the pipeline
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nanoseek import load_model  # noqa: E402
from nanoseek.infer import Engine, SamplingParams  # noqa: E402
from nanoseek.runio import read_metrics  # noqa: E402
from nanoseek.tasks import get_task, prepare_cold_start, prompt_ids  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402
from nanoseek.train import load_recipe, train  # noqa: E402
from nanoseek.train.grpo import GRPOTrainer, grpo, load_grpo_recipe  # noqa: E402


class TrunkGradientGRPO(GRPOTrainer):
    """The alternative: the MTP loss trains the trunk, embeddings and head too, one clip for all."""
    mtp_trunk_gradient = True


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", default="addition3")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cold-start", type=int, default=200, help="solver traces for SFT (default 200)")
    p.add_argument("--sft-recipe", type=Path, default=REPO / "recipes" / "r1zero-sft.toml")
    p.add_argument("--grpo-recipe", type=Path, default=REPO / "recipes" / "r1zero-grpo.toml")
    p.add_argument("--sft-steps", type=int, default=600)
    p.add_argument("--sft-from", type=Path, help="start from this SFT model folder (with its tokenizer) instead")
    p.add_argument("--grpo-steps", type=int, default=60)
    p.add_argument("--prompts-per-step", type=int, default=8)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-4, help="GRPO learning rate (the recipe's)")
    p.add_argument("--mtp-loss-weight", type=float, default=0.3)
    p.add_argument("--trunk-arm", action=argparse.BooleanOptionalAction, default=True,
                   help="also GRPO with the MTP loss's gradient reaching the trunk (default on)")
    p.add_argument("--eval-n", type=int, default=200, help="test-split prompts decoded by every model")
    p.add_argument("--temperature", type=float, default=1.0, help="of the sampled decoding (the rollouts')")
    p.add_argument("--work", type=Path, default=REPO / "runs" / "mtp-grpo-bench")
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "mtp_grpo.json")
    p.add_argument("--quick", action="store_true", help="tiny sizes: checks the pipeline, not the claim")
    args = p.parse_args(argv)
    if args.quick:
        args.cold_start, args.sft_steps, args.grpo_steps, args.eval_n = 50, 20, 2, 16
        args.prompts_per_step, args.group_size = 4, 4
        args.work = args.work.with_name(args.work.name + "-quick")
        args.out = args.out.with_name(args.out.stem + "-quick.json")
    return args


def acceptance(model_dir: Path, tok: Tokenizer, task, problems, max_tokens: int, temperature: float = 0.0) -> dict:
    """Self-speculative decoding of the problems' prompts: draft acceptance, tokens per decode step of a
    sequence (1 + its accepted drafts per step) and accuracy of the outputs."""
    model = load_model(model_dir, dtype=torch.float32).eval()
    engine = Engine(model, max_batch=16, speculative=True, eos_ids=(tok.eos_id,))
    params = [SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=i) for i in range(len(problems))]
    reqs = engine.generate(prompt_ids(tok, problems), params)
    outs = [r.output_ids for r in reqs]
    correct = sum(task.check(tok.decode(o), p) for o, p in zip(outs, problems))
    st = engine.stats
    return {"acceptance": engine.acceptance_rate(), "drafted": st["drafted"], "accepted": st["accepted"],
            "tokens": st["generated_tokens"],
            "tokens_per_step": st["generated_tokens"] / max(1, st["generated_tokens"] - st["accepted"]),
            "accuracy": correct / len(problems)}


def same_policy(a: Path, b: Path) -> tuple[bool, bool]:
    """(main-model tensors bitwise equal, MTP tensors bitwise equal) of two model folders."""
    sa, sb = load_model(a).state_dict(), load_model(b).state_dict()
    eq = {k: torch.equal(sa[k], sb[k]) for k in sa}
    return all(v for k, v in eq.items() if not k.startswith("mtp.")), all(v for k, v in eq.items()
                                                                            if k.startswith("mtp."))


def run(args) -> dict:
    torch.manual_seed(args.seed)
    task = get_task(args.task)
    root = args.work
    shutil.rmtree(root, ignore_errors=True)
    root.mkdir(parents=True)
    sft_model, sft_cpu = args.sft_from, None
    if sft_model is None:
        paths = prepare_cold_start(task, root, args.cold_start, seed=args.seed)
        c0 = time.process_time()
        train(load_recipe(args.sft_recipe, {"out": str(root / "sft"), "data": str(paths["data"]),
                                            "seed": args.seed, "tokenizer": str(paths["tokenizer"]),
                                            "max_steps": args.sft_steps, "save_every": args.sft_steps,
                                            "progress": False}))
        sft_cpu, sft_model = time.process_time() - c0, root / "sft" / "model"
        print(f"SFT: {args.sft_steps} steps, {sft_cpu:.0f} CPU-s", flush=True)
    tok = Tokenizer.load(sft_model)

    models, grpo_runs = {"SFT (before GRPO)": sft_model}, {}
    w = args.mtp_loss_weight
    arms = {"GRPO, no MTP loss": (0.0, False), f"GRPO, MTP loss {w:g}": (w, False)}
    if args.trunk_arm:
        arms[f"GRPO, MTP loss {w:g} to trunk"] = (w, True)
    for name, (weight, trunk) in arms.items():
        out = root / f"grpo-mtp{weight:g}{'-trunk' if trunk else ''}"
        recipe = load_grpo_recipe(args.grpo_recipe, {
            "init_from": str(sft_model), "out": str(out), "task": task.name, "seed": args.seed,
            "max_steps": args.grpo_steps, "prompts_per_step": args.prompts_per_step, "group_size": args.group_size,
            "lr": args.lr, "mtp_loss_weight": weight, "eval_every": 0, "save_every": args.grpo_steps,
            "progress": False})
        summary = TrunkGradientGRPO(recipe).run() if trunk else grpo(recipe)
        rows = [r for r in read_metrics(out) if "reward_mean" in r]
        mtp = [r["mtp_loss"] for r in rows if "mtp_loss" in r]
        grpo_runs[name] = {"mtp_loss_weight": weight, "trunk_gradient": trunk, "cpu_seconds": summary["cpu_seconds"],
                           "update_seconds": sum(r.get("update_seconds", 0.0) for r in rows),
                           "reward_first": rows[0]["reward_mean"], "reward_last": rows[-1]["reward_mean"],
                           "mtp_loss_first": mtp[0] if mtp else None, "mtp_loss_last": mtp[-1] if mtp else None}
        models[name] = out / "model"
        print(f"GRPO {name}: {summary['step']} steps, {summary['cpu_seconds']:.0f} CPU-s", flush=True)
    policy_equal, mtp_equal = same_policy(*[models[n] for n in list(arms)[:2]])

    max_tokens = recipe.max_new_tokens or 160
    problems = task.generate(args.eval_n, seed=1234, split="test")
    results = {}
    for name, folder in models.items():
        results[name] = acceptance(folder, tok, task, problems, max_tokens)
        results[name]["sampled"] = acceptance(folder, tok, task, problems, max_tokens, args.temperature)
        print(f"{name}: acceptance {results[name]['acceptance']:.3f}, "
              f"sampled {results[name]['sampled']['acceptance']:.3f}", flush=True)
    return {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "sft_steps": args.sft_steps, "sft_cpu_seconds": sft_cpu, "grpo": grpo_runs, "results": results,
            "grpo_policies_bitwise_equal": policy_equal, "grpo_mtp_modules_equal": mtp_equal,
            "torch": torch.__version__, "threads": torch.get_num_threads()}


def table(report: dict) -> str:
    t = report["args"]["temperature"]
    lines = [f"{'model':<30} {'acceptance':>10} {'drafts':>7} {'tok/step':>8} {'greedy acc':>10} "
             f"{f'accept T={t:g}':>12} {f'acc T={t:g}':>9}"]
    for name, r in report["results"].items():
        lines.append(f"{name:<30} {r['acceptance']:>10.3f} {r['drafted']:>7} {r['tokens_per_step']:>8.2f} "
                     f"{r['accuracy']:>10.3f} {r['sampled']['acceptance']:>12.3f} "
                     f"{r['sampled']['accuracy']:>9.3f}")
    lines.append(f"GRPO policies bitwise equal with and without the MTP loss: {report['grpo_policies_bitwise_equal']}")
    for name, g in report["grpo"].items():
        loss = "" if g["mtp_loss_first"] is None else \
            f", MTP loss {g['mtp_loss_first']:.3f} -> {g['mtp_loss_last']:.3f}"
        lines.append(f"{name}: reward {g['reward_first']:.3f} -> {g['reward_last']:.3f}{loss}, "
                     f"{g['cpu_seconds']:.0f} CPU-s ({g['update_seconds']:.0f} s in updates)")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    report = run(args)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(table(report))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
