"""DeepSeek-V2-Lite streamed into int8 on a small machine: peak RSS of the load, and batch-1 decode against
the memory roofline of the bytes a decoded token reads.

A random-weight checkpoint shaped exactly like DeepSeek-V2-Lite (the `deepseek-v2-lite` preset: 15.7B
parameters, 2.4B activated; ~31 GB in bf16) is written once into --dir, shard by shard and tensor by
tensor (never the model in memory: each tensor's bytes are windows of one small pool of N(0, 0.02)
bf16 values, norms ones, the fp32 router gate drawn in full), and reused while present. Then, each in a
fresh subprocess:

- probe: the machine's read bandwidth with --threads threads: the fastest of `t.sum()` and an fp32
  GEMV over one 1 GiB fp32 tensor and of the int8 GEMVs (`torch._weight_int8pack_mm` and, where it
  builds, nanoseek's AVX-512 kernel) over 1 GiB of expert-sized int8 weights, each the best of several
  runs (other processes only slow a read down), so the roofline is the highest read rate seen;
- load: `nanoseek.infer.int8_load.load_int8_model` (1 thread), its peak RSS (VmHWM, so the whole
  process) and seconds; then --tokens greedy tokens at batch 1 with --threads threads, timed per step
  (a 16-token prompt; the median step gives tokens/s), and the same through `nanoseek.generate`.

Activated bytes per decoded token are what the int8 model reads for it: every Int8Linear's int8 weights
and bf16 scales (attention, the dense first layer, shared experts, lm_head), 6 of 64 routed experts per
MoE layer, and the fp32 tensors the int8 path keeps (kv_b_proj, router gate, norms; one embedding row).
Roofline tokens/s = bandwidth / activated bytes. Prints a table and which targets hold (peak RSS <= 20
GB, decode >= 70% of the roofline) and writes bench/results/v2lite.json (v2lite-L{N}.json for --layers).

    OMP_NUM_THREADS=1 .venv/bin/python bench/v2lite.py --prepare [--layers N]    # write the checkpoint
    OMP_NUM_THREADS=1 flock /tmp/timing.lock .venv/bin/python bench/v2lite.py [--layers N] [--dir DIR] [--keep]

The full model needs ~18 GB free: the run stops before loading when MemAvailable is short.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

RSS_TARGET = 20e9  # bytes: the "peak RSS at most 20 GB"
ROOFLINE_TARGET = 0.70
PROMPT = 16
POOL = (1 << 24) + 4099  # bf16 values in the random pool (odd: windows never line up with rows)
STD = 0.02  # the preset's initializer_range
MARKER = "v2lite-bench.json"  # written last: a folder without it is incomplete and rewritten

PROBE = r"""
import json, statistics, sys, time, torch
threads = int(sys.argv[1])
torch.set_num_threads(threads)
def best_seconds(fn, n):  # the fastest of n: other processes only ever slow a read down
    fn(); ts = []
    for _ in range(n):
        t = time.perf_counter(); fn(); ts.append(time.perf_counter() - t)
    return min(ts)
x = torch.empty(16384, 16384, dtype=torch.float32).fill_(1.0)  # 1 GiB, every page touched
v = torch.randn(1, 16384)
read = {"sum": x.numel() * 4 / best_seconds(x.sum, 9),
        "fp32 gemv": x.numel() * 4 / best_seconds(lambda: torch.nn.functional.linear(v, x), 9)}
del x
N, K = 2816, 2048  # 1 GiB of distinct expert-sized int8 weights: nothing comes from the caches
qs = [torch.randint(-127, 128, (N, K), dtype=torch.int8) for _ in range(2**30 // (N * K))]
s = torch.rand(N).bfloat16(); v = torch.randn(1, K).bfloat16()
gemv = {"int8pack": len(qs) * (N * K + 2 * N) / best_seconds(lambda: [torch._weight_int8pack_mm(v, q, s) for q in qs], 5)}
from nanoseek.infer.quant import avx512_extension
ext, s32, v32 = avx512_extension(), s.float(), v.float()
if ext is not None:
    gemv["avx512"] = len(qs) * (N * K + 4 * N) / best_seconds(lambda: [ext.int8_gemv(v32, q, s32) for q in qs], 5)
print(json.dumps({"read_bytes_per_s": max(*read.values(), *gemv.values()), "read_probes": {**read, **gemv}, "int8_gemv_bytes_per_s": gemv,
                  "threads": threads}))
"""

CHILD = r"""
import json, os, statistics, sys, time, warnings
warnings.simplefilter("ignore")
import torch
from nanoseek import generate
from nanoseek.infer.int8_load import load_int8_model
from nanoseek.infer.quant import KERNEL_ENV, avx512_works, forget_kernel_choice, int8_kernel
BLOCK = 4
from nanoseek.model import LatentCache
sys.path.insert(0, sys.argv[4])
from v2lite import activated_bytes
path, tokens, threads = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
def hwm():  # bytes: peak resident set of this process
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
base = hwm()
torch.set_num_threads(1)
t = time.perf_counter()
model = load_int8_model(path)
load_s = time.perf_counter() - t
peak = hwm()
torch.set_num_threads(threads)
cfg = model.config
prompt = torch.randint(0, cfg.vocab_size, (1, %d), generator=torch.Generator().manual_seed(0))
kernels = sys.argv[5].split(",") if len(sys.argv) > 5 and sys.argv[5] else []
kernels = [k for k in kernels if k != "avx512" or avx512_works()]  # no compiler or VNNI: not timed
steps = {k or "probed": [] for k in kernels or [""]}
def use(kernel):
    if kernel:
        os.environ[KERNEL_ENV] = kernel
    else:
        os.environ.pop(KERNEL_ENV, None)
    forget_kernel_choice(model)
with torch.no_grad():  # the kernels in turn, BLOCK steps each, over one growing cache
    cache = LatentCache(cfg, 1, prompt.shape[1] + len(steps) * (tokens + BLOCK) + 1)
    nxt = model.forward_cached(prompt, cache, last_only=True).logits[:, -1].argmax(-1, keepdim=True)
    for _ in range(-(-tokens // BLOCK)):
        for kernel in kernels or [""]:
            use(kernel)
            for _ in range(BLOCK):
                t = time.perf_counter()
                nxt = model.forward_cached(nxt, cache, last_only=True).logits[:, -1].argmax(-1, keepdim=True)
                steps[kernel or "probed"].append(time.perf_counter() - t)
use("")
chosen = int8_kernel().name
t = time.perf_counter()
gen = generate(model, [prompt[0].tolist()], max_new_tokens=tokens)[0]
gen_s = time.perf_counter() - t
print(json.dumps({"base_rss": base, "peak_rss": peak, "load_seconds": load_s, "step_seconds": steps,
                  "median_step_seconds": {k: statistics.median(v[1:] or v) for k, v in steps.items()},
                  "probed_kernel": chosen, "generate_seconds": gen_s, "generate_tokens": len(gen),
                  "activated": activated_bytes(model), "final_rss": hwm()}))
""" % PROMPT


# ---- the checkpoint, written tensor by tensor ------------------------------------------------------
def bench_config(layers: int | None):
    from nanoseek import ModelConfig
    cfg = ModelConfig.preset("deepseek-v2-lite")
    return cfg if layers is None else cfg.replace(num_hidden_layers=layers)


def tensor_plan(cfg) -> list[tuple[str, str, tuple]]:
    """(HF key, safetensors dtype, shape) of every tensor save_model would write for `cfg` in bf16."""
    import torch

    from nanoseek import Transformer
    from nanoseek.checkpoint import _storage_dtype, hf_key_map, named_tensors
    with torch.device("meta"):
        model = Transformer(cfg)
    params = dict(named_tensors(model))
    plan = []
    for key, slot in hf_key_map(model).items():
        t = params[slot.name][slot.index] if slot.index else params[slot.name]
        dtype = _storage_dtype(key, t.dtype, torch.bfloat16)
        plan.append((key, "F32" if dtype == torch.float32 else "BF16", tuple(t.shape)))
    return plan


def write_checkpoint(folder: Path, cfg, seed: int = 0) -> int:
    """The bf16 random-weight checkpoint of `cfg` in `folder` (5 GB shards); returns its bytes."""
    import torch

    from nanoseek.checkpoint import plan_shards, shard_names, write_config_and_index
    plan = tensor_plan(cfg)
    sizes = [(key, math.prod(shape) * (4 if dt == "F32" else 2)) for key, dt, shape in plan]
    shards = plan_shards(sizes, 5 * 10**9)
    g = torch.Generator().manual_seed(seed)
    pool = (torch.randn(POOL, generator=g) * STD).bfloat16().view(torch.uint8).numpy().tobytes()
    by_key = {key: (dt, shape) for key, dt, shape in plan}
    folder.mkdir(parents=True, exist_ok=True)
    weight_map = {}
    for name, keys in zip(shard_names(len(shards)), shards):
        write_streamed_shard(folder / name, [(k, *by_key[k]) for k in keys], pool, g)
        weight_map.update(dict.fromkeys(keys, name))
    total = sum(n for _, n in sizes)
    write_config_and_index(folder, cfg, torch.bfloat16, weight_map, total)
    (folder / MARKER).write_text(json.dumps({"layers": cfg.num_hidden_layers, "seed": seed, "bytes": total}))
    return total


def write_streamed_shard(file: Path, items: list[tuple[str, str, tuple]], pool: bytes, g) -> None:
    """A safetensors file written tensor by tensor: the header from the shapes, then each tensor's bytes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for key, dt, shape in items:
        n = math.prod(shape) * (4 if dt == "F32" else 2)
        header[key] = {"dtype": dt, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    with open(file, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for key, dt, shape in items:
            write_random_tensor(f, key, dt, shape, pool, g)


def write_random_tensor(f, key: str, dt: str, shape: tuple, pool: bytes, g) -> None:
    """Norms: ones; the fp32 router gate: N(0, STD) drawn in full; bf16 weights: a window of the pool
    starting at a random element (wrapping around), so no two tensors share their values' order."""
    import torch
    n = math.prod(shape)
    if key.endswith("norm.weight"):
        f.write(torch.ones(n, dtype=torch.bfloat16).view(torch.uint8).numpy().tobytes())
    elif dt == "F32":
        f.write((torch.randn(n, generator=g) * STD).numpy().tobytes())
    else:
        left, at = 2 * n, 2 * int(torch.randint(POOL, (1,), generator=g))
        while left:
            chunk = pool[at:at + left]
            f.write(chunk)
            left -= len(chunk)
            at = 0


def checkpoint_ready(folder: Path, cfg) -> bool:
    try:
        return json.loads((folder / MARKER).read_text())["layers"] == cfg.num_hidden_layers
    except (OSError, ValueError, KeyError):
        return False


# ---- what a decoded token reads --------------------------------------------------------------------
def activated_bytes(model) -> dict[str, int]:
    """Bytes a batch-1 decode step reads from the int8 model, by part (see the module docstring)."""
    from torch import nn

    from nanoseek.infer.quant import Int8Linear, Int8RoutedExperts
    from nanoseek.model.moe import MLP, Gate
    parts: dict[str, float] = {}

    def add(part, n):
        parts[part] = parts.get(part, 0) + n

    def nbytes(*ts):
        return sum(t.numel() * t.element_size() for t in ts if t is not None)

    cfg = model.config
    for name, m in model.named_modules():
        part = ("lm_head" if name == "lm_head" else "attention" if ".self_attn" in name
                else "shared experts" if ".shared_experts" in name else "dense mlp" if ".mlp" in name
                else "mtp" if name.startswith("mtp.") else "other")
        if name.startswith("mtp."):
            continue  # plain decoding runs no MTP module
        if isinstance(m, Int8Linear):
            add(part, nbytes(m.q, m.scale_bf16, m.bias))
        elif isinstance(m, Int8RoutedExperts):
            add("routed experts", cfg.num_experts_per_tok / m.n_experts
                * nbytes(m.gate_up_q, m.gate_up_scale_bf16, m.down_q, m.down_scale_bf16))
        elif isinstance(m, nn.Linear):  # kept in fp32 (kv_b_proj)
            add(part, nbytes(m.weight, m.bias))
        elif isinstance(m, Gate):
            add("router", nbytes(m.weight, m.e_score_correction_bias))
        elif isinstance(m, nn.Embedding):
            add("other", m.weight[0].numel() * m.weight.element_size())
        elif not isinstance(m, MLP) and hasattr(m, "weight") and not list(m.children()):
            add(part, nbytes(m.weight))  # norms
    out = {k: int(v) for k, v in parts.items()}
    out["total"] = sum(out.values())
    return out


# ---- runs --------------------------------------------------------------------------------------------
def run_json(args: list[str], env: dict | None = None) -> dict:
    import os
    proc = subprocess.run([sys.executable, "-c", *args], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})})
    if proc.returncode != 0:
        sys.exit(f"error: the bench subprocess failed (exit {proc.returncode}): "
                 f"{(proc.stderr.strip().splitlines() or ['no output'])[-1]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def int8_model_bytes(cfg) -> int:
    """Bytes of the int8 model's tensors (q, scales, the fp32 rest), from the meta device."""
    import torch

    from nanoseek import Transformer
    from nanoseek.infer.quant import quantize_int8
    with torch.device("meta"):
        model = quantize_int8(Transformer(cfg))
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])


def mem_available() -> int:
    for line in open("/proc/meminfo"):
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=None, help="a truncated model of N layers (quick checks)")
    ap.add_argument("--dir", type=Path, default=None,
                    help="the checkpoint folder (default /tmp/v2lite_ckpt, /tmp/v2lite_ckpt_L{N} with --layers)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint afterwards (it is reused when present)")
    ap.add_argument("--tokens", type=int, default=32, help="greedy tokens decoded at batch 1 (default 32)")
    ap.add_argument("--threads", type=int, default=2, help="threads for the decode and the bandwidth probe")
    ap.add_argument("--kernels", default="avx512,int8pack",
                    help="int8 kernels decoded in turn, 4 steps each (NANOSEEK_INT8_KERNEL; default avx512,int8pack; "
                         "'' for the probed one only); the headline is the probed kernel's, what --quantize int8 runs")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--prepare", action="store_true",
                    help="only write the checkpoint (outside the timing lock) and keep it for the next run")
    args = ap.parse_args()
    if args.layers is not None and args.layers < 1:
        sys.exit("error: --layers must be at least 1")
    suffix = "" if args.layers is None else f"_L{args.layers}"
    folder = args.dir or Path(f"/tmp/v2lite_ckpt{suffix}")
    out = args.out or Path(f"bench/results/v2lite{suffix.replace('_', '-')}.json")
    cfg = bench_config(args.layers)

    if checkpoint_ready(folder, cfg):
        disk, write_s = sum(p.stat().st_size for p in folder.glob("*.safetensors")), None
        print(f"checkpoint: reusing {folder} ({disk / 1e9:.2f} GB)")
    else:
        if folder.exists():
            shutil.rmtree(folder)
        t = time.perf_counter()
        write_checkpoint(folder, cfg)
        write_s = time.perf_counter() - t
        disk = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
        print(f"checkpoint: wrote {folder} ({disk / 1e9:.2f} GB) in {write_s:.0f}s")
    if args.prepare:
        return
    try:
        need, avail = int8_model_bytes(cfg), mem_available()
        if avail < need + 2e9:
            sys.exit(f"error: the int8 model needs ~{need / 1e9:.1f} GB and {avail / 1e9:.1f} GB are available: "
                     "not loading it (run with fewer --layers or when memory is free)")
        probe = run_json([PROBE, str(args.threads)])
        res = run_json([CHILD, str(folder), str(args.tokens), str(args.threads), str(Path(__file__).parent),
                        args.kernels])
    finally:
        if not args.keep:
            shutil.rmtree(folder, ignore_errors=True)
    report(cfg, folder, disk, write_s, need, probe, res, args, out)


def report(cfg, folder, disk, write_s, need, probe, res, args, out: Path):
    from nanoseek.params import count_parameters
    c = count_parameters(cfg)
    counts = {"total": c.total, "activated": c.activated}
    act = res["activated"]
    bw = probe["read_bytes_per_s"]
    per_kernel = {k: 1 / v for k, v in res["median_step_seconds"].items()}
    chosen = res["probed_kernel"]
    tok_s = per_kernel.get(chosen, per_kernel.get("probed", max(per_kernel.values())))
    roof = bw / act["total"]
    gen_tok_s = res["generate_tokens"] / res["generate_seconds"]
    result = {
        "config": "deepseek-v2-lite" + ("" if args.layers is None else f" truncated to {args.layers} layers"),
        "layers": cfg.num_hidden_layers, "params": counts, "checkpoint_bytes": disk, "write_seconds": write_s,
        "int8_model_bytes": need, "peak_rss_bytes": res["peak_rss"], "base_rss_bytes": res["base_rss"],
        "load_seconds": res["load_seconds"], "decode_tokens": args.tokens, "threads": args.threads,
        "probed_kernel": chosen, "decode_tok_s": tok_s, "decode_tok_s_by_kernel": per_kernel,
        "fraction_of_roofline_by_kernel": {k: v / (bw / act["total"]) for k, v in per_kernel.items()},
        "generate_tok_s": gen_tok_s,
        "activated_bytes": act, "bandwidth_bytes_per_s": bw, "bandwidth_probes": probe["read_probes"], "int8_gemv_bytes_per_s": probe["int8_gemv_bytes_per_s"],
        "roofline_tok_s": roof, "fraction_of_roofline": tok_s / roof,
        "step_seconds": res["step_seconds"],
        "targets": {"peak_rss_at_most_20GB": res["peak_rss"] <= RSS_TARGET,
                    "decode_at_least_70pct_roofline": tok_s / roof >= ROOFLINE_TARGET},
    }
    rows = [("parameters (total / activated)", f"{counts['total'] / 1e9:.2f}B / {counts['activated'] / 1e9:.2f}B"),
            ("checkpoint on disk (bf16)", f"{disk / 1e9:.2f} GB"),
            ("int8 model tensors", f"{need / 1e9:.2f} GB"),
            ("peak RSS of the load (VmHWM)", f"{res['peak_rss'] / 1e9:.2f} GB (interpreter {res['base_rss'] / 1e9:.2f})"),
            ("load seconds (1 thread)", f"{res['load_seconds']:.1f}"),
            (f"decode b1 tok/s ({args.threads} threads, median step)", f"{tok_s:.2f} (probed kernel {chosen}; "
             + ", ".join(f"{k} {v:.2f} = {v / roof:.0%}" for k, v in per_kernel.items()) + ")"),
            ("decode b1 tok/s via nanoseek.generate", f"{gen_tok_s:.2f}"),
            ("activated bytes per token", f"{act['total'] / 1e9:.3f} GB  ("
             + ", ".join(f"{k} {v / 1e6:.0f} MB" for k, v in act.items() if k != "total") + ")"),
            (f"read bandwidth ({args.threads} threads, 1 GiB)", f"{bw / 1e9:.1f} GB/s  ("
             + ", ".join(f"{k} {v / 1e9:.1f}" for k, v in probe["read_probes"].items()) + ")"),
            ("int8 GEMV read rate (1 GiB of experts)", ", ".join(
                f"{k} {v / 1e9:.1f} GB/s" for k, v in probe["int8_gemv_bytes_per_s"].items())),
            ("roofline tok/s", f"{roof:.2f}"),
            ("fraction of roofline", f"{tok_s / roof:.0%}")]
    print(f"\n{result['config']}")
    for k, v in rows:
        print(f"  {k:<46}{v}")
    for name, ok in result["targets"].items():
        print(f"  target {name}: {'holds' if ok else 'does not hold'}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {out}" + ("" if args.keep else f"; removed {folder}"))


if __name__ == "__main__":
    main()
