"""`nanoseek demo`: a fresh machine to a trained tiny MoE reasoner, a report card and a chat.

Stages (each writes into RUN/ and is skipped when already complete, so an interrupted demo resumes):
  1. data      solver traces of an arithmetic task as chat JSONL (R1 format: <think> trace </think> answer)
  2. tokenizer byte-level BPE with DeepSeek-R1's special tokens, trained on those traces
  3. sft       a tiny DeepSeek-style MoE (MLA + shared/routed experts + MTP) trained from scratch on the traces
  4. grpo      reinforcement learning with verifiable rewards (accuracy + format) from the SFT model
  5. control   the same training compute spent on more SFT instead of GRPO (is RL really what helped?)
  6. dense     the same recipe with a dense model of equal activated parameters (MoE vs dense)
  7. eval      held-out greedy accuracy with 95% intervals for every model
  8. report    RUN/report.md with plots, RUN/model (the final reasoner, HF format + tokenizer)
Deterministic for a given seed on CPU, in fp32 on every machine (the recipes pin precision = "fp32").
"""

from __future__ import annotations

import json
import multiprocessing as mp
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from .checkpoint import load_model
from .cost import CostMeter
from .data import prepare, read_manifest
from .eval.report import paired_interval, render
from .eval.tasks import evaluate_task
from .params import count_parameters
from .tasks import get_task, write_chat_jsonl
from .tokenizer import Tokenizer
from .train import TrainRecipe, train
from .train.grpo import GRPORecipe, grpo


DEMO_SEEDS = 3  # the main job's seeds: its verdicts pair MoE with dense and GRPO with its control per seed


@dataclass
class DemoSettings:
    task: str = "addition3"
    seed: int = 0
    train_problems: int = 1000
    eval_problems: int = 500
    vocab_size: int = 263  # byte-level, no merges: every digit is its own token (arithmetic needs that)
    sft_steps: int = 800  # 800 x 16 rows: chosen on dev problems over 400 x 32 (MoE 45% against 14%, the same
    grpo_steps: int = 30  # tokens); with grpo_steps sized so that three seeds (~440 CPU-s each) fit 15 min on 2 cores
    prompts_per_step: int = 16
    group_size: int = 8
    batch_size: int = 16
    seq_len: int = 128  # one addition3 conversation is at most ~126 byte tokens
    lr: float = 3e-3
    grpo_lr: float = 3e-4
    usd_per_hour: float = 0.05  # a 2-core cloud VM

    @classmethod
    def quick(cls, **kw) -> "DemoSettings":
        values = dict(train_problems=300, eval_problems=100, sft_steps=40, grpo_steps=2, prompts_per_step=4,
                      group_size=4, batch_size=16)
        return cls(**{**values, **kw})


def model_overrides(vocab_size: int) -> dict:
    """A ~1M-parameter MoE whose dense layers are exactly as wide as the experts one token uses
    (shared + top-k), so the dense twin (all layers dense) has the same activated parameters."""
    moe_inter, top_k, shared = 64, 2, 1
    return dict(vocab_size=vocab_size, hidden_size=128, num_hidden_layers=3, first_k_dense_replace=1,
                num_attention_heads=4, q_lora_rank=64, kv_lora_rank=32, qk_nope_head_dim=32, qk_rope_head_dim=16,
                v_head_dim=32, moe_intermediate_size=moe_inter, n_routed_experts=8, num_experts_per_tok=top_k,
                n_shared_experts=shared, n_group=2, topk_group=1, intermediate_size=moe_inter * (top_k + shared),
                num_nextn_predict_layers=1, max_position_embeddings=512)


def dense_overrides(vocab_size: int) -> dict:
    o = model_overrides(vocab_size)
    return dict(o, n_routed_experts=0, n_shared_experts=0, first_k_dense_replace=o["num_hidden_layers"])


def prepare_data(run: Path, s: DemoSettings, task, progress: bool = False) -> tuple:
    """Stages 1-2: solver traces as chat JSONL, the byte-level tokenizer and the token shards (each
    skipped when present). Returns (tokenizer, tokenizer folder, data folder, vocab size)."""
    _stage(f"1/8 data: {s.train_problems} {task.name} problems with solver traces", progress)
    traces = run / "data" / "train.jsonl"
    if not _done(traces):
        write_chat_jsonl(task, traces, s.train_problems, seed=s.seed, split="train")
    _stage("2/8 tokenizer and token shards", progress)
    tok_dir = run / "tokenizer"
    if not _done(tok_dir / "tokenizer.json"):
        texts = (line for line in traces.read_text(encoding="utf-8").splitlines())
        Tokenizer.train(texts, vocab_size=s.vocab_size).save(tok_dir)
    tok = Tokenizer.load(tok_dir)
    data_dir = run / "data" / "tokens"
    if not _done(data_dir / "manifest.json"):
        prepare(tok, [traces], data_dir, val_fraction=0.05, progress=progress)
    return tok, tok_dir, data_dir, read_manifest(data_dir)["vocab_size"]


def base_recipe(s: DemoSettings, data_dir: Path, tok_dir: Path, progress: bool = False) -> TrainRecipe:
    """The SFT recipe every training stage starts from (the MoE's routing settings included)."""
    return TrainRecipe(data=str(data_dir), tokenizer=str(tok_dir), mode="sft", preset="tiny", seed=s.seed,
                       batch_size=s.batch_size, seq_len=s.seq_len, lr=s.lr, warmup_steps=max(s.sft_steps // 30, 1),
                       schedule="constant",
                       eval_every=max(s.sft_steps // 4, 1), eval_batches=4, save_every=max(s.sft_steps // 4, 1),
                       keep_last=1, usd_per_hour=s.usd_per_hour, progress=progress, bias_update_speed=0.01,
                       aux_loss_alpha=0.0001, mtp_loss_weight=0.3,
                       precision="fp32")  # the same numbers on every machine (auto differs with AMX)


def _done(path: Path) -> bool:
    return path.exists()


def _stage(name: str, progress: bool):
    if progress:
        print(f"\n== {name}", flush=True)


def run_demo(out: str | Path, settings: DemoSettings | None = None, progress: bool = True, seeds: int = 1) -> dict:
    """Run (or resume) every stage; returns the results dict also written to RUN/results.json.

    seeds > 1: seeds seed+1 .. seed+seeds-1 run the same stages at the same time, each in its own process
    (one thread each, and so does this one: bitwise the same models for the same command and seed), into
    RUN/seeds/seed-N; the report card's verdicts then pair MoE with dense and GRPO with its control per
    seed and give the mean difference with a 95% t interval."""
    s = settings or DemoSettings()
    run = Path(out)
    run.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    threads, workers = torch.get_num_threads(), []
    try:
        workers = _start_seeds(run, s, seeds)
        return _run_all(run, s, progress, workers, t_start)
    finally:
        torch.set_num_threads(threads)
        for _, _, proc in workers:  # only after a failure here: the seeds were joined otherwise
            if proc.is_alive():
                proc.terminate()
                proc.join()


def _run_all(run: Path, s: DemoSettings, progress: bool, workers: list, t_start: float) -> dict:
    task = get_task(s.task)
    torch.manual_seed(s.seed)

    cpu = CpuClock()
    tok, tok_dir, data_dir, vocab = prepare_data(run, s, task, progress)
    base = base_recipe(s, data_dir, tok_dir, progress)
    cpu.lap("data")

    _stage(f"3/8 SFT of a tiny MoE on the traces ({s.sft_steps} steps)", progress)
    sft = _train_stage(replace(base, out=str(run / "sft"), max_steps=s.sft_steps,
                               model=model_overrides(vocab)))
    cpu.lap("sft")

    _stage(f"4/8 GRPO from the SFT model ({s.grpo_steps} steps)", progress)
    grpo = _grpo_stage(run, sft, tok_dir, s, progress)
    cpu.lap("grpo")

    _stage("5/8 control: equal compute spent on more SFT", progress)
    extra = _control_steps(run, s)
    control = _train_stage(replace(base, out=str(run / "control"), init_from=str(sft), preset=None,
                                   max_steps=extra, warmup_steps=0,
                                   eval_every=max(extra // 2, 1), save_every=max(extra // 2, 1)))
    cpu.lap("control")

    _stage(f"6/8 dense model of equal activated parameters ({s.sft_steps} steps)", progress)
    dense = _train_stage(replace(base, out=str(run / "dense"), max_steps=s.sft_steps, model=dense_overrides(vocab),
                                 bias_update_speed=0.0, aux_loss_alpha=0.0))
    cpu.lap("dense")

    _stage(f"7/8 held-out evaluation ({s.eval_problems} problems each, greedy)", progress)
    accuracy = {}
    for label, folder in (("SFT (before RL)", sft), ("SFT + GRPO", grpo), ("SFT + more SFT (control)", control),
                          ("dense SFT", dense)):
        accuracy[label] = _evaluate(run, label, folder, tok, task, s, progress)
    cpu.lap("eval")

    _stage("8/8 report card", progress)
    final = run / "model"
    if final.exists():
        shutil.rmtree(final)
    shutil.copytree(grpo, final)
    results = _results(run, s, sft, grpo, control, dense, accuracy, t_start)
    results["cpu_seconds"] = cpu.laps  # this process's CPU time per stage (a stage skipped on resume: ~0)
    results["per_seed"] = [_seed_row(results)] + _join_seeds(run, workers)
    results["verdicts"] = verdicts(results["per_seed"])
    results["seed_cpu_seconds"] = [r["cpu_seconds"] for r in results["per_seed"]]
    results["wall_seconds"] = time.perf_counter() - t_start
    (run / "results.json").write_text(json.dumps(results, indent=2))
    results["report"] = str(render(run))
    return results


class CpuClock:
    """CPU seconds of this process per stage (time.process_time: what a seed costs on a shared machine,
    where wall time depends on the other seeds and jobs)."""

    def __init__(self):
        self.laps: dict[str, float] = {}
        self._last = time.process_time()

    def lap(self, name: str) -> None:
        now = time.process_time()
        self.laps[name] = round(now - self._last, 1)
        self._last = now


def _train_stage(recipe: TrainRecipe) -> Path:
    """Train (or resume, or skip when finished); returns the model folder."""
    out = Path(recipe.out)
    if (out / "summary.json").exists() and json.loads((out / "summary.json").read_text())["step"] >= recipe.max_steps:
        return out / "model"
    has_ckpt = (out / "checkpoints").exists() and any((out / "checkpoints").glob("step-*"))
    train(replace(recipe, resume=has_ckpt).validate())
    return out / "model"


def _grpo_stage(run: Path, sft: Path, tok_dir: Path, s: DemoSettings, progress: bool) -> Path:
    """GRPO with the strict checker's accuracy + a small format reward (recipes/r1zero-grpo.toml's
    settings); writes grpo/cost.json counting rollouts as forward passes (1/3 of a training token)."""
    out = run / "grpo"
    summary_file = out / "summary.json"
    if not (summary_file.exists() and json.loads(summary_file.read_text())["step"] >= s.grpo_steps):
        has_ckpt = (out / "checkpoints").exists() and any((out / "checkpoints").glob("step-*"))
        grpo(GRPORecipe(out=str(out), init_from=str(sft), tokenizer=str(tok_dir), task=s.task, seed=s.seed,
                        max_steps=s.grpo_steps, prompts_per_step=s.prompts_per_step, group_size=s.group_size,
                        temperature=1.0, lr=s.grpo_lr, beta=0.0, eps_low=0.2, eps_high=0.28, loss_agg="token",
                        save_every=max(s.grpo_steps // 3, 1), keep_last=1, progress=progress,
                        resume=has_ckpt, precision="fp32").validate())
    summary = json.loads(summary_file.read_text())
    meter = CostMeter(load_model(out / "model").config, out / "cost.json", usd_per_hour=s.usd_per_hour,
                      seq_len=s.seq_len)
    meter.update(round(summary["update_tokens"] + summary["rollout_tokens"] / 3), summary["wall_seconds"])
    return out / "model"


def _control_steps(run: Path, s: DemoSettings) -> int:
    """SFT steps with the training compute GRPO used, at least 1: its update tokens (a forward and a
    backward pass, like an SFT token) plus its generated tokens at a third (a forward pass only).
    Counted in tokens, not seconds, so that the demo is deterministic for a seed; on this CPU it comes
    to about what equal wall time gives (e.g. 251 steps against 287)."""
    grpo = json.loads((run / "grpo" / "summary.json").read_text())
    training_tokens = grpo["update_tokens"] + grpo["rollout_tokens"] / 3
    return max(1, round(training_tokens / (s.batch_size * s.seq_len)))


def _evaluate(run: Path, label: str, folder: Path, tok, task, s: DemoSettings, progress: bool) -> dict:
    path = run / "eval" / (label.split(" (")[0].replace(" ", "_").replace("+", "plus") + ".json")
    if path.exists():
        return json.loads(path.read_text())
    model = load_model(folder, dtype=torch.float32)
    r = evaluate_task(model, tok, task, n=s.eval_problems, k=0, seed=s.seed, progress=progress)
    g = r["greedy_accuracy"]
    out = {"accuracy": g["value"], "ci_low": g["ci95"][0], "ci_high": g["ci95"][1], "n": r["n"],
           "format_rate": r["format_rate"], "examples": r["examples"]}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=2))
    return out


def _stage_summary(folder: Path) -> dict:
    run_dir = folder.parent
    summary = json.loads((run_dir / "summary.json").read_text())
    rows = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x.strip()]
    val = [r["val_loss"] for r in rows if r.get("val_loss") is not None]
    return {"tokens": summary["tokens"], "wall_seconds": summary["wall_seconds"],
            "val_loss": val[-1] if val else float("nan")}


def _results(run, s, sft, grpo, control, dense, accuracy, t_start) -> dict:
    moe_cfg = load_model(sft).config
    dense_cfg = load_model(dense).config
    moe_p, dense_p = count_parameters(moe_cfg), count_parameters(dense_cfg)
    moe_r = {**_stage_summary(sft), "total_params": moe_p.total, "activated_params": moe_p.activated,
             "accuracy": accuracy["SFT (before RL)"]}
    dense_r = {**_stage_summary(dense), "total_params": dense_p.total, "activated_params": dense_p.activated,
               "accuracy": accuracy["dense SFT"]}
    better = "lower" if moe_r["val_loss"] < dense_r["val_loss"] else "higher"
    verdict = (f"With equal activated parameters and tokens, the MoE reached a {better} validation loss "
               f"({moe_r['val_loss']:.4f} vs {dense_r['val_loss']:.4f}) with {moe_p.total / dense_p.total:.1f}x the "
               f"total parameters and {moe_r['wall_seconds'] / max(dense_r['wall_seconds'], 1e-9):.2f}x the wall "
               f"time on this CPU.")
    return {
        "task": s.task, "seed": s.seed, "settings": s.__dict__, "config": moe_cfg.to_hf(),
        "params": moe_p.as_dict(), "price_usd_per_hour": s.usd_per_hour,
        "stages": {"sft": "sft", "grpo": "grpo", "control": "control", "dense": "dense"},
        "accuracy": {k: {kk: vv for kk, vv in v.items() if kk != "examples"} for k, v in accuracy.items()},
        "moe_vs_dense": {"moe": moe_r, "dense": dense_r, "verdict": verdict},
        "samples": accuracy["SFT + GRPO"].get("examples", [])[:3],
        "wall_seconds": time.perf_counter() - t_start,
    }


# ---- several seeds and the verdicts -----------------------------------------------------------------
SEEDS_DIR = "seeds"


def _seed_worker(out: str, settings: dict) -> None:
    torch.set_num_threads(1)
    run_demo(out, DemoSettings(**settings), progress=False)


def _start_seeds(run: Path, s: DemoSettings, seeds: int) -> list:
    """Start the extra seeds' demos (spawned processes, one thread each); [] for one seed."""
    if seeds < 1:
        raise ValueError(f"demo: seeds must be >= 1, got {seeds}")
    if seeds == 1:
        return []
    torch.set_num_threads(1)
    ctx = mp.get_context("spawn")
    workers = []
    for seed in range(s.seed + 1, s.seed + seeds):
        folder = run / SEEDS_DIR / f"seed-{seed}"
        proc = ctx.Process(target=_seed_worker, args=(str(folder), {**s.__dict__, "seed": seed}), daemon=False)
        proc.start()
        workers.append((seed, folder, proc))
    return workers


def _join_seeds(run: Path, workers: list) -> list[dict]:
    rows = []
    for seed, folder, proc in workers:
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"demo seed {seed} ({folder}) failed with exit code {proc.exitcode}; rerun the "
                               "demo to resume it")
        rows.append(_seed_row(json.loads((folder / "results.json").read_text()), folder.relative_to(run)))
    return rows


def _seed_row(results: dict, folder: Path | str = ".") -> dict:
    """What the verdicts need from one seed's results: accuracies and validation losses, and where
    they came from (the seed's run folder, relative to the main one)."""
    acc = {k: v["accuracy"] for k, v in results["accuracy"].items()}
    mvd = results["moe_vs_dense"]
    return {"seed": results["seed"], "folder": str(folder), "accuracy": acc, "n": results["accuracy"]["SFT + GRPO"]["n"],
            "moe_val_loss": mvd["moe"]["val_loss"], "dense_val_loss": mvd["dense"]["val_loss"],
            "cpu_seconds": round(sum(results.get("cpu_seconds", {}).values()), 1)}


# (claim, the two quantities compared as a - b, lower is better?, what the papers claim)
CLAIMS = (
    ("moe_vs_dense_loss", "MoE beats its dense twin (validation loss, lower is better)",
     "moe_val_loss", "dense_val_loss", True),
    ("moe_vs_dense_accuracy", "MoE beats its dense twin (held-out accuracy)",
     "SFT (before RL)", "dense SFT", False),
    ("grpo_vs_sft", "GRPO improves on its SFT starting point (held-out accuracy)",
     "SFT + GRPO", "SFT (before RL)", False),
    ("grpo_vs_control", "GRPO beats more SFT at equal training compute (held-out accuracy)",
     "SFT + GRPO", "SFT + more SFT (control)", False),
)


def verdicts(rows: list[dict]) -> list[dict]:
    """Each claim's paired difference a - b over the seeds: mean, 95% t interval (two seeds or more; one
    seed: the two-proportion interval over the held-out problems for accuracies, none for losses), and
    a verdict: "holds" (the interval excludes 0 on the claimed side), "reversed" (on the other side) or
    "not resolved"."""
    out = []
    for key, claim, a_key, b_key, lower_better in CLAIMS:
        a = [r[a_key] if a_key in r else r["accuracy"][a_key] for r in rows]
        b = [r[b_key] if b_key in r else r["accuracy"][b_key] for r in rows]
        ci = paired_interval(a, b)
        basis = f"{len(rows)} seeds, paired, 95% t interval"
        if ci["low"] is None and key != "moe_vs_dense_loss":
            n = rows[0]["n"]
            half = 1.96 * ((a[0] * (1 - a[0]) + b[0] * (1 - b[0])) / n) ** 0.5
            ci.update(low=ci["mean"] - half, high=ci["mean"] + half)
            basis = f"one seed: 95% interval over {n} held-out problems (seed-to-seed variation not included)"
        elif ci["low"] is None:
            basis = "one seed: no interval"
        good = (lambda x: x < 0) if lower_better else (lambda x: x > 0)
        if ci["low"] is None or ci["low"] <= 0 <= ci["high"]:
            verdict = "not resolved"
        else:
            verdict = "holds" if good(ci["mean"]) else "reversed"
        out.append({"key": key, "claim": claim, "a": a_key, "b": b_key, "values_a": a, "values_b": b,
                    "seeds": [r["seed"] for r in rows], "folders": [r["folder"] for r in rows],
                    "mean": ci["mean"], "low": ci["low"], "high": ci["high"], "diffs": ci["diffs"],
                    "wins": sum(good(d) for d in ci["diffs"]), "basis": basis, "verdict": verdict})
    return out
