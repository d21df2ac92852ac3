"""GRPO-shaped rollouts: `--prompts` prompts x `--group` samples, `--new-tokens` new tokens at temperature 1
(no end-of-sentence: every sample runs the full length), one generator per group as GRPO seeds them.

Rows, tokens/s of generated tokens, timed round-robin in one process (median of `--repeats`):
  nanoseek repeated      `nanoseek.generate` on the prompts repeated G times (prefix_reuse=False:
                         every copy prefilled, the path before prefix reuse)
  nanoseek prefix reuse  the same call with prefix reuse (each prompt prefilled once, its latent cache
                         copied to its G samples); the tokens must equal the repeated path's (checked)
  transformers           `generate(num_return_sequences=G, do_sample=True, top_k=0)` on the same weights
                         (save_model, then AutoModelForCausalLM.from_pretrained)
and the prefill alone (the same calls with one new token), where prefix reuse saves its work.

Configs: `demo` (the demo's model: the tiny preset with `nanoseek.demo.model_overrides` for its 263-token
byte vocabulary, MTP off as GRPO's rollouts do not use it) and the presets given (bench-8m). Random
weights; prompts of `--prompt-len` random tokens (24: the demo's R1 chat prompt "What is 150 + 839?"
is 23 byte tokens). Prints a table and writes bench/results/rollouts.json.

    OMP_NUM_THREADS=1 .venv/bin/python bench/rollouts.py [--configs demo bench-8m] [--prompt-len 24]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from nanoseek import ModelConfig, Transformer, generate  # noqa: E402
from nanoseek.demo import DemoSettings, model_overrides  # noqa: E402
from perf import build as build_pair  # noqa: E402  (a random model and transformers' copy of it)

warnings.simplefilter("ignore")


def build(name: str, folder: Path):
    """The config's random model (eval mode, with a routing bias) and transformers' copy of it."""
    if name == "demo":
        cfg = ModelConfig.preset("tiny", **{**model_overrides(DemoSettings.vocab_size), "num_nextn_predict_layers": 0})
    else:
        cfg = ModelConfig.preset(name, num_nextn_predict_layers=0)
    model, hf = build_pair(cfg, folder)
    return model.eval(), hf.eval()


def rollout_fns(model: Transformer, hf, prompts: list[list[int]], group: int, new: int) -> dict:
    """{label: fn} generating `new` tokens for each prompt's `group` samples; ours return the token lists."""
    rows = [p for p in prompts for _ in range(group)]
    ids = torch.tensor(prompts)

    def ours(reuse: bool, tokens: int = new):
        def run():
            gens = [torch.Generator().manual_seed(1000 + i) for i in range(len(prompts))]
            return generate(model, rows, max_new_tokens=tokens, temperature=1.0, prefix_reuse=reuse,
                            generator=[g for g in gens for _ in range(group)])
        return run

    def theirs(tokens: int = new):
        def run():
            torch.manual_seed(0)
            with torch.no_grad():
                return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                                   min_new_tokens=tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                                   num_return_sequences=group, eos_token_id=None, pad_token_id=0)
        return run
    return {"nanoseek repeated": ours(False), "nanoseek prefix reuse": ours(True), "transformers": theirs(),
            "prefill nanoseek repeated": ours(False, 1), "prefill nanoseek prefix reuse": ours(True, 1)}


def interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds per {label: fn}, one run of each per round after one warm-up round, so a slow
    spell of the shared machine slows every side alike."""
    for fn in fns.values():
        fn()
    times = {key: [] for key in fns}
    for _ in range(repeats):
        for key, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t)
    return {key: sorted(t)[len(t) // 2] for key, t in times.items()}


def bench_rollouts(name: str, *, prompts: int = 16, group: int = 8, new: int = 128, prompt_len: int = 24,
                   repeats: int = 3) -> dict:
    """One config's rollout rows: {config, shape, rows: {label: {seconds, tokens_per_s}}, ratios,
    identical (prefix reuse drew the repeated path's tokens)}."""
    with tempfile.TemporaryDirectory() as tmp:
        model, hf = build(name, Path(tmp) / "m")
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (prompts, prompt_len), generator=g).tolist()
    fns = rollout_fns(model, hf, ids, group, new)
    identical = fns["nanoseek repeated"]() == fns["nanoseek prefix reuse"]()
    seconds = interleaved(fns, repeats)
    generated = prompts * group * new
    rows = {key: {"seconds": s, "tokens_per_s": (prompts * group if key.startswith("prefill") else generated) / s}
            for key, s in seconds.items()}
    tps = {key: r["tokens_per_s"] for key, r in rows.items()}
    ratios = {"prefix reuse / repeated": tps["nanoseek prefix reuse"] / tps["nanoseek repeated"],
              "prefix reuse / transformers": tps["nanoseek prefix reuse"] / tps["transformers"],
              "repeated / transformers": tps["nanoseek repeated"] / tps["transformers"],
              "prefill: repeated time / prefix reuse time":
                  seconds["prefill nanoseek repeated"] / seconds["prefill nanoseek prefix reuse"]}
    return {"config": name, "prompts": prompts, "group": group, "new_tokens": new, "prompt_len": prompt_len,
            "repeats": repeats, "identical_tokens": identical, "rows": rows, "ratios": ratios}


def print_result(res: dict):
    print(f"== {res['config']}: {res['prompts']} prompts x {res['group']} samples, {res['prompt_len']}-token "
          f"prompts, {res['new_tokens']} new tokens, T=1 (median of {res['repeats']}, interleaved)")
    print(f"{'row':<32}{'seconds':>10}{'tokens/s':>12}")
    for key, r in res["rows"].items():
        unit = " (prefill: sequences/s)" if key.startswith("prefill") else ""
        print(f"{key:<32}{r['seconds']:>10.3f}{r['tokens_per_s']:>12.0f}{unit}")
    for label, value in res["ratios"].items():
        print(f"  {label:<44}{value:>6.2f}x")
    print(f"  prefix reuse drew the repeated path's tokens: {res['identical_tokens']}\n")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["demo", "bench-8m"])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--prompt-len", type=int, nargs="+", default=[24],
                    help="prompt lengths to measure (each one a table per config)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default="bench/results/rollouts.json")
    args = ap.parse_args()
    results = []
    for name in args.configs:
        for length in args.prompt_len:
            res = bench_rollouts(name, prompts=args.prompts, group=args.group, new=args.new_tokens,
                                 prompt_len=length, repeats=args.repeats)
            print_result(res)
            results.append(res)
    meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "cpu": platform.processor() or platform.machine(), "load_average": os.getloadavg()}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
