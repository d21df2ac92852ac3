"""bf16 against fp32 on one GPU: a training step and decoding for bench-192m and a ~1B-parameter MoE.

For each config, on random weights (seed 0):
  train   tokens/s of a step (forward, backward, gradient clipping, fused AdamW; fp32 master weights and
          optimizer state), MFU against the device's bf16 peak, peak memory; fp32 (TF32 off) and bf16
  decode  greedy `nanoseek.generate` of 32 tokens at batch 1 and 8, fp32 and with the weights in bf16:
          tokens/s, peak memory, and how many leading tokens of the bf16 continuation equal fp32's
          (random weights have near-ties, so a late flip is no bug; the first tokens should agree)
Prints a table and writes bench/results/gpu.json (or --out).

bf16 is the recipe's `precision = "bf16"` when TrainRecipe has that field (with the library's autocast
helper when it has one); before that lands, torch.autocast(bf16) around the same step. The step itself is
nanoseek's: training_loss (the trainer's loss) and build_optimizer's fused AdamW.

    bash bench/gpu.sh                                   # on a GPU: both configs, a few minutes
    OMP_NUM_THREADS=1 python bench/gpu_check.py --cpu --tiny   # smoke test on CPU, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import resource
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nanoseek import ModelConfig, Transformer, generate  # noqa: E402
from nanoseek.data.loader import Batch  # noqa: E402
from nanoseek.errors import NanoseekError  # noqa: E402
from nanoseek.params import count_parameters  # noqa: E402
from nanoseek.train import common  # noqa: E402
from nanoseek.train.recipe import TrainRecipe  # noqa: E402

# ~1B parameters (954M, 168M activated per token): bench-192m's shape at hidden 1024, 12 layers,
# 64 routed experts of 384 (6 per token) and 2 shared, a 32k vocabulary
MOE_1B = dict(vocab_size=32768, hidden_size=1024, intermediate_size=2816, moe_intermediate_size=384,
              num_hidden_layers=12, num_attention_heads=8, n_routed_experts=64, n_shared_experts=2,
              num_experts_per_tok=6, q_lora_rank=384, kv_lora_rank=256, qk_nope_head_dim=64,
              qk_rope_head_dim=32, v_head_dim=64)
CONFIGS = {  # name -> (preset, overrides, batch rows, sequence length)
    "bench-192m": ("bench-192m", {}, 8, 1024),
    "moe-1b": ("bench-192m", MOE_1B, 4, 1024),
}
TINY = {"tiny": ("tiny", {}, 2, 32)}
DECODE_TOKENS = 32
PROMPT_TOKENS = 16


# ---- precision ---------------------------------------------------------------------------------------
def has_precision_field() -> bool:
    """Whether the recipes have `precision` (issue 15's bf16 work); before it, torch.autocast directly."""
    return hasattr(TrainRecipe, "precision")


def make_recipe(precision: str) -> TrainRecipe:
    """The recipe fields the step reads (build_optimizer, training_loss), with `precision` when it exists."""
    extra = {"precision": precision} if has_precision_field() else {}
    return TrainRecipe(data="-", preset="tiny", lr=1e-4, warmup_steps=0, mtp_loss_weight=0.0, **extra)


def autocast(device: torch.device, precision: str, recipe: TrainRecipe | None = None):
    """The context the step runs in: nothing for fp32; for bf16 the library's own helper when it has
    one (`autocast_context(recipe|precision, device)`), else torch.autocast(device, bfloat16)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    helper = getattr(common, "autocast_context", None)
    if helper is not None and recipe is not None:
        with contextlib.suppress(TypeError):
            return helper(recipe, device)
    return torch.autocast(device.type, dtype=torch.bfloat16)


# ---- measurement -------------------------------------------------------------------------------------
def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_gib(device: torch.device) -> float:
    """Peak memory of the phase: GPU memory allocated, or (CPU) the process's peak RSS so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2**30


def timed(fn, device: torch.device, repeats: int, warmup: int) -> float:
    """Median seconds of fn() over `repeats` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def peak_flops(device: torch.device, override_tflops: float | None) -> tuple[float | None, str]:
    """bf16 peak FLOP/s of the device: --peak-tflops, else nanoseek.cost's table (GPU) or probe (CPU)."""
    if override_tflops:
        return override_tflops * 1e12, "--peak-tflops"
    from nanoseek.cost.estimation import device_peak
    try:
        _, peak, source = device_peak(str(device), torch.bfloat16)
        return peak, source
    except NanoseekError as e:
        return None, f"unknown ({e})"


def flops_per_token(cfg: ModelConfig, seq_len: int) -> float:
    from nanoseek.cost.estimation import flops_per_token as fpt
    return fpt(cfg, seq_len, include_mtp=False).total


def random_batch(cfg: ModelConfig, rows: int, seq_len: int, device: torch.device, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, cfg.vocab_size, (rows, seq_len + 1), generator=g)
    ones = torch.ones_like(tokens, dtype=torch.bool)
    positions = torch.arange(seq_len + 1).expand(rows, -1).contiguous()
    return Batch(tokens, ones, torch.zeros_like(tokens), positions).to(device)


def build(cfg: ModelConfig, device: torch.device) -> Transformer:
    torch.manual_seed(0)
    with torch.device(device):
        return Transformer(cfg).train()


# ---- phases ------------------------------------------------------------------------------------------
def train_phase(cfg: ModelConfig, precision: str, rows: int, seq_len: int, device: torch.device,
                steps: int, peak: float | None) -> dict:
    """Tokens/s, MFU and peak memory of the training step in `precision` (a fresh model each time)."""
    recipe = make_recipe(precision)
    model = build(cfg, device)
    optimizer = common.build_optimizer(model, recipe)
    batch = random_batch(cfg, rows, seq_len, device)
    losses = []

    def step():
        with autocast(device, precision, recipe):
            loss, parts = common.training_loss(model, batch, recipe)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(parts["loss"])

    reset_peak(device)
    seconds = timed(step, device, repeats=steps, warmup=2)
    tokens_per_s = rows * seq_len / seconds
    row = {"phase": "train", "precision": precision, "batch": rows, "seq_len": seq_len,
           "tokens_per_s": tokens_per_s, "peak_gib": peak_gib(device), "first_loss": losses[0],
           "mfu": flops_per_token(cfg, seq_len) * tokens_per_s / peak if peak else None}
    return row  # the model and its optimizer go with this frame: the next phase starts from empty memory


@torch.no_grad()
def decode_phase(model: Transformer, batch: int, device: torch.device,
                 reference: list[list[int]] | None) -> tuple[dict, list[list[int]]]:
    """Greedy decode of DECODE_TOKENS after PROMPT_TOKENS-token prompts with `model` as it is (fp32, or
    its bf16 copy: weights in bf16, as `load_model(dtype=torch.bfloat16)` gives); tokens/s counts the
    generated tokens of the whole batch; `equal_tokens`: leading tokens of prompt 0 equal to `reference`'s."""
    g = torch.Generator().manual_seed(1)
    prompts = torch.randint(0, model.config.vocab_size, (batch, PROMPT_TOKENS), generator=g).tolist()
    out: list = []

    def run():
        out[:] = generate(model, prompts, max_new_tokens=DECODE_TOKENS)

    reset_peak(device)
    seconds = timed(run, device, repeats=3, warmup=1)
    row = {"phase": f"decode b{batch}", "precision": {torch.float32: "fp32", torch.bfloat16: "bf16"}[model.dtype],
           "batch": batch,
           "tokens_per_s": batch * DECODE_TOKENS / seconds, "peak_gib": peak_gib(device)}
    if reference is not None:
        same = 0
        for a, b in zip(out[0], reference[0]):
            if a != b:
                break
            same += 1
        row["equal_tokens"] = same
    return row, list(out)


def bench_config(name: str, spec: tuple, device: torch.device, steps: int, peak: float | None) -> dict:
    preset, overrides, rows, seq_len = spec
    cfg = ModelConfig.preset(preset, **overrides)
    counts = count_parameters(cfg)
    print(f"{name}: {counts.total / 1e6:.0f}M parameters, {counts.activated / 1e6:.0f}M activated; "
          f"batch {rows} x {seq_len}", flush=True)
    results = [train_phase(cfg, p, rows, seq_len, device, steps, peak) for p in ("fp32", "bf16")]
    model = build(cfg, device).eval()
    fp32_b1, reference = decode_phase(model, 1, device, None)
    fp32_b8, _ = decode_phase(model, 8, device, None)
    model = model.to(torch.bfloat16)
    bf16_b1, _ = decode_phase(model, 1, device, reference)
    results += [fp32_b1, bf16_b1, fp32_b8, decode_phase(model, 8, device, None)[0]]
    del model
    return {"config": name, "params": counts.total, "activated": counts.activated, "rows": results}


def print_table(results: list[dict], device_name: str, peak_source: str) -> None:
    print(f"\n{device_name}; MFU against the bf16 peak ({peak_source}); fp32 runs with TF32 off")
    header = f"{'config':<11} {'phase':<10} {'prec':<5} {'tokens/s':>11} {'MFU':>7} {'peak GiB':>9} " \
             f"{'greedy = fp32':>14}"
    print(header)
    print("-" * len(header))
    for res in results:
        for r in res["rows"]:
            mfu = f"{100 * r['mfu']:.1f}%" if r.get("mfu") is not None else "-"
            equal = f"{r['equal_tokens']}/{DECODE_TOKENS}" if "equal_tokens" in r else ""
            print(f"{res['config']:<11} {r['phase']:<10} {r['precision']:<5} {r['tokens_per_s']:>11,.0f} "
                  f"{mfu:>7} {r['peak_gib']:>9.2f} {equal:>14}")
        train = {r["precision"]: r["tokens_per_s"] for r in res["rows"] if r["phase"] == "train"}
        print(f"{res['config']:<11} train bf16 / fp32: {train['bf16'] / train['fp32']:.2f}x")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cpu", action="store_true", help="run on the CPU (smoke test); default: cuda")
    ap.add_argument("--tiny", action="store_true", help="only the tiny preset (smoke test)")
    ap.add_argument("--configs", nargs="+", choices=sorted(CONFIGS), default=sorted(CONFIGS))
    ap.add_argument("--steps", type=int, default=5, help="timed training steps (after 2 warm-up steps)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="bf16 peak of the device, for MFU")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "gpu.json")
    args = ap.parse_args(argv)
    if not args.cpu and not torch.cuda.is_available():
        print("error: no CUDA device (torch.cuda.is_available() is False); use --cpu for a smoke test",
              file=sys.stderr)
        return 2
    device = torch.device("cpu" if args.cpu else "cuda")
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: the reference bf16 is compared with
    torch.backends.cudnn.allow_tf32 = False
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    peak, source = peak_flops(device, args.peak_tflops)
    specs = TINY if args.tiny else {name: CONFIGS[name] for name in args.configs}
    steps = 2 if args.tiny else args.steps
    print(f"bf16 via {'the recipe field precision' if has_precision_field() else 'torch.autocast'}; "
          f"{device_name}", flush=True)
    results = [bench_config(name, spec, device, steps, peak) for name, spec in specs.items()]
    print_table(results, device_name, source)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"device": device_name, "torch": torch.__version__, "peak_flops": peak,
                                    "peak_source": source, "precision_field": has_precision_field(),
                                    "results": results}, indent=2))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
