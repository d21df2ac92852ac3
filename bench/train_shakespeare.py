"""Pretraining throughput and quality on Shakespeare: nanoseek's trainer beside transformers'
DeepseekV3ForCausalLM on the same config, initial weights and batches. Prints a table, writes JSON.

    .venv/bin/python bench/train_shakespeare.py [--steps 300] [--compare-steps 10]

1. Head to head: nanoseek's model and transformers' DeepseekV3ForCausalLM, same config without MTP
   (transformers has none), same initial weights and batches, the same plain step (forward, CE,
   backward, clip, AdamW), alternating; tokens/s and MFU (FLOPs: nanoseek.cost.flops_per_token).
2. Quality: the full recipe (MTP, aux loss, bias update, validation) through `nanoseek.train` for
   --steps steps: validation loss, its curve, and the trainer's own tokens/s and MFU.
Data: `nanoseek data shakespeare --out data/shakespeare` (run first).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek import ModelConfig, Transformer, save_model  # noqa: E402
from nanoseek.cost import flops_per_token, measure_matmul_peak  # noqa: E402
from nanoseek.data import TokenLoader  # noqa: E402
from nanoseek.params import count_parameters  # noqa: E402
from nanoseek.train import load_recipe, train  # noqa: E402
from nanoseek.runio import read_metrics  # noqa: E402

warnings.simplefilter("ignore")


def head_to_head(cfg: ModelConfig, data: str, batch_size: int, seq_len: int, steps: int, lr: float,
                 work: Path) -> dict[str, float]:
    """Seconds per training step (forward, cross-entropy, backward, clip, AdamW) of nanoseek's model and
    transformers' DeepseekV3ForCausalLM from the same initial weights (no MTP: transformers has none),
    on the same batches, alternating one step each so machine noise hits both alike. Median of `steps`
    steps after two warm-up steps each (the first allocates the optimizer state, the second still pays
    first-touch page faults)."""
    import transformers
    torch.manual_seed(0)
    ours = Transformer(cfg).train()
    save_model(ours, work)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(work, dtype=torch.float32).train()
    shutil.rmtree(work)
    models = {"nanoseek": (ours, lambda ids: ours(ids)), "transformers": (theirs, lambda ids: theirs(ids).logits)}
    # fused AdamW on both sides: nanoseek's trainer uses it, as does transformers' Trainer by default
    opts = {k: torch.optim.AdamW(m.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1, fused=True)
            for k, (m, _) in models.items()}
    loader = TokenLoader(data, "train", batch_size=batch_size, seq_len=seq_len, seed=0)
    times: dict[str, list[float]] = {k: [] for k in models}
    for i in range(steps + 2):
        batch = loader.next_batch()
        for name, (model, logits_of) in models.items():
            t = time.perf_counter()
            logits = logits_of(batch.inputs)
            loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), batch.targets.flatten())
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opts[name].step()
            opts[name].zero_grad(set_to_none=True)
            if i >= 2:  # two warm-up steps
                times[name].append(time.perf_counter() - t)
    return {k: sorted(v)[len(v) // 2] for k, v in times.items()}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/shakespeare.toml")
    ap.add_argument("--steps", type=int, default=300, help="steps of the full-recipe training run")
    ap.add_argument("--compare-steps", type=int, default=10, help="timed steps of each model head to head")
    ap.add_argument("--out", default="bench/results/train_shakespeare.json")
    ap.add_argument("--run", default="runs/bench-shakespeare")
    args = ap.parse_args()
    shutil.rmtree(args.run, ignore_errors=True)
    recipe = load_recipe(args.recipe, {"out": args.run, "max_steps": args.steps, "save_every": 0,
                                       "sample_every": 0, "progress": True})
    cfg = ModelConfig.preset(recipe.preset, **recipe.model)
    counts = count_parameters(cfg)
    peak = measure_matmul_peak()
    tokens_per_step = recipe.batch_size * recipe.seq_len

    # 1. head to head on the same work: the model without MTP, a plain training step
    plain = cfg.replace(num_nextn_predict_layers=0)
    step_s = head_to_head(plain, recipe.data, recipe.batch_size, recipe.seq_len, args.compare_steps, recipe.lr,
                          Path(args.run) / "init")
    plain_flops = flops_per_token(plain, recipe.seq_len).total
    compare = {k: {"seconds_per_step": v, "tokens_per_s": tokens_per_step / v,
                   "mfu": tokens_per_step / v * plain_flops / peak} for k, v in step_s.items()}

    # 2. the full recipe (MTP, aux loss, bias update, validation) through nanoseek.train
    summary = train(recipe)
    rows = read_metrics(args.run)
    steady = [r["tokens_per_s"] for r in rows[len(rows) // 5:]]  # skip warm-up steps
    full_tps = sum(steady) / len(steady)
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    tail = rows[-max(len(rows) // 5, 1):]
    balance = sum(r["load_max_over_mean"] for r in tail) / len(tail)
    full_flops = json.loads((Path(args.run) / "cost.json").read_text())["flops_per_token"]

    result = {
        "preset": recipe.preset, "total_params": counts.total, "activated_params": counts.activated,
        "batch_size": recipe.batch_size, "seq_len": recipe.seq_len, "matmul_peak_flops": peak,
        "head_to_head": compare, "speedup": compare["transformers"]["seconds_per_step"] /
        compare["nanoseek"]["seconds_per_step"], "head_to_head_flops_per_token": plain_flops,
        "full_recipe": {"steps": summary["step"], "tokens": summary["tokens"], "wall_seconds": summary["wall_seconds"],
                        "tokens_per_s": full_tps, "flops_per_token": full_flops, "mfu": full_tps * full_flops / peak},
        "val_loss": val, "final_train_loss": rows[-1]["loss"], "load_max_over_mean_last_20pct": balance,
        "loss_curve_png": str(Path(args.run) / "loss.png"),
    }
    print(f"\n{recipe.preset}: {counts.total / 1e6:.1f}M total / {counts.activated / 1e6:.1f}M activated, "
          f"batch {recipe.batch_size} x {recipe.seq_len}, matmul peak {peak / 1e9:.0f} GFLOP/s")
    print(f"{'training step (no MTP, same batches)':<44}{'tokens/s':>10}{'MFU':>8}")
    for name, row in compare.items():
        print(f"{name:<44}{row['tokens_per_s']:>10.0f}{100 * row['mfu']:>7.1f}%")
    print(f"speed-up {result['speedup']:.2f}x")
    f = result["full_recipe"]
    print(f"\nnanoseek full recipe (MTP, aux loss, bias update): {f['tokens']:,} tokens in {f['wall_seconds']:.0f}s, "
          f"{f['tokens_per_s']:.0f} tokens/s, MFU {100 * f['mfu']:.1f}% (MTP FLOPs counted)")
    print("validation loss " + ", ".join(f"{s}: {v:.3f}" for s, v in val) +
          f"; loss curve {result['loss_curve_png']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
