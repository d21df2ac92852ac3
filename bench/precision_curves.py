"""bf16 against fp32 loss curves of two runs of the same recipe: a plot and the figures docs/precision.md
quotes (relative differences of the validation losses and of the smoothed training losses).

    # the two runs (Shakespeare `small`, 300 steps; `nanoseek data shakespeare --out data/shakespeare` first)
    nanoseek train --recipe recipes/shakespeare.toml --max-steps 300 --eval-every 50 --precision fp32 --out runs/shk-fp32
    nanoseek train --recipe recipes/shakespeare.toml --max-steps 300 --eval-every 50 --precision bf16 --out runs/shk-bf16
    .venv/bin/python bench/precision_curves.py runs/shk-fp32 runs/shk-bf16 [--png docs/img/bf16_vs_fp32_shakespeare.png]

Runs still going are read as far as they got (steps both have logged).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek.runio import pyplot, read_metrics, save_figure  # noqa: E402

SMOOTH = 20  # steps in the moving average of the training loss


def moving_average(values: list[float], n: int) -> list[float]:
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v - (values[i - n] if i >= n else 0.0)
        out.append(total / min(i + 1, n))
    return out


def compare(fp32_dir: Path, bf16_dir: Path) -> dict:
    """The steps both runs logged: training loss (raw and smoothed) and validation loss, with the
    largest relative differences bf16 vs fp32."""
    runs = {}
    for name, folder in (("fp32", fp32_dir), ("bf16", bf16_dir)):
        rows = read_metrics(folder)
        runs[name] = {"train": {r["step"]: r["loss"] for r in rows if "loss" in r},
                      "val": {r["step"]: r["val_loss"] for r in rows if r.get("val_loss") is not None},
                      "tokens_per_s": [r["tokens_per_s"] for r in rows if "tokens_per_s" in r]}
    steps = sorted(set(runs["fp32"]["train"]) & set(runs["bf16"]["train"]))
    smooth = {k: moving_average([runs[k]["train"][s] for s in steps], SMOOTH) for k in runs}
    val_steps = sorted(set(runs["fp32"]["val"]) & set(runs["bf16"]["val"]))
    val = [{"step": s, "fp32": runs["fp32"]["val"][s], "bf16": runs["bf16"]["val"][s],
            "rel_diff": runs["bf16"]["val"][s] / runs["fp32"]["val"][s] - 1} for s in val_steps]
    rel_smooth = [b / a - 1 for a, b in zip(smooth["fp32"], smooth["bf16"])]
    rel_raw = [runs["bf16"]["train"][s] / runs["fp32"]["train"][s] - 1 for s in steps]
    late = rel_smooth[SMOOTH:]  # past the first window (the average of few steps is noisy)
    return {"steps": len(steps), "last_step": steps[-1] if steps else 0, "val": val,
            "max_abs_rel_diff_train_smoothed": max(map(abs, late), default=None),
            "max_abs_rel_diff_train_raw": max(map(abs, rel_raw), default=None),
            "mean_rel_diff_train_smoothed": sum(late) / len(late) if late else None,
            "max_abs_rel_diff_val": max((abs(v["rel_diff"]) for v in val), default=None),
            "curves": {"steps": steps, "fp32": smooth["fp32"], "bf16": smooth["bf16"],
                       "fp32_raw": [runs["fp32"]["train"][s] for s in steps],
                       "bf16_raw": [runs["bf16"]["train"][s] for s in steps]}}


def plot(res: dict, png: Path) -> Path:
    c = res["curves"]
    fig, ax = pyplot().subplots(figsize=(7, 4))
    ax.plot(c["steps"], c["fp32_raw"], lw=0.6, alpha=0.35, color="C0")
    ax.plot(c["steps"], c["bf16_raw"], lw=0.6, alpha=0.35, color="C1")
    ax.plot(c["steps"], c["fp32"], lw=1.5, color="C0", label=f"fp32 train loss ({SMOOTH}-step mean)")
    ax.plot(c["steps"], c["bf16"], lw=1.5, color="C1", ls="--", label=f"bf16 train loss ({SMOOTH}-step mean)")
    for name, color, marker in (("fp32", "C0", "o"), ("bf16", "C1", "s")):
        ax.plot([v["step"] for v in res["val"]], [v[name] for v in res["val"]], marker, color=color, ms=5,
                label=f"{name} validation loss")
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("Shakespeare `small`: bf16 autocast vs fp32")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, png, dpi=120)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("fp32_run")
    ap.add_argument("bf16_run")
    ap.add_argument("--png", default="docs/img/bf16_vs_fp32_shakespeare.png")
    ap.add_argument("--out", default="bench/results/precision_curves.json")
    args = ap.parse_args()
    res = compare(Path(args.fp32_run), Path(args.bf16_run))
    plot(res, Path(args.png))
    print(f"steps compared: {res['steps']} (last {res['last_step']})")
    for v in res["val"]:
        print(f"  val loss at step {v['step']:>4}: fp32 {v['fp32']:.4f}  bf16 {v['bf16']:.4f}  ({100 * v['rel_diff']:+.2f}%)")
    for key in ("max_abs_rel_diff_val", "max_abs_rel_diff_train_smoothed", "mean_rel_diff_train_smoothed",
                "max_abs_rel_diff_train_raw"):
        if res[key] is not None:
            print(f"  {key}: {100 * res[key]:.2f}%")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({k: v for k, v in res.items() if k != "curves"}, indent=2))
    print(f"wrote {args.png} and {args.out}")


if __name__ == "__main__":
    main()
