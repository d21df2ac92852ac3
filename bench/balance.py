"""Does DeepSeek's auxiliary-loss-free bias update balance the experts? The same run (same data, seed,
model) with gamma = bias_update_speed > 0 and with gamma = 0 (aux loss off in both), side by side.
Reports expert-load imbalance (max / mean tokens per expert, per MoE layer) over the last 20% of steps,
and the loss. Prints a table and writes JSON.

    .venv/bin/python bench/balance.py [--data data/shakespeare] [--steps 200] [--gamma 0.001]
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek.data import read_manifest  # noqa: E402
from nanoseek.train import TrainRecipe, train  # noqa: E402
from nanoseek.runio import read_metrics  # noqa: E402


def run(args, gamma: float, out: Path) -> dict:
    shutil.rmtree(out, ignore_errors=True)
    vocab = read_manifest(args.data)["vocab_size"]
    recipe = TrainRecipe(out=str(out), data=args.data, preset="tiny", seed=0, batch_size=8, seq_len=128,
                         max_steps=args.steps, lr=3e-3, warmup_steps=10, bias_update_speed=gamma,
                         aux_loss_alpha=0.0, eval_every=0, save_every=0, progress=False,
                         model={"vocab_size": vocab, "n_routed_experts": 16, "num_experts_per_tok": 2,
                                "n_group": 4, "topk_group": 2, "num_nextn_predict_layers": 0})
    train(recipe.validate())
    rows = read_metrics(out)
    tail = rows[-max(len(rows) // 5, 1):]
    layers = len(tail[0]["load_balance"])
    per_layer = [sum(r["load_balance"][i] for r in tail) / len(tail) for i in range(layers)]
    return {"gamma": gamma, "imbalance_per_layer": per_layer, "imbalance_mean": sum(per_layer) / layers,
            "loss_last_20pct": sum(r["loss"] for r in tail) / len(tail),
            "curve": [(r["step"], r["load_max_over_mean"]) for r in rows]}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="data/shakespeare")
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--gamma", type=float, default=0.001)
    ap.add_argument("--out", default="bench/results/balance.json")
    args = ap.parse_args()
    base = Path("runs/bench-balance")
    results = [run(args, args.gamma, base / "gamma"), run(args, 0.0, base / "no-gamma")]
    print(f"\n{'gamma':>8}{'max/mean load (last 20%), per layer':>40}{'mean':>8}{'loss':>8}")
    for r in results:
        layers = " ".join(f"{x:.2f}" for x in r["imbalance_per_layer"])
        print(f"{r['gamma']:>8g}{layers:>40}{r['imbalance_mean']:>8.2f}{r['loss_last_20pct']:>8.3f}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
