"""The report card: one markdown file with PNG plots that says what a run built, what it cost and how
well it works. Rendered from the run folder alone (results.json + each stage's metrics.jsonl and
cost.json), so `nanoseek report RUN` can redo it at any time.

results.json (written by the demo) holds:
    config          the model's HF config dict;  params: count_parameters(...).as_dict()
    stages          {name: folder} of training stages, in order (each has metrics.jsonl, cost.json)
    accuracy        {label: {"accuracy", "ci_low", "ci_high", "n", ...}} held-out evaluations
    moe_vs_dense    {"moe": {...}, "dense": {...}} with activated params, tokens, val_loss, accuracy
    samples         [{"prompt", "completion", "correct"}]
    price_usd_per_hour, task, seed, wall_seconds
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..config import ModelConfig
from ..cost import PUBLISHED, flops_per_token
from ..runio import pyplot, read_metrics, save_figure

REPORT = "report.md"

# two-sided 95% quantiles of Student's t for 1..30 degrees of freedom (beyond: the normal's 1.96 plus
# the first correction term, within 0.1% of the exact value)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    """The 97.5% quantile of Student's t with `df` degrees of freedom (df >= 1)."""
    if df < 1:
        raise ValueError(f"t975: degrees of freedom must be >= 1, got {df}")
    return _T975[df - 1] if df <= len(_T975) else 1.96 + 2.4 / df


def paired_interval(a: list[float], b: list[float]) -> dict:
    """Mean of the paired differences a_i - b_i (one pair per seed) with its 95% t interval, and how many
    pairs have a_i < b_i ("a lower") and a_i > b_i. Fewer than two pairs: no interval (None bounds)."""
    if len(a) != len(b) or not a:
        raise ValueError(f"paired_interval: need equally many pairs, got {len(a)} and {len(b)}")
    d = [x - y for x, y in zip(a, b)]
    n, mean = len(d), sum(d) / len(d)
    out = {"n": n, "mean": mean, "low": None, "high": None, "sd": None, "diffs": d,
           "a_lower": sum(x < 0 for x in d), "a_higher": sum(x > 0 for x in d)}
    if n >= 2:
        sd = (sum((x - mean) ** 2 for x in d) / (n - 1)) ** 0.5
        half = t975(n - 1) * sd / n ** 0.5
        out.update(sd=sd, low=mean - half, high=mean + half)
    return out


def plot_training(stages: dict[str, Path], out: Path) -> Path | None:
    """Loss (and validation loss) of every training stage on one step axis."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    offset, drawn = 0, False
    for name, folder in stages.items():
        rows = [r for r in read_metrics(folder) if "loss" in r]
        if not rows:
            continue
        ax.plot([offset + r["step"] for r in rows], [r["loss"] for r in rows], lw=1, label=f"{name} loss")
        val = [(offset + r["step"], r["val_loss"]) for r in rows if r.get("val_loss") is not None]
        if val:
            ax.plot(*zip(*val), "o-", ms=3, label=f"{name} validation")
        offset += rows[-1]["step"]
        drawn = True
    if not drawn:
        plt.close(fig)
        return None
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token)")
    _log_if_decades(ax)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, out)


def _log_if_decades(ax) -> None:
    """A log y axis when the plotted values span more than a decade (a loss from 5 to 0.01 is a flat
    line at the bottom of a linear axis)."""
    ys = [y for line in ax.get_lines() for y in line.get_ydata() if y > 0]
    if ys and max(ys) > 10 * min(ys):
        ax.set_yscale("log")


def plot_expert_load(folder: Path, out: Path) -> Path | None:
    """Heatmap per MoE layer: share of routed tokens per expert (rows) over training steps (columns)."""
    rows = [r for r in read_metrics(folder) if "expert_load" in r]
    if not rows:
        return None
    plt = pyplot()
    n_layers = len(rows[0]["expert_load"])
    fig, axes = plt.subplots(n_layers, 1, figsize=(8, 1.6 + 1.4 * n_layers), squeeze=False)
    steps = [r["step"] for r in rows]
    for i in range(n_layers):
        load = np.array([r["expert_load"][i] for r in rows], dtype=float).T  # (experts, steps)
        share = load / np.maximum(load.sum(axis=0, keepdims=True), 1)
        ax = axes[i][0]
        im = ax.imshow(share, aspect="auto", cmap="viridis", interpolation="nearest",
                       extent=(steps[0], steps[-1], share.shape[0] - 0.5, -0.5))
        ax.set_ylabel(f"MoE layer {i}\nexpert")
        fig.colorbar(im, ax=ax, label="token share")
    axes[-1][0].set_xlabel("step")
    fig.suptitle("Expert load over training (uniform = 1 / experts)")
    return save_figure(fig, out)


def plot_rl(folder: Path, out: Path) -> Path | None:
    """Reward, accuracy and completion length per GRPO step."""
    rows = read_metrics(folder)
    keys = [k for k in ("reward_mean", "accuracy", "completion_len", "eval_accuracy") if any(k in r for r in rows)]
    if not keys:
        return None
    plt = pyplot()
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, key in zip(axes[0], keys):
        pts = [(r["step"], r[key]) for r in rows if key in r]
        ax.plot(*zip(*pts), lw=1)
        ax.set_title({"accuracy": "rollout accuracy", "completion_len": "completion length (tokens)",
                      "eval_accuracy": "held-out accuracy"}.get(key, key.replace("_", " ")))
        ax.set_xlabel("GRPO step")
        ax.grid(alpha=0.3)
    return save_figure(fig, out)


def _fmt(n: float) -> str:
    for factor, suffix in ((1e12, "T"), (1e9, "B"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= factor:
            return f"{n / factor:.2f}{suffix}"
    return f"{n:.0f}"


def _cost_lines(stages: dict[str, Path], price: float) -> list[str]:
    costs = {name: json.loads((Path(f) / "cost.json").read_text()) for name, f in stages.items()
             if (Path(f) / "cost.json").exists()}
    if not costs:
        return ["(no cost.json found)"]
    lines = ["| stage | tokens | training FLOPs | wall time | MFU | device-hours | cost |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    total_flops = total_hours = total_usd = total_wall = 0.0
    for name, c in costs.items():
        lines.append(f"| {name} | {_fmt(c['tokens'])} | {c['training_flops']:.3g} | {c['wall_seconds']:.0f} s | "
                     f"{100 * c['mfu']:.1f}% | {c['device_hours']:.4f} | ${c['usd']:.4f} |")
        total_flops += c["training_flops"]
        total_hours += c["device_hours"]
        total_usd += c["usd"]
        total_wall += c["wall_seconds"]
    lines.append(f"| **total** | | {total_flops:.3g} | {total_wall:.0f} s | | {total_hours:.4f} | "
                 f"${total_usd:.4f} |")
    v3 = PUBLISHED["deepseek-v3"]
    v3_flops = flops_per_token(ModelConfig.preset(v3.preset), v3.seq_len).total * v3.tokens
    usd_per_flop = v3.usd / v3_flops
    lines += ["", f"DeepSeek-V3's pretraining cost ${v3.usd / 1e6:.3f}M for {v3_flops:.3g} FLOPs (same counting: "
                  f"{v3.gpu_hours / 1e6:.3f}M H800-hours at ${v3.usd_per_gpu_hour:g}), i.e. "
                  f"${usd_per_flop:.3g} per FLOP. At that price this run's {total_flops:.3g} FLOPs cost "
                  f"${total_flops * usd_per_flop:.3g}; on this machine they cost ${total_usd:.4f} at "
                  f"${price:g}/device-hour."]
    return lines


def render(run_dir: str | Path) -> Path:
    """Write RUN/report.md and its PNGs from RUN/results.json and the stage folders."""
    run = Path(run_dir)
    results = json.loads((run / "results.json").read_text())
    stages = {k: run / v for k, v in results.get("stages", {}).items()}
    lines = [f"# nanoseek report card: {run.name}", ""]
    lines += verdict_lines(results)
    lines += _model_lines(results)
    train_png = plot_training({k: v for k, v in stages.items() if "grpo" not in k}, run / "loss.png")
    if train_png:
        lines += ["## Training", "", f"![loss curves]({train_png.name})", ""]
    first = next(iter(stages.values()), None)
    if first is not None and plot_expert_load(first, run / "expert_load.png"):
        lines += ["Expert load per MoE layer during the first stage (aux-loss-free balancing at work):", "",
                  "![expert load](expert_load.png)", ""]
    rl = next((v for k, v in stages.items() if "grpo" in k), None)
    if rl is not None and plot_rl(rl, run / "rl.png"):
        lines += ["## Reinforcement learning (GRPO)", "", "![reward and accuracy](rl.png)", ""]
    lines += _accuracy_lines(results)
    lines += _moe_dense_lines(results)
    lines += _sample_lines(results)
    lines += ["## Cost", ""] + _cost_lines(stages, results.get("price_usd_per_hour", 2.0)) + [""]
    out = run / REPORT
    out.write_text("\n".join(lines) + "\n")
    return out


def _model_lines(results: dict) -> list[str]:
    cfg, p = results.get("config", {}), results.get("params", {})
    lines = ["## Model", ""]
    if p:
        lines += [f"DeepSeek-style MoE: {cfg.get('num_hidden_layers')} layers "
                  f"({cfg.get('first_k_dense_replace')} dense), MLA (kv_lora_rank {cfg.get('kv_lora_rank')}), "
                  f"{cfg.get('n_routed_experts')} routed experts (top-{cfg.get('num_experts_per_tok')}) + "
                  f"{cfg.get('n_shared_experts')} shared, {cfg.get('num_nextn_predict_layers')} MTP module(s).", "",
                  "| parameters | count |", "|---|---:|",
                  f"| total | {p['total']:,} |", f"| activated per token | {p['activated']:,} |",
                  f"| activated incl. embedding | {p['activated_with_embedding']:,} |",
                  f"| MTP | {p['mtp']:,} |", ""]
    return lines


def _interval(r: dict) -> str:
    if "ci_low" in r:
        return f"{100 * r['accuracy']:.1f}% [{100 * r['ci_low']:.1f}, {100 * r['ci_high']:.1f}]"
    return f"{100 * r['accuracy']:.1f}%"


def _accuracy_lines(results: dict) -> list[str]:
    acc = results.get("accuracy", {})
    if not acc:
        return []
    lines = ["## Held-out accuracy", "", f"Task: {results.get('task', '?')}; greedy decoding; 95% Wilson "
             "intervals.", "", "| model | accuracy | problems |", "|---|---:|---:|"]
    for label, r in acc.items():
        lines.append(f"| {label} | {_interval(r)} | {r.get('n', '')} |")
    if any("control" in label for label in acc):
        lines += ["", "The control continues the SFT run from the same model instead of GRPO, for as many training "
                  "tokens as GRPO used (its update tokens, plus its generated tokens at a third: a forward pass): "
                  "is it the reinforcement learning that helped, or just more training?"]
    return lines + [""]


def _moe_dense_lines(results: dict) -> list[str]:
    cmp_ = results.get("moe_vs_dense")
    if not cmp_:
        return []
    lines = ["## MoE versus dense at equal compute", "",
             "The same recipe, tokens and activated parameters per token; the dense model replaces each MoE "
             "layer by one MLP as wide as the experts a token uses (shared + top-k).", "",
             "| model | total params | activated | tokens | validation loss | accuracy | wall time |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for name in ("moe", "dense"):
        r = cmp_[name]
        acc = _interval(r["accuracy"]) if isinstance(r.get("accuracy"), dict) else "n/a"
        lines.append(f"| {name} | {_fmt(r['total_params'])} | {_fmt(r['activated_params'])} | {_fmt(r['tokens'])} "
                     f"| {r['val_loss']:.4f} | {acc} | {r['wall_seconds']:.0f} s |")
    verdict = cmp_.get("verdict")
    return lines + ["", verdict, ""] if verdict else lines + [""]


def _signed(x: float, percent: bool) -> str:
    return f"{100 * x:+.1f}" if percent else f"{x:+.4f}"


def _seed_cost(results: dict) -> str:
    cpu = [c for c in results.get("seed_cpu_seconds", []) if c]
    if not cpu:
        return ""
    return (f" A seed cost {min(cpu):.0f} CPU-seconds" if len(cpu) == 1 else
            f" A seed cost {min(cpu):.0f}-{max(cpu):.0f} CPU-seconds") + " (results.json: cpu_seconds per stage)."


def verdict_lines(results: dict) -> list[str]:
    """"What this run shows": each claim, its evidence (the paired differences per seed, their mean and
    95% interval, the seeds' folders) and the verdict, then the caveats."""
    vs = results.get("verdicts")
    if not vs:
        return []
    seeds = vs[0]["seeds"]
    lines = ["## What this run shows", "",
             f"Task {results.get('task', '?')}, seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))}; "
             "differences are paired by "
             "seed (accuracy in points, validation loss in nats/token); a claim *holds* when its 95% interval "
             "excludes zero on the claimed side, is *reversed* when it excludes zero on the other side and is "
             "*not resolved* otherwise.", "",
             "| claim | difference (mean, 95% interval) | per seed | better in | verdict |", "|---|---|---|---:|---|"]
    for v in vs:
        pct = "loss" not in v["key"]
        iv = (f"[{_signed(v['low'], pct)}, {_signed(v['high'], pct)}]" if v["low"] is not None else "(no interval)")
        per = " / ".join(_signed(d, pct) for d in v["diffs"])
        one = " (one seed)" if len(v["diffs"]) == 1 else ""
        lines.append(f"| {v['claim']}: `{v['a']}` minus `{v['b']}` | {_signed(v['mean'], pct)} {iv} | {per} | "
                     f"{v['wins']}/{len(v['diffs'])} | **{v['verdict']}**{one} |")
    folders = [f for f in vs[0]["folders"] if f != "."]
    st = results.get("settings", {})
    passes = st.get("sft_steps", 0) * st.get("batch_size", 0) / max(st.get("train_problems", 1), 1)
    val = results.get("moe_vs_dense", {}).get("moe", {}).get("val_loss", float("nan"))
    bases = sorted({v["basis"] for v in vs}, key=len, reverse=True)
    lines += ["", f"Intervals: {'; '.join(bases)}."
              + (" `nanoseek demo --seeds 3` pairs the claims over seeds." if len(seeds) == 1 else ""),
              "", "Each seed's figures are in its run folder's results.json"
              + (f" (this folder for seed {seeds[0]}; {', '.join(folders)} for the others)." if folders else ".")
              + _seed_cost(results),
              "", "Caveats:",
              "- The MoE-versus-dense claim of the DeepSeekMoE papers is about language-model loss on text "
              f"seen about once, at equal activated parameters and tokens. This run's SFT makes ~{passes:.0f} "
              f"passes over {st.get('train_problems', '?')} short, perfectly regular solver traces, where the "
              f"validation loss is {val:.3f} nats/token and held-out accuracy hinges on rare carry errors. "
              "docs/moe_vs_dense.md measures why the MoE trails here and compares the two on text "
              "(bench/moe_diagnosis.py, bench/moe_vs_dense.py).",
              "- The GRPO control spends the same training compute on more SFT of perfect solver traces, "
              "which at this scale is a strong teacher; GRPO's claim (DeepSeek-R1-Zero) is learning without "
              "traces: docs/reasoning.md and bench/r1zero.py.",
              "- Runs this small are chaotic: a rounding-level change moves a seed's accuracies by tens of "
              "points, so one seed decides nothing; the intervals above are the evidence.", ""]
    return lines


def _sample_lines(results: dict) -> list[str]:
    samples = results.get("samples", [])
    if not samples:
        return []
    lines = ["## Sample reasoning traces", ""]
    for s in samples:
        mark = "correct" if s.get("correct") else "wrong"
        lines += [f"**Prompt:** {s['prompt']}  ({mark})", "", "```", s["completion"].strip(), "```", ""]
    return lines
