"""MoE against its dense twin where the DeepSeekMoE papers measure it: language-model loss on real text
at equal activated parameters (so equal FLOPs per token) and equal tokens, paired by seed.

    nanoseek data shakespeare --vocab-size 512 --out data/shakespeare-512     # once (~1 min)
    OMP_NUM_THREADS=1 .venv/bin/python bench/moe_vs_dense.py --data data/shakespeare-512 --work /tmp/mvd \\
        [--seeds 0,1,2] [--experts 8] [--steps 400] [--batch-size 16] [--seq-len 128]

Models: the demo's shape (nanoseek.demo.model_overrides: 3 layers, hidden 128, 1 shared + E routed
experts of width 64, top-2, the first layer dense) against the twin whose every layer is one dense MLP
as wide as the experts a token uses (shared + top-k): equal activated parameters but for the MoE's
gates (E x 128 per layer). Trained by `nanoseek.train` (pretraining mode, AdamW, cosine lr, the
bias update and aux loss for the MoE; MTP off for both, so the FLOPs per token are the same). The
corpus is split by play (validation plays are never trained on) and 400 x 16 x 128 tokens is a fifth
of an epoch: no token is seen twice, the regime of the papers' comparison.

`--experts 4,8,16` sweeps the routed expert count (the dense twin is the same for every count: its
activated width does not depend on E); validation loss is logged every --eval-every steps, so the
table also gives the loss at fewer tokens (same run, lr not yet decayed: an upper bound of what a
shorter run would reach). Each run's folder is kept and skipped when finished, so the sweep can run as
several processes; the tables (paired differences per seed, mean and 95% t interval) are printed and
written to WORK/moe_vs_dense.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek.data import read_manifest  # noqa: E402
from nanoseek.demo import dense_overrides, model_overrides  # noqa: E402
from nanoseek.eval.report import paired_interval  # noqa: E402
from nanoseek.params import count_parameters  # noqa: E402
from nanoseek.config import ModelConfig  # noqa: E402
from nanoseek.runio import read_metrics  # noqa: E402
from nanoseek.train import TrainRecipe, train  # noqa: E402


def moe_model(vocab: int, experts: int) -> dict:
    return dict(model_overrides(vocab), n_routed_experts=experts, num_nextn_predict_layers=0,
                n_group=2 if experts >= 4 else 1, topk_group=1)


def dense_model(vocab: int) -> dict:
    return dict(dense_overrides(vocab), num_nextn_predict_layers=0)


def run_one(name: str, model: dict, seed: int, a, vocab: int) -> dict:
    """Train (or skip when finished) one run; returns its validation losses by step and its wall time."""
    out = a.work / f"{name}-s{seed}"
    summary = out / "summary.json"
    moe = model["n_routed_experts"] > 0
    if not (summary.exists() and json.loads(summary.read_text())["step"] >= a.steps):
        recipe = TrainRecipe(data=str(a.data), out=str(out), mode="pretrain", preset="tiny", model=model, seed=seed,
                             batch_size=a.batch_size, seq_len=a.seq_len, max_steps=a.steps, lr=a.lr,
                             warmup_steps=max(a.steps // 20, 1), schedule="cosine", eval_every=a.eval_every,
                             eval_batches=a.eval_batches, save_every=a.steps, keep_last=1, progress=False,
                             mtp_loss_weight=0.0, bias_update_speed=0.001 if moe else 0.0,
                             aux_loss_alpha=0.0001 if moe else 0.0, resume=(out / "checkpoints").exists())
        train(recipe.validate())
    rows = read_metrics(out)
    val = {r["step"]: r["val_loss"] for r in rows if r.get("val_loss") is not None}
    s = json.loads(summary.read_text())
    p = count_parameters(ModelConfig.preset("tiny").replace(**model))
    return {"val": val, "wall_seconds": s["wall_seconds"], "tokens": s["tokens"], "total_params": p.total,
            "activated_params": p.activated}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, required=True, help="a prepared data folder (nanoseek data shakespeare)")
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--experts", default="8", help="routed expert counts to compare, e.g. 4,8,16")
    p.add_argument("--steps", type=int, default=400)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-batches", type=int, default=16)
    p.add_argument("--only", choices=("moe", "dense"), help="train only this side (parallel processes)")
    p.add_argument("--report", action="store_true", help="only print the tables of finished runs")
    a = p.parse_args()
    if not (a.data / "manifest.json").exists():
        sys.exit(f"error: --data {a.data}: no manifest.json (run `nanoseek data shakespeare --out {a.data}`)")
    a.work.mkdir(parents=True, exist_ok=True)
    vocab = read_manifest(a.data)["vocab_size"]
    seeds = [int(x) for x in a.seeds.split(",")]
    experts = [int(x) for x in a.experts.split(",")]
    runs: dict[str, dict[int, dict]] = {}
    for seed in seeds:
        for e in experts:
            if a.only != "dense":
                runs.setdefault(f"moe{e}", {})[seed] = _maybe(a, f"moe{e}", moe_model(vocab, e), seed, vocab)
        if a.only != "moe":
            runs.setdefault("dense", {})[seed] = _maybe(a, "dense", dense_model(vocab), seed, vocab)
    table = tables(runs, seeds, experts)
    (a.work / "moe_vs_dense.json").write_text(json.dumps({"settings": {k: str(v) for k, v in vars(a).items()},
                                                          "runs": runs, "comparisons": table}, indent=1))


def _maybe(a, name, model, seed, vocab):
    out = a.work / f"{name}-s{seed}" / "summary.json"
    if a.report and not out.exists():
        return None
    return run_one(name, model, seed, a, vocab)


def tables(runs: dict, seeds: list[int], experts: list[int]) -> list[dict]:
    """Per expert count and logged step: the paired difference MoE - dense of validation loss over the
    seeds where both finished (negative: the MoE is better). Prints markdown."""
    dense = runs.get("dense", {})
    out = []
    print("| routed experts | tokens | seeds | MoE val loss | dense val loss | MoE - dense (95% t interval) | "
          "MoE lower in |\n|---:|---:|---:|---:|---:|---|---:|")
    for e in experts:
        moe = runs.get(f"moe{e}", {})
        both = [s for s in seeds if moe.get(s) and dense.get(s)]
        if not both:
            continue
        steps = sorted(set.intersection(*(set(moe[s]["val"]) & set(dense[s]["val"]) for s in both)), key=int)
        for step in steps:
            m = [moe[s]["val"][step] for s in both]
            d = [dense[s]["val"][step] for s in both]
            ci = paired_interval(m, d)
            tokens = int(step) * moe[both[0]]["tokens"] // max(int(max(moe[both[0]]["val"], key=int)), 1)
            iv = f"[{ci['low']:+.4f}, {ci['high']:+.4f}]" if ci["low"] is not None else "(one seed)"
            print(f"| {e} | {tokens / 1e3:.0f}K | {len(both)} | {sum(m) / len(m):.4f} | {sum(d) / len(d):.4f} | "
                  f"{ci['mean']:+.4f} {iv} | {ci['a_lower']}/{len(both)} |")
            out.append({"experts": e, "step": int(step), "tokens": tokens, "seeds": both, "moe": m, "dense": d,
                        "diff": ci})
    for name, by_seed in runs.items():
        done = [r for r in by_seed.values() if r]
        if done:
            print(f"{name}: {done[0]['total_params']:,} total / {done[0]['activated_params']:,} activated params, "
                  f"mean wall {sum(r['wall_seconds'] for r in done) / len(done):.0f} s per run")
    return out


if __name__ == "__main__":
    main()
