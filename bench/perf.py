"""nanoseek against transformers' DeepseekV3 on identical weights and inputs, in one process.

For each config: train step (fwd + bwd + AdamW) tokens/s, prefill tokens/s, decode tokens/s at batch
1 and 8 (through the public `nanoseek.generate` and transformers' `generate`, greedy, with a check that
the tokens agree), an all-dense nanoseek model with the same activated parameters (the MoE overhead),
int8 weight-only decoding, bf16 against fp32 inference (`bf16_inference_rows`: prefill 256, decode at
batch 1 and 8, for --precision fp32, bf16 and auto), peak RSS per phase, KV-cache bytes per token and
MFU against a measured fp32 matmul peak. Prints a table, which of the performance issue's goals hold,
and writes bench/results/perf.json.

    .venv/bin/python bench/perf.py [--configs bench-8m bench-192m] [--quick] [--only-bf16-inference]
    .venv/bin/python bench/perf.py --train-precision [--configs ...]   # only the bf16-vs-fp32 training rows

--train-precision: one training step (fwd + bwd + AdamW, batch 8 x 256) of nanoseek in fp32 and in bf16
(the trainer's path: autocast, fp32 router and master weights, the fused chunked CE) beside transformers'
DeepseekV3 in fp32 and under the same autocast and nanoseek's dense twin (`dense_twin`: the MoE step's
overhead) in both, interleaved step by step on one model each (the weights drift, the timing does not
care), with freed memory kept for reuse as the trainers do (nanoseek.train.allocator; --default-malloc:
glibc's defaults); writes bench/results/perf_train_precision.json.
    .venv/bin/python bench/perf.py --rollouts [--configs bench-8m]    # GRPO rollouts, bench/rollouts.py
    .venv/bin/python bench/perf.py --only-int8 [--configs ...]        # int8 against fp32 inference only
    .venv/bin/python bench/perf.py --v2lite [--layers N] [--keep]     # DeepSeek-V2-Lite in int8, bench/v2lite.py

--only-int8: greedy decode at batch 1 and 8 and prefill 256 with fp32 weights and with --quantize int8
(`int8_inference_rows`), interleaved, the ratios, and the int8 logits' error against fp32 (max and
mean abs over 256 positions, teacher-forced argmax agreement, greedy tokens agreeing over 64 new);
writes bench/results/perf_int8_inference.json.

llama.cpp column (bench/llama_column.py): when llama-cpp-python's side environment bench/.llama-env
exists (--llama builds it), the same weights run in llama.cpp as f32 and q8_0 GGUF files, alternating
with the prefill and decode rows (and with the rollouts under --rollouts); the table then shows them
beside our rows and the targets include issue 18's (decode >= llama.cpp f32, int8 >= llama.cpp q8_0).
Without the environment one line says the column was skipped.
"""

from __future__ import annotations

import argparse
import copy
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

import nanoseek  # noqa: E402
from nanoseek import ModelConfig, Transformer, generate, save_model  # noqa: E402
from nanoseek.infer.compute import compute_models, inference_precision  # noqa: E402
from nanoseek.model.moe import MLP, MoE  # noqa: E402
from nanoseek.params import count_parameters  # noqa: E402
from nanoseek.precision import Precision  # noqa: E402
from nanoseek.train.allocator import keep_freed_memory  # noqa: E402

import llama_column  # noqa: E402  (bench/, the script's folder)

warnings.simplefilter("ignore")


# ---- measurement helpers --------------------------------------------------------------------------
def reset_peak_rss():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def timed(fn, repeats: int, warmup: int = 1) -> float:
    """Median seconds of fn() over `repeats` runs after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    times.sort()
    return times[len(times) // 2]


def matmul_peak(n: int = 1024, seconds: float = 1.0) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    count, t = 0, time.perf_counter()
    while time.perf_counter() - t < seconds:
        a @ b
        count += 1
    return 2 * n ** 3 * count / (time.perf_counter() - t)


# ---- models ---------------------------------------------------------------------------------------
def dense_twin(model: Transformer) -> Transformer:
    """Same model with each MoE replaced by one dense SwiGLU MLP of the activated width."""
    cfg = model.config
    width = cfg.moe_intermediate_size * (cfg.num_experts_per_tok + cfg.n_shared_experts)
    twin = Transformer(cfg)
    for layer in list(twin.layers) + [m.block for m in twin.mtp]:
        if isinstance(layer.mlp, MoE):
            layer.mlp = MLP(cfg.hidden_size, width)
            for p in layer.mlp.parameters():
                torch.nn.init.normal_(p, 0, cfg.initializer_range)
    return twin


def random_model(cfg: ModelConfig) -> Transformer:
    """cfg's model with seed-0 random weights and a random routing bias (so the bias path counts)."""
    torch.manual_seed(0)
    model = Transformer(cfg)
    with torch.no_grad():
        for moe in model.moe_layers():
            moe.gate.e_score_correction_bias.normal_(0, 0.05)
    return model


def build(name: str | ModelConfig, folder: Path):
    """A preset's (or a config's) random model, without MTP, and transformers' copy of it (via `folder`)."""
    cfg = name if isinstance(name, ModelConfig) else ModelConfig.preset(name, num_nextn_predict_layers=0)
    model = random_model(cfg)
    save_model(model, folder)
    import transformers
    hf = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    return model, hf


# ---- phases ---------------------------------------------------------------------------------------
def train_step_fn(model, batch, logits_of):
    # fused AdamW for both: nanoseek's trainer uses it and so does transformers' Trainer by default
    # (optim="adamw_torch_fused" with torch >= 2.8); torch's for-loop default was ~40% of a 192m step
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    model.train()
    targets = batch[:, 1:]

    def step():
        logits = logits_of(model, batch[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def ours_logits(model, x):
    return model(x)


def hf_logits(model, x):
    return model(x).logits


def phase(rows: dict, key: str, fn, tokens: int, repeats: int, warmup: int = 1):
    return interleaved(rows, {key: (fn, tokens)}, repeats, warmup)[key]


def interleaved(rows: dict, fns: dict, repeats: int, warmup: int = 1) -> dict:
    """Time several {key: (fn, tokens)} round-robin: one run of each per round, median per key, so a
    slow spell of this shared machine slows every side alike and the ratios hold. Peak RSS per key is
    the highest seen during its own runs."""
    for fn, _ in fns.values():
        for _ in range(warmup):
            fn()
    times = {key: [] for key in fns}
    peaks = {key: 0.0 for key in fns}
    for _ in range(repeats):
        for key, (fn, _) in fns.items():
            reset_peak_rss()
            t = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - t)
            peaks[key] = max(peaks[key], peak_rss_mb())
    out = {}
    for key, (_, tokens) in fns.items():
        sec = sorted(times[key])[len(times[key]) // 2]
        rows[key] = out[key] = {"tokens_per_s": tokens / sec, "seconds": sec, "peak_rss_mb": peaks[key]}
    return out


def bench_config(name: str, quick: bool, peak: float, llama=llama_column.NoColumn()) -> dict:
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        model, hf = build(name, Path(tmp) / "m")
    llama.load(model, name)  # GGUF f32 / q8_0 copies for the llama.cpp rows (none without the side env)
    cfg = model.config
    counts = count_parameters(cfg)
    dense = dense_twin(model)
    vocab = cfg.vocab_size
    B, T = (8, 256)
    batch = torch.randint(0, vocab, (B, T + 1), generator=torch.Generator().manual_seed(0))
    train_repeats = 2 if quick else 5
    res: dict = {"config": name, "total_params": counts.total, "activated_params": counts.activated}
    rows: dict = {}

    # training (on the weights both sides start from; restored afterwards, so that the decode phases
    # compare the two implementations on identical weights again)
    initial = {"ours": copy.deepcopy(model.state_dict()), "hf": copy.deepcopy(hf.state_dict())}
    flops_per_token = 6 * (counts.activated + 0)  # matmul params; attention scores excluded
    steps = {label: (train_step_fn(m, batch, fn), B * T) for label, m, fn in (
        ("train nanoseek", model, ours_logits), ("train transformers", hf, hf_logits),
        ("train nanoseek dense twin", dense, ours_logits))}
    # two warm-up steps: the first allocates the optimizer state, and the next still pays page faults
    # for memory first touched (measured: 192m steps 2-3x slower until the third)
    for r in interleaved(rows, steps, train_repeats, warmup=2).values():
        r["mfu"] = r["tokens_per_s"] * flops_per_token / peak
    model.eval(), hf.eval(), dense.eval()
    model.load_state_dict(initial["ours"]), hf.load_state_dict(initial["hf"])
    del steps, initial  # the optimizer states

    # prefill 1 x 256
    x = batch[:1, :T]
    with torch.no_grad():
        interleaved(rows, {"prefill nanoseek": (lambda: model(x), T), "prefill transformers": (lambda: hf(x), T),
                           **llama.prefill(x)}, 3 if quick else 5)

    # decode (greedy) at batch 1 and 8 from 32-token prompts
    new = 32 if quick else 64
    for bs in (1, 8):
        prompts = batch[:bs, :32].tolist()
        ids = torch.tensor(prompts)

        def hf_generate(ids=ids):
            with torch.no_grad():
                return hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                                   eos_token_id=None, pad_token_id=0)[:, 32:].tolist()
        res[f"greedy_identical_b{bs}"] = generate(model, prompts, max_new_tokens=new) == hf_generate()
        interleaved(rows, {
            f"decode b{bs} nanoseek": (lambda prompts=prompts: generate(model, prompts, max_new_tokens=new), bs * new),
            f"decode b{bs} transformers": (hf_generate, bs * new),
            f"decode b{bs} nanoseek dense twin": (lambda prompts=prompts: generate(dense, prompts, max_new_tokens=new),
                                                  bs * new), **llama.decode(prompts, new)}, 2 if quick else 3)

    # int8 weight-only decoding against our own fp32
    res.update(int8_inference_rows(model, batch, quick, rows, fp32_rows=False))
    res.update(bf16_inference_rows(model, batch, quick, rows))
    res["rows"] = rows
    res["kv_cache_bytes_per_token_fp32"] = {
        "nanoseek_latent": cfg.num_hidden_layers * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) * 4,
        "per_head_kv": cfg.num_hidden_layers * cfg.num_attention_heads * (cfg.qk_head_dim + cfg.v_head_dim) * 4,
    }
    return res


def bf16_inference_rows(model: Transformer, batch: torch.Tensor, quick: bool, rows: dict) -> dict:
    """Prefill 1 x 256 and greedy decode at batch 1 and 8 (32-token prompts) for --precision fp32, bf16
    (bf16 weights and cache) and auto (on an AMX CPU: fp32 below 64 tokens per forward, a bf16 copy
    from 64), interleaved in one process so the ratios hold on a shared machine. The weights are cast
    once, before timing. Returns the auto plan and greedy equality of bf16 with fp32."""
    plans = {p: compute_models(model, p) for p in ("fp32", "bf16", "auto")}
    x = batch[:1, :256]
    with torch.inference_mode():
        interleaved(rows, {f"prefill {p}": (lambda m=c.for_tokens(x.numel()): m(x), x.numel())
                           for p, c in plans.items()}, 3 if quick else 5)
    new = 32 if quick else 64
    out = {"bf16_auto_plan": plans["auto"].plan.describe()}
    for bs in (1, 8):
        prompts = batch[:bs, :32].tolist()
        runs = {p: (lambda c=c, prompts=prompts: generate(model, prompts, max_new_tokens=new, precision=c))
                for p, c in plans.items()}
        out[f"bf16_greedy_equal_fp32_b{bs}"] = runs["bf16"]() == runs["fp32"]()
        interleaved(rows, {f"decode b{bs} {p}": (run, bs * new) for p, run in runs.items()}, 2 if quick else 3)
    return out


def int8_inference_rows(model: Transformer, batch: torch.Tensor, quick: bool, rows: dict,
                        fp32_rows: bool = True) -> dict:
    """Greedy decode at batch 1 and 8 (32-token prompts) and prefill 1 x 256 with --quantize int8
    (and, with fp32_rows, the same with fp32 weights), interleaved per phase; the int8 plan and its
    logit error against fp32 (`int8_logit_error`). Without fp32_rows the int8 rows are timed alone
    (bench_config times fp32 as "nanoseek" rows beside transformers)."""
    fp32 = compute_models(model, "fp32")
    int8 = compute_models(model, inference_precision("auto", "cpu", quantize="int8"))
    out = {"int8_plan": int8.plan.describe(), "int8_logit_error": int8_logit_error(model, int8.main, batch)}
    new = 32 if quick else 64
    x = batch[:1, :256]
    sides = {"fp32": fp32, "int8": int8} if fp32_rows else {"int8": int8}
    name = (lambda p: f"nanoseek {p}") if fp32_rows else (lambda p: "nanoseek int8")
    with torch.inference_mode():
        interleaved(rows, {f"prefill {name(p)}": (lambda m=c.main: m(x), x.numel()) for p, c in sides.items()},
                    3 if quick else 5)
    for bs in (1, 8):
        prompts = batch[:bs, :32].tolist()
        interleaved(rows, {f"decode b{bs} {name(p)}": (lambda c=c, prompts=prompts: generate(
            model, prompts, max_new_tokens=new, precision=c), bs * new) for p, c in sides.items()},
            3 if quick else 5)
    return out


@torch.inference_mode()
def int8_logit_error(model: Transformer, int8: Transformer, batch: torch.Tensor, new: int = 64) -> dict:
    """The int8 model's logits against fp32's over one 256-token row (teacher-forced: max and mean abs
    error, the mean |fp32 logit|, how often the argmax agrees) and greedy decoding of `new` tokens from
    a 32-token prompt (positions that agree, and how many lead before the first difference)."""
    x = batch[:1, :256]
    ref, got = model(x), int8(x)
    prompt = batch[:1, :32].tolist()
    a = generate(model, prompt, max_new_tokens=new)[0]
    b = generate(int8, prompt, max_new_tokens=new)[0]
    lead = next((i for i, (s, t) in enumerate(zip(a, b)) if s != t), min(len(a), len(b)))
    return {"max_abs": (got - ref).abs().max().item(), "mean_abs": (got - ref).abs().mean().item(),
            "mean_abs_fp32_logit": ref.abs().mean().item(),
            "argmax_agree": (got.argmax(-1) == ref.argmax(-1)).float().mean().item(),
            "greedy_agree": sum(s == t for s, t in zip(a, b)) / new, "greedy_identical_prefix": lead,
            "greedy_new_tokens": new}


def print_int8_error(res: dict):
    e = res["int8_logit_error"]
    print(f"  int8 logit error vs fp32 (256 positions): max {e['max_abs']:.3g}, mean {e['mean_abs']:.3g} "
          f"(mean |logit| {e['mean_abs_fp32_logit']:.3g}, relative {e['mean_abs'] / e['mean_abs_fp32_logit']:.2%}); "
          f"argmax agrees {e['argmax_agree']:.1%}; greedy {e['greedy_new_tokens']} tokens: "
          f"{e['greedy_agree']:.0%} agree, first {e['greedy_identical_prefix']} identical")
    print(f"  --quantize int8 here: {res['int8_plan']}")


INT8_RATIOS = [
    ("prefill int8 vs fp32", "prefill nanoseek int8", "prefill nanoseek fp32"),
    ("decode b1 int8 vs fp32", "decode b1 nanoseek int8", "decode b1 nanoseek fp32"),
    ("decode b8 int8 vs fp32", "decode b8 nanoseek int8", "decode b8 nanoseek fp32"),
]


def inference_only(name, quick: bool, rows_of, ratios) -> dict:
    """Only one group of inference rows (`rows_of(model, batch, quick, rows)`) of config `name` (a preset
    or a ModelConfig; no transformers, no training), with their ratios (label, row a, row b): a / b."""
    cfg = name if isinstance(name, ModelConfig) else ModelConfig.preset(name, num_nextn_predict_layers=0)
    model = random_model(cfg).eval()
    batch = torch.randint(0, cfg.vocab_size, (8, 257), generator=torch.Generator().manual_seed(0))
    rows: dict = {}
    res = {"config": name, **rows_of(model, batch, quick, rows), "rows": rows}
    res["ratios"] = {label: rows[a]["tokens_per_s"] / rows[b]["tokens_per_s"] for label, a, b in ratios}
    return res


def bench_int8_only(name: str, quick: bool) -> dict:
    """Only the int8 against fp32 inference rows of config `name`."""
    return inference_only(name, quick, int8_inference_rows, INT8_RATIOS)


def print_inference_table(results: list[dict], what: str, notes):
    """The rows (tokens/s, peak RSS MB) and ratios of a single-group inference mode, then `notes(res)`."""
    for res in results:
        print(f"== {res['config']}: {what} (tokens/s; interleaved, medians; threads {torch.get_num_threads()})")
        for key, r in res["rows"].items():
            print(f"{key:<34}{r['tokens_per_s']:>12.1f}{r['peak_rss_mb']:>14.0f}")
        for label, value in res["ratios"].items():
            print(f"  {label:<40}{value:>8.2f}x")
        notes(res)
        print()


def print_int8_table(results: list[dict]):
    print_inference_table(results, "int8 weights against fp32", print_int8_error)


BF16_RATIOS = [
    ("prefill bf16 vs fp32", "prefill bf16", "prefill fp32"),
    ("decode b1 bf16 vs fp32", "decode b1 bf16", "decode b1 fp32"),
    ("decode b8 bf16 vs fp32", "decode b8 bf16", "decode b8 fp32"),
    ("prefill auto vs fp32", "prefill auto", "prefill fp32"),
    ("decode b1 auto vs fp32", "decode b1 auto", "decode b1 fp32"),
    ("decode b8 auto vs fp32", "decode b8 auto", "decode b8 fp32"),
]


def bench_bf16_only(name: str, quick: bool) -> dict:
    """Only the bf16 inference rows of config `name`."""
    return inference_only(name, quick, bf16_inference_rows, BF16_RATIOS)


# ---- training in bf16 against fp32 ---------------------------------------------------------------
TRAIN_PRECISION_GOAL = {"bench-8m": 1.5, "bench-192m": 2.0}  # bf16 / fp32 step speed of the issue
MOE_DENSE_GOAL = {"bench-192m": 1.3}  # MoE step time / its dense twin's, fp32 (the decode issue's)


def precision_train_step(model, batch, precision: str, ours: bool, opt):
    """One step of `model` (nanoseek: the trainer's loss path, Transformer(labels=...); transformers:
    logits, then CE in fp32) in `precision` ("fp32" | "bf16": autocast) with the shared optimizer."""
    prec = Precision(precision, "bench")
    inputs, targets = batch[:, :-1], batch[:, 1:]
    weights = torch.full(targets.shape, 1 / targets.numel())

    def step():
        with prec.autocast("cpu"):
            if ours:
                loss = model(inputs, labels=[(targets, weights)])[0]
            else:
                logits = model(inputs).logits
                loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), targets.flatten())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def bench_train_precision(name: str, quick: bool, default_malloc: bool = False) -> dict:
    """tokens/s of the four training steps (nanoseek / transformers x fp32 / bf16), interleaved, with
    freed memory kept for reuse as nanoseek's trainers run (nanoseek.train.allocator; both sides get
    it) unless `default_malloc`."""
    kept = False if default_malloc else keep_freed_memory()
    with tempfile.TemporaryDirectory() as tmp:
        model, hf = build(name, Path(tmp) / "m")
    B, T = 8, 256
    batch = torch.randint(0, model.config.vocab_size, (B, T + 1), generator=torch.Generator().manual_seed(0))
    rows: dict = {}
    fns = {}
    for label, m, ours in (("nanoseek", model, True), ("transformers", hf, False),
                           ("nanoseek dense twin", dense_twin(model), True)):
        m.train()
        opt = torch.optim.AdamW(m.parameters(), lr=1e-5, fused=True)
        for precision in ("fp32", "bf16"):
            fns[f"train {label} {precision}"] = (precision_train_step(m, batch, precision, ours, opt), B * T)
    interleaved(rows, fns, 3 if quick else 7, warmup=2)
    tps = {k: r["tokens_per_s"] for k, r in rows.items()}
    ratios = {"nanoseek bf16 / nanoseek fp32": tps["train nanoseek bf16"] / tps["train nanoseek fp32"],
              "nanoseek bf16 / transformers bf16": tps["train nanoseek bf16"] / tps["train transformers bf16"],
              "nanoseek fp32 / transformers fp32": tps["train nanoseek fp32"] / tps["train transformers fp32"],
              "transformers bf16 / transformers fp32": tps["train transformers bf16"] / tps["train transformers fp32"]}
    for precision in ("fp32", "bf16"):  # step time of the MoE over its dense twin's (same activated width)
        ratios[f"MoE / dense twin step time ({precision})"] = (tps[f"train nanoseek dense twin {precision}"]
                                                              / tps[f"train nanoseek {precision}"])
    goal = TRAIN_PRECISION_GOAL.get(name)
    return {"config": name, "rows": rows, "ratios": ratios, "malloc_keeps_freed_memory": kept,
            "goal_bf16_over_fp32": goal,
            "goal_holds": goal is not None and ratios["nanoseek bf16 / nanoseek fp32"] >= goal,
            "goal_moe_over_dense": MOE_DENSE_GOAL.get(name)}


def print_train_precision(results: list[dict]):
    for res in results:
        print(f"== {res['config']}: training step, batch 8 x 256, threads {torch.get_num_threads()}, freed memory "
              f"{'kept (as the trainers run)' if res['malloc_keeps_freed_memory'] else 'returned (malloc defaults)'}")
        for key, r in res["rows"].items():
            print(f"  {key:<34}{r['tokens_per_s']:>10.1f} tokens/s")
        for label, ratio in res["ratios"].items():
            print(f"  {label:<40}{ratio:>7.2f}x")
        if res["goal_bf16_over_fp32"]:
            print(f"  goal bf16 >= {res['goal_bf16_over_fp32']}x fp32: {'holds' if res['goal_holds'] else 'MISSED'}")
        if res.get("goal_moe_over_dense"):
            ratio, goal = res["ratios"]["MoE / dense twin step time (fp32)"], res["goal_moe_over_dense"]
            print(f"  goal MoE step <= {goal}x its dense twin's (fp32): {'holds' if ratio <= goal else 'MISSED'}")


RATIOS = [
    ("train", "train nanoseek", "train transformers"),
    ("train MoE vs dense twin (time ratio)", "train nanoseek dense twin", "train nanoseek"),
    ("prefill", "prefill nanoseek", "prefill transformers"),
    ("decode b1", "decode b1 nanoseek", "decode b1 transformers"),
    ("decode b8", "decode b8 nanoseek", "decode b8 transformers"),
    ("decode b1 int8 vs our fp32", "decode b1 nanoseek int8", "decode b1 nanoseek"),
    ("decode b8 int8 vs our fp32", "decode b8 nanoseek int8", "decode b8 nanoseek"),
] + BF16_RATIOS


# The goals of the performance issue (benchmark goals, never test assertions). Decode ratios are
# against transformers in the same run; the 192m batch-1 floor is 80% of its ~150 tokens/s fp32
# memory roofline (130 MB of activated weights per token at ~20 GB/s).
TRAIN_GOAL = {"bench-8m": 1.3, "bench-192m": 1.5}
DECODE_B1_FLOOR = {"bench-192m": 120.0}


def targets(res: dict) -> list[dict]:
    """[{goal, value, holds}] for this config's result."""
    r, rows, name = res["ratios"], res["rows"], res["config"]
    checks = []
    if name in TRAIN_GOAL:
        checks.append((f"train >= {TRAIN_GOAL[name]}x", r["train"], r["train"] >= TRAIN_GOAL[name]))
    checks += [
        ("MoE train step <= 1.15x dense twin", r["train MoE vs dense twin (time ratio)"],
         r["train MoE vs dense twin (time ratio)"] <= 1.15),
        ("decode b1 >= 5x", r["decode b1"], r["decode b1"] >= 5),
        ("decode b8 >= 3x", r["decode b8"], r["decode b8"] >= 3),
        ("prefill >= 1.3x", r["prefill"], r["prefill"] >= 1.3),
        ("int8 decode b1 >= 1.7x our fp32", r["decode b1 int8 vs our fp32"], r["decode b1 int8 vs our fp32"] >= 1.7),
        ("greedy identical to transformers (b1, b8)", None, res["greedy_identical_b1"] and res["greedy_identical_b8"]),
    ]
    if name in DECODE_B1_FLOOR:
        tps = rows["decode b1 nanoseek"]["tokens_per_s"]
        checks.append((f"decode b1 >= {DECODE_B1_FLOOR[name]:.0f} tok/s (80% of the roofline)", tps,
                       tps >= DECODE_B1_FLOOR[name]))
    return [{"goal": g, "value": v, "holds": bool(h)} for g, v, h in checks]


def print_table(results: list[dict], peak: float):
    print(f"\nfp32 matmul peak: {peak / 1e9:.1f} GFLOP/s, threads {torch.get_num_threads()}\n")
    for res in results:
        print(f"== {res['config']}: {res['total_params'] / 1e6:.1f}M total, "
              f"{res['activated_params'] / 1e6:.1f}M activated")
        print(f"{'phase':<34}{'tokens/s':>12}{'peak RSS MB':>14}{'MFU':>8}")
        for key, r in res["rows"].items():
            mfu = f"{100 * r['mfu']:.1f}%" if "mfu" in r else ""
            print(f"{key:<34}{r['tokens_per_s']:>12.1f}{r['peak_rss_mb']:>14.0f}{mfu:>8}")
        print(f"{'ratio (nanoseek / reference)':<34}")
        for label, a, b in RATIOS:
            ratio = res["rows"][a]["tokens_per_s"] / res["rows"][b]["tokens_per_s"]
            print(f"  {label:<40}{ratio:>8.2f}x")
        kv = res["kv_cache_bytes_per_token_fp32"]
        print(f"  KV cache bytes/token (fp32): latent {kv['nanoseek_latent']:,} vs per-head {kv['per_head_kv']:,}")
        print_int8_error(res)
        print(f"  greedy tokens identical to transformers: b1 {res['greedy_identical_b1']}, "
              f"b8 {res['greedy_identical_b8']}")
        print_bf16_notes(res)
        print("targets")
        for t in res["targets"]:
            value = "" if t["value"] is None else f"{t['value']:.2f}"
            print(f"  {t['goal']:<50}{value:>8}  {'holds' if t['holds'] else 'MISSED'}")
        print()


def print_bf16_notes(res: dict):
    print(f"  --precision auto here: {res['bf16_auto_plan']}")
    print(f"  bf16 greedy tokens identical to fp32: b1 {res['bf16_greedy_equal_fp32_b1']}, "
          f"b8 {res['bf16_greedy_equal_fp32_b8']}")


def print_bf16_table(results: list[dict]):
    print_inference_table(results, "bf16 inference", print_bf16_notes)


# ---- --compile-decode: the compiled decode step against eager (nanoseek/infer/compiled.py) ----------------
def compile_decode_rows(model: Transformer, batch: torch.Tensor, quick: bool, rows: dict,
                        llama=llama_column.NoColumn()) -> dict:
    """Greedy decode at batch 1 and 8 (32-token prompts) with the engine's decode steps eager
    (NANOSEEK_COMPILE=0) and compiled (=1), with llama.cpp's rows when its column is on, interleaved;
    the first compiled call's seconds per batch (compile warm-up, with inductor's on-disk cache as it
    is) and whether the greedy tokens agree."""
    from nanoseek.infer.compiled import COMPILE_ENV

    def run(flag: str, prompts, new):
        os.environ[COMPILE_ENV] = flag
        try:
            return generate(model, prompts, max_new_tokens=new)
        finally:
            os.environ.pop(COMPILE_ENV)
    new = 32 if quick else 64
    out = {}
    for bs in (1, 8):
        prompts = batch[:bs, :32].tolist()
        t = time.perf_counter()
        compiled = run("1", prompts, new)
        out[f"compile_warmup_s_b{bs}"] = time.perf_counter() - t
        out[f"compiled_greedy_equal_eager_b{bs}"] = compiled == run("0", prompts, new)
        interleaved(rows, {f"decode b{bs} nanoseek eager": (lambda p=prompts: run("0", p, new), bs * new),
                           f"decode b{bs} nanoseek compiled": (lambda p=prompts: run("1", p, new), bs * new),
                           **llama.decode(prompts, new)}, 3 if quick else 5)
    return out


COMPILE_RATIOS = [
    ("decode b1 compiled vs eager", "decode b1 nanoseek compiled", "decode b1 nanoseek eager"),
    ("decode b8 compiled vs eager", "decode b8 nanoseek compiled", "decode b8 nanoseek eager"),
]
COMPILE_LLAMA_RATIOS = [
    ("decode b1 compiled vs llama.cpp f32", "decode b1 nanoseek compiled", "decode b1 llama.cpp f32"),
    ("decode b8 compiled vs llama.cpp f32", "decode b8 nanoseek compiled", "decode b8 llama.cpp f32"),
    ("decode b1 eager vs llama.cpp f32", "decode b1 nanoseek eager", "decode b1 llama.cpp f32"),
    ("decode b8 eager vs llama.cpp f32", "decode b8 nanoseek eager", "decode b8 llama.cpp f32"),
]


def bench_compile_decode(names: list[str], quick: bool, llama) -> list[dict]:
    """--compile-decode: `compile_decode_rows` for each config, with the llama.cpp column if present."""
    results = []
    for name in names:
        cfg = ModelConfig.preset(name, num_nextn_predict_layers=0)
        llama.load(random_model(cfg), name)
        ratios = COMPILE_RATIOS + (COMPILE_LLAMA_RATIOS if llama.enabled else [])
        results.append(inference_only(name, quick, lambda m, b, q, r: compile_decode_rows(m, b, q, r, llama),
                                      ratios))
    llama.close()
    return results


def print_compile_notes(res: dict):
    for bs in (1, 8):
        print(f"  b{bs}: first compiled generate {res[f'compile_warmup_s_b{bs}']:.1f} s (compile warm-up); "
              f"greedy tokens equal eager's: {res[f'compiled_greedy_equal_eager_b{bs}']}")


ROLLOUT_GOAL = 6.0  # issue 18: prefix-reuse rollouts at least this x transformers' generate (and >= llama.cpp f32)


def rollout_targets(res: dict) -> list[dict]:
    """[{goal, value, holds}]: prefix reuse against transformers and, with the llama.cpp column, against
    llama.cpp f32's multi-sequence decode on the same weights."""
    value = res["ratios"]["prefix reuse / transformers"]
    checks = [{"goal": f"rollouts >= {ROLLOUT_GOAL}x transformers", "value": value, "holds": value >= ROLLOUT_GOAL}]
    rows = res.get("llama_cpp", {}).get("rows", {})
    for key, row in rows.items():
        if key.startswith("llama.cpp f32"):
            ratio = rows["nanoseek prefix reuse"]["tokens_per_s"] / row["tokens_per_s"]
            checks.append({"goal": f"rollouts >= {key}", "value": ratio, "holds": ratio >= 1.0})
    return checks


def bench_rollout_rows(configs: list[str], quick: bool, llama=llama_column.NoColumn()) -> list[dict]:
    """GRPO-shaped rollouts (bench/rollouts.py: 16 prompts x 8 samples, 128 new tokens at T=1) on the
    demo's model and `configs`: nanoseek with repeated prompts, with prefix reuse, and transformers;
    with the llama.cpp column, its multi-sequence decode alternating with our prefix reuse."""
    from rollouts import bench_rollouts, print_result
    results = []
    for name in ["demo", *configs]:
        res = bench_rollouts(name, new=32 if quick else 128, repeats=2 if quick else 3)
        print_result(res)
        if llama.enabled:
            res["llama_cpp"] = llama_column.rollout_rows(llama, name, 2 if quick else 3, new=32 if quick else 128)
            llama_column.print_rollouts(res["llama_cpp"])
        res["targets"] = rollout_targets(res)
        for t in res["targets"]:
            print(f"  {t['goal']:<44}{t['value']:>6.2f}x  {'holds' if t['holds'] else 'MISSED'}")
        print()
        results.append(res)
    return results


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="+", default=["bench-8m", "bench-192m"])
    ap.add_argument("--quick", action="store_true", help="fewer repeats and tokens")
    ap.add_argument("--out", default="bench/results/perf.json")
    ap.add_argument("--only-bf16-inference", action="store_true",
                    help="only the bf16 against fp32 inference rows (no transformers, no training)")
    ap.add_argument("--train-precision", action="store_true",
                    help="only the bf16-vs-fp32 training rows (see the module docstring)")
    ap.add_argument("--default-malloc", action="store_true",
                    help="--train-precision with glibc's malloc defaults (the trainers keep freed memory)")
    ap.add_argument("--only-int8", action="store_true",
                    help="only the int8 against fp32 inference rows (--quantize int8; no transformers)")
    ap.add_argument("--rollouts", action="store_true",
                    help="only the GRPO rollout rows (bench/rollouts.py) on the demo's model and --configs")
    ap.add_argument("--compile-decode", action="store_true",
                    help="only decode b1/b8 with compiled decode steps against eager (and llama.cpp f32)")
    ap.add_argument("--llama", action="store_true",
                    help="build llama-cpp-python's side environment if missing (the llama.cpp column)")
    ap.add_argument("--v2lite", action="store_true",
                    help="only the DeepSeek-V2-Lite int8 rows: bench/v2lite.py, given the arguments that follow "
                         "(e.g. --v2lite --layers 3); writes a ~31 GB checkpoint, needs ~18 GB free memory")
    args, rest = ap.parse_known_args()
    if args.v2lite:  # its own arguments, its own table and targets (peak RSS, % of the roofline)
        import v2lite
        sys.argv = [v2lite.__file__, *rest]
        return v2lite.main()
    if rest:
        ap.error(f"unrecognized arguments: {' '.join(rest)}")
    llama = lambda: llama_column.for_perf(args.llama, torch.get_num_threads())  # noqa: E731
    only = [(args.rollouts, "perf_rollouts.json", lambda: bench_rollout_rows(args.configs, args.quick, llama()), None),
            (args.train_precision, "perf_train_precision.json",
             lambda: [bench_train_precision(name, args.quick, args.default_malloc) for name in args.configs],
             print_train_precision),
            (args.only_bf16_inference, "perf_bf16_inference.json",
             lambda: [bench_bf16_only(name, args.quick) for name in args.configs], print_bf16_table),
            (args.only_int8, "perf_int8_inference.json",
             lambda: [bench_int8_only(name, args.quick) for name in args.configs], print_int8_table),
            (args.compile_decode, "perf_compile_decode.json", lambda: bench_compile_decode(args.configs, args.quick, llama()),
             lambda results: print_inference_table(results, "compiled decode steps against eager",
                                                   print_compile_notes))]
    for chosen, file_name, run, show in only:
        if chosen:  # one group of rows only: its own JSON beside perf.json
            results = run()
            if show:
                show(results)
            meta = {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()}
            out = Path(args.out).with_name(file_name)
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps({"meta": meta, "results": results}, indent=2))
            print(f"wrote {out}")
            return
    peak = matmul_peak()
    column = llama()
    results = [bench_config(name, args.quick, peak, column) for name in args.configs]
    column.close()
    for res in results:
        res["ratios"] = {label: res["rows"][a]["tokens_per_s"] / res["rows"][b]["tokens_per_s"]
                         for label, a, b in RATIOS}
        res["targets"] = targets(res) + llama_column.llama_targets(res["rows"])
    print_table(results, peak)
    for res in results:
        llama_column.print_comparison(res["rows"], f"== {res['config']}: against llama.cpp {column.version} "
                                      "(same weights; tokens/s, alternating rounds)")
    meta = {"torch": torch.__version__, "nanoseek": nanoseek.__version__, "threads": torch.get_num_threads(),
            "cpu": platform.processor() or platform.machine(), "matmul_peak_flops": peak,
            "cpu_count": os.cpu_count(), "llama_cpp_python": column.version}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
