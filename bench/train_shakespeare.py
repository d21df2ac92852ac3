"""Pretraining throughput and quality on Shakespeare: nanoseek's trainer beside transformers'
DeepseekV3ForCausalLM on the same config, initial weights and batches. Prints a table, writes JSON.

    .venv/bin/python bench/train_shakespeare.py [--preset small] [--steps 300] [--hf-steps 8]

nanoseek trains for --steps through `nanoseek.train` (the real loop: MTP, aux loss, bias update,
validation, checkpoints); transformers runs --hf-steps plain AdamW steps on the same batches (timing only;
it has no MTP or bias update). Data: `nanoseek data shakespeare --out data/shakespeare` (run first).
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
from nanoseek.cost import measure_matmul_peak  # noqa: E402
from nanoseek.data import TokenLoader  # noqa: E402
from nanoseek.params import count_parameters  # noqa: E402
from nanoseek.train import load_recipe, train  # noqa: E402
from nanoseek.train.common import read_metrics  # noqa: E402

warnings.simplefilter("ignore")


def hf_tokens_per_s(model_dir: Path, data: str, batch_size: int, seq_len: int, steps: int, lr: float) -> float:
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).train()
    opt = torch.optim.AdamW(hf.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    loader = TokenLoader(data, "train", batch_size=batch_size, seq_len=seq_len, seed=0)
    times = []
    for i in range(steps + 1):
        batch = loader.next_batch()
        t = time.perf_counter()
        loss = hf(batch.inputs, labels=None).logits
        loss = torch.nn.functional.cross_entropy(loss.flatten(0, 1), batch.targets.flatten())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(hf.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i:  # the first step warms up
            times.append(time.perf_counter() - t)
    return batch_size * seq_len / (sum(times) / len(times))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--recipe", default="recipes/shakespeare.toml")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--hf-steps", type=int, default=8)
    ap.add_argument("--out", default="bench/results/train_shakespeare.json")
    ap.add_argument("--run", default="runs/bench-shakespeare")
    args = ap.parse_args()
    shutil.rmtree(args.run, ignore_errors=True)
    recipe = load_recipe(args.recipe, {"out": args.run, "max_steps": args.steps, "save_every": 0,
                                       "sample_every": 0, "progress": True})
    cfg = ModelConfig.preset(recipe.preset, **recipe.model)
    counts = count_parameters(cfg)
    peak = measure_matmul_peak()

    summary = train(recipe)
    rows = read_metrics(args.run)
    steady = [r["tokens_per_s"] for r in rows[len(rows) // 5:]]  # skip warm-up steps
    ours = sum(steady) / len(steady)
    val = [(r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
    tail = rows[-max(len(rows) // 5, 1):]
    balance = sum(r["load_max_over_mean"] for r in tail) / len(tail)

    init_dir = Path(args.run) / "init-for-transformers"
    torch.manual_seed(recipe.seed)
    save_model(Transformer(cfg.replace(num_nextn_predict_layers=0)), init_dir)
    theirs = hf_tokens_per_s(init_dir, recipe.data, recipe.batch_size, recipe.seq_len, args.hf_steps, recipe.lr)
    shutil.rmtree(init_dir)

    flops_per_token = json.loads((Path(args.run) / "cost.json").read_text())["flops_per_token"]
    result = {
        "preset": recipe.preset, "total_params": counts.total, "activated_params": counts.activated,
        "steps": summary["step"], "tokens": summary["tokens"], "wall_seconds": summary["wall_seconds"],
        "nanoseek_tokens_per_s": ours, "transformers_tokens_per_s": theirs, "speedup": ours / theirs,
        "matmul_peak_flops": peak, "flops_per_token": flops_per_token,
        "nanoseek_mfu": ours * flops_per_token / peak, "transformers_mfu": theirs * flops_per_token / peak,
        "val_loss": val, "final_train_loss": rows[-1]["loss"], "load_max_over_mean_last_20pct": balance,
        "loss_curve_png": str(Path(args.run) / "loss.png"),
    }
    print(f"\n{recipe.preset}: {counts.total / 1e6:.1f}M total / {counts.activated / 1e6:.1f}M activated, "
          f"{summary['tokens']:,} tokens in {summary['wall_seconds']:.0f}s")
    print(f"{'trainer':<16}{'tokens/s':>10}{'MFU':>8}")
    print(f"{'nanoseek':<16}{ours:>10.0f}{100 * result['nanoseek_mfu']:>7.1f}%")
    print(f"{'transformers':<16}{theirs:>10.0f}{100 * result['transformers_mfu']:>7.1f}%")
    print(f"speed-up {result['speedup']:.2f}x; validation loss " +
          ", ".join(f"{s}: {v:.3f}" for s, v in val) + f"; loss curve {result['loss_curve_png']}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
