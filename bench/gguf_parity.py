"""nanoseek against llama.cpp on the same weights: `nanoseek export gguf`, then greedy tokens, logits,
tokenization and speed.

For bench-8m and bench-192m (random weights, three seeds), variants of bench-8m (V2-style routing with
no q LoRA and tied embeddings; YaRN with mscale != mscale_all_dim; all layers dense) and a trained demo
model:
- greedy agreement: 64 new tokens after a 32-token prompt (llama.cpp with flash attention off and an
  f32 KV cache: its flash attention rounds K/V to f16, which flips near-ties of random weights);
- the largest |logit difference| at the first step;
- the demo model: the same greedy chat replies as `nanoseek chat` on three prompts (f32 and q8_0), the
  chat template rendered by llama-cpp-python's Jinja formatter tokenizing to nanoseek's prompt ids;
- llama.cpp's tokenizer against nanoseek's on mixed English / Chinese / digit / special-token text;
- speed (same weights, f32; llama.cpp q8_0 as well): decode tokens/s at batch 1 (32-token prompt, 128
  new tokens, prefill included) and prefill tokens/s (256 tokens), the two engines alternating, median
  of the rounds. llama.cpp runs with llama-cpp-python's defaults here (flash attention off, f16 KV).

llama.cpp runs in a worker process from a side environment (bench/.llama-env, llama-cpp-python 0.3.36
built from source on first use: ~7-10 minutes on 2 cores; never part of `make test`). Prints tables and
writes bench/results/gguf_parity.json.

    .venv/bin/python bench/gguf_parity.py [--demo RUN/model] [--quick] [--no-timing | --timing-only]
                                          [--threads N] [--rounds N]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ENV = HERE / ".llama-env"
LLAMA_CPP_PYTHON = "llama-cpp-python==0.3.36"
MIXED_TEXT = [
    "The quick brown fox jumps over the lazy dog. It's 2024; I'VE paid $1,234,567.89 for 3 apples!",
    "我想在苹果公司工作，每天写代码 1314151 行。这是一个测试：中文、English 和数字 42 混在一起。",
    "def f(x):\n    return x ** 2  # 平方\n\n\n\tindented\t tabs   and  spaces \n",
    "<｜User｜>What is 123 + 4567?<｜Assistant｜><think>\n先算个位 3+7=10\n</think>\n\n<answer>4690</answer>"
    "<｜end▁of▁sentence｜>",
    "emoji 🦙🚀 and accents: café naïve Ünïcödé — “quotes” 'single' ...!!! ???",
]


# ==== the llama.cpp worker (runs in the side environment: llama_cpp and numpy only) ==================
def worker() -> None:
    """JSON commands on stdin, one per line; one JSON answer per line on stdout."""
    import numpy as np

    import llama_cpp
    from llama_cpp import llama_cpp as lib
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    default_params = lib.llama_model_default_params
    state = {"llm": None, "extra_bufts": True, "load_mtp": False}

    def model_params():  # llama-cpp-python has no arguments for these (q8_0 MLA crashes on AMX with
        p = default_params()  # extra buffer types on; MTP blocks load only with load_mtp)
        p.use_extra_bufts = state["extra_bufts"]
        p.load_mtp = state["load_mtp"]
        return p
    lib.llama_model_default_params = model_params

    def logits(llm):
        return np.ctypeslib.as_array(lib.llama_get_logits_ith(llm.ctx, -1), shape=(llm.n_vocab(),)).copy()

    def greedy(llm, prompt, n, stop=None):
        llm.reset()
        llm.eval(prompt)
        first = logits(llm)
        out, last = [], first
        for _ in range(n):
            tok = int(np.argmax(last))
            out.append(tok)
            if tok == stop:
                break
            llm.eval([tok])
            last = logits(llm)
        return out, first

    for line in sys.stdin:
        cmd = json.loads(line)
        op, reply = cmd["op"], {}
        if op == "load":
            state["llm"] = None
            state["extra_bufts"] = cmd.get("extra_bufts", True)
            state["load_mtp"] = cmd.get("load_mtp", False)
            kw = dict(n_ctx=cmd.get("n_ctx", 512), n_threads=cmd["threads"], n_threads_batch=cmd["threads"],
                      verbose=False, vocab_only=cmd.get("vocab_only", False))
            if cmd.get("exact"):  # flash attention off (the default here too) and an f32 KV cache
                kw.update(flash_attn=False, type_k=lib.GGML_TYPE_F32, type_v=lib.GGML_TYPE_F32)
            state["llm"] = llama_cpp.Llama(cmd["path"], **kw)
        elif op == "tokenize":
            reply["ids"] = [state["llm"].tokenize(t.encode(), add_bos=False, special=True) for t in cmd["texts"]]
        elif op == "chat_prompt":  # the GGUF's chat template, rendered as llama-cpp-python's chat API does
            llm = state["llm"]
            meta = llm.metadata
            fmt = Jinja2ChatFormatter(meta["tokenizer.chat_template"], eos_token=llm._model.token_get_text(
                llm.token_eos()), bos_token=llm._model.token_get_text(llm.token_bos()))
            rendered = fmt(messages=cmd["messages"])
            reply["ids"] = llm.tokenize(rendered.prompt.encode(), add_bos=not rendered.added_special, special=True)
        elif op == "greedy":
            out, first = greedy(state["llm"], cmd["prompt"], cmd["n"], cmd.get("stop"))
            reply = {"tokens": out, "first_logits": first.tolist()}
        elif op == "time_decode":
            t0 = time.perf_counter()
            greedy(state["llm"], cmd["prompt"], cmd["n"])
            reply["seconds"] = time.perf_counter() - t0
        elif op == "time_prefill":
            llm = state["llm"]
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(cmd["prompt"])
            logits(llm)
            reply["seconds"] = time.perf_counter() - t0
        print(json.dumps(reply), flush=True)


class LlamaWorker:
    """The worker process, driven from the main (torch) environment."""

    def __init__(self, python: Path):
        self.proc = subprocess.Popen([str(python), __file__, "--worker"], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, bufsize=1)

    def __call__(self, op: str, **kw) -> dict:
        self.proc.stdin.write(json.dumps({"op": op, **kw}) + "\n")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"llama.cpp worker died during {op!r} (exit {self.proc.wait()})")
        return json.loads(line)

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def ensure_llama_env() -> Path:
    """The side environment's python with llama_cpp importable; built from source when missing."""
    python = ENV / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import llama_cpp"],
                                          capture_output=True).returncode == 0:
        return python
    base = Path(sys.base_prefix) / "bin" / "python3"
    print(f"building {LLAMA_CPP_PYTHON} from source into {ENV} (~7-10 minutes on 2 cores) ...", flush=True)
    subprocess.run([str(base), "-m", "venv", str(ENV)], check=True)
    env = dict(os.environ, CMAKE_ARGS="-DGGML_NATIVE=ON", CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    subprocess.run([str(python), "-m", "pip", "install", "-q", LLAMA_CPP_PYTHON, "numpy"], check=True, env=env)
    return python


# ==== the nanoseek side ============================================================================
def build_tokenizer(folder: Path):
    """A 4,096-token BPE trained on Python's standard library plus the mixed sample texts."""
    from nanoseek.tokenizer import Tokenizer
    lib = Path(os.__file__).parent
    texts = [p.read_text(encoding="utf-8", errors="ignore") for p in sorted(lib.glob("*.py"))[:150]]
    tok = Tokenizer.train(texts + MIXED_TEXT * 50, vocab_size=4096)
    tok.save(folder)
    return tok


CONFIGS = {  # name: (preset, overrides, seeds)
    "bench-8m": ("bench-8m", {}, (0, 1, 2)),
    "bench-192m": ("bench-192m", {}, (0, 1, 2)),
    "bench-8m-v2": ("bench-8m", dict(model_type="deepseek_v2", q_lora_rank=None, scoring_func="softmax",
                                     topk_method="greedy", norm_topk_prob=False, tie_word_embeddings=True), (0,)),
    "bench-8m-yarn": ("bench-8m", dict(rope_scaling=dict(factor=8.0, original_max_position_embeddings=64,
                                                         beta_fast=32, beta_slow=1, mscale=0.707,
                                                         mscale_all_dim=1.0)), (0,)),
    "bench-8m-dense": ("bench-8m", dict(n_routed_experts=0, n_shared_experts=0, first_k_dense_replace=4), (0,)),
}


def random_model(name: str, seed: int, folder: Path, tokenizer_dir: Path):
    import shutil

    import torch

    from nanoseek import ModelConfig, Transformer, save_model
    preset, overrides, _ = CONFIGS[name]
    torch.manual_seed(seed)
    model = Transformer(ModelConfig.preset(preset, **overrides))
    model.init_weights()
    save_model(model, folder)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / f, folder / f)
    return model.eval()


def nanoseek_greedy(model, prompt: list[int], n: int, stop: int | None = None) -> tuple[list[int], list[float]]:
    import torch

    from nanoseek import generate
    with torch.inference_mode():
        first = model(torch.tensor([prompt]))[0, -1].float()
    out = generate(model, [prompt], max_new_tokens=n, eos_token_id=stop if stop is not None else [])[0]
    return out, first.tolist()


def agreement(a: list[int], b: list[int]) -> int:
    """Leading tokens that agree."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def max_diff(a: list[float], b: list[float]) -> float:
    return max(abs(x - y) for x, y in zip(a, b))


# ==== the runs =====================================================================================
def parity_random(llama, name: str, seeds, work: Path, tok_dir: Path, threads: int, n: int) -> dict:
    import random

    from nanoseek.export import export_gguf
    rows = []
    for seed in seeds:
        folder = work / f"{name}-s{seed}"
        model = random_model(name, seed, folder, tok_dir)
        rng = random.Random(seed)
        prompt = [rng.randrange(7, 4096) for _ in range(32)]
        ours, our_logits = nanoseek_greedy(model, prompt, n)
        gguf_path = work / f"{name}-s{seed}.gguf"
        export_gguf(folder, gguf_path, "f32")
        llama("load", path=str(gguf_path), threads=threads, exact=True)
        r = llama("greedy", prompt=prompt, n=n)
        rows.append({"seed": seed, "agree": agreement(ours, r["tokens"]), "n": n,
                     "max_logit_diff": max_diff(our_logits, r["first_logits"])})
        print(f"  {name} seed {seed}: {rows[-1]['agree']}/{n} greedy tokens agree, first-step max "
              f"|dlogit| {rows[-1]['max_logit_diff']:.2e}", flush=True)
    return {"config": name, "type": "f32", "runs": rows}


def demo_model(path: str | None, work: Path) -> Path:
    """--demo, or a quick demo trained here (about a minute)."""
    if path:
        return Path(path)
    from nanoseek.demo import DemoSettings, run_demo
    print("training a quick demo model (no --demo given) ...", flush=True)
    run_demo(work / "demo", DemoSettings.quick(), progress=False)
    return work / "demo" / "model"


def parity_demo(llama, folder: Path, work: Path, threads: int, n_chat: int) -> dict:
    """`nanoseek chat`'s greedy replies (the serving engine) against llama.cpp's, f32 and q8_0."""
    from nanoseek.export import export_gguf
    from nanoseek.infer.sampling import SamplingParams
    from nanoseek.serve import load_engine
    from nanoseek.tasks import get_task
    engine, tokenizer = load_engine(folder, max_batch=1)
    problems = get_task("addition3").generate(3, seed=123, split="test")
    chats = [[{"role": "user", "content": p.prompt}] for p in problems]
    prompts = [tokenizer.chat_prompt(m)[0] for m in chats]  # what `nanoseek chat` feeds the engine
    eos = tokenizer.eos_ids[0]
    ours = [r.output_ids for r in engine.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n_chat))]
    out = {"model": str(folder), "prompts": [p.prompt for p in problems], "types": {}}
    for type in ("f32", "q8_0"):
        path = work / f"demo-{type}.gguf"
        export_gguf(folder, path, type)
        # f32: MTP blocks loaded too (llama.cpp checks their names and shapes)
        llama("load", path=str(path), threads=threads, exact=True, extra_bufts=type == "f32",
              load_mtp=type == "f32")
        template_ids = [llama("chat_prompt", messages=m)["ids"] for m in chats]
        rows = []
        for prompt, mine, t_ids in zip(prompts, ours, template_ids):
            r = llama("greedy", prompt=prompt, n=n_chat, stop=eos)
            rows.append({"nanoseek": mine, "llama_cpp": r["tokens"], "same": mine == r["tokens"],
                         "agree": agreement(mine, r["tokens"]), "n": len(mine),
                         "template_ids_equal": t_ids == prompt})
        out["types"][type] = rows
        same = sum(r["same"] for r in rows)
        print(f"  demo {type}: {same}/{len(rows)} chat replies identical "
              f"({', '.join(str(r['agree']) + '/' + str(r['n']) for r in rows)} tokens); chat template "
              f"tokenizes to nanoseek's prompt: {all(r['template_ids_equal'] for r in rows)}", flush=True)
    out["reply_text"] = tokenizer.decode(ours[0])
    return out


def tokenizer_check(llama, folders: dict[str, Path], work: Path, threads: int) -> dict:
    from nanoseek.export import export_gguf
    from nanoseek.tokenizer import Tokenizer
    out = {}
    for label, folder in folders.items():
        path = work / f"vocab-{label}.gguf"
        export_gguf(folder, path, "f32")
        llama("load", path=str(path), threads=threads, vocab_only=True)
        theirs = llama("tokenize", texts=MIXED_TEXT)["ids"]
        tok = Tokenizer.load(folder)
        ours = [tok.encode(t) for t in MIXED_TEXT]
        out[label] = {"texts": len(MIXED_TEXT), "equal": sum(a == b for a, b in zip(ours, theirs)),
                      "tokens": sum(map(len, ours))}
        print(f"  tokenizer {label}: {out[label]['equal']}/{len(MIXED_TEXT)} texts give the same ids "
              f"({out[label]['tokens']} tokens)", flush=True)
    return out


def timing(llama, name: str, work: Path, tok_dir: Path, threads: int, rounds: int) -> dict:
    """Decode (32 + 128 new, batch 1) and prefill (256) tokens/s, nanoseek fp32 / llama.cpp f32 / q8_0
    alternating, median over `rounds`."""
    import random

    import torch

    from nanoseek import generate
    from nanoseek.export import export_gguf
    folder = work / f"{name}-s0"
    model = random_model(name, 0, folder, tok_dir)
    files = {t: work / f"{name}-time-{t}.gguf" for t in ("f32", "q8_0")}
    for t, p in files.items():
        export_gguf(folder, p, t)
    rng = random.Random(7)
    short = [rng.randrange(7, 4096) for _ in range(32)]
    long = [rng.randrange(7, 4096) for _ in range(256)]
    new = 128
    times = {k: {"decode": [], "prefill": []} for k in ("nanoseek fp32", "llama.cpp f32", "llama.cpp q8_0")}

    def ours(kind):
        t0 = time.perf_counter()
        with torch.inference_mode():
            if kind == "decode":
                generate(model, [short], max_new_tokens=new, eos_token_id=[])
            else:
                generate(model, [long], max_new_tokens=1, eos_token_id=[])
        return time.perf_counter() - t0

    ours("decode")  # warm-up
    for t, p in files.items():
        llama("load", path=str(p), threads=threads, extra_bufts=t == "f32")
        llama("time_decode", prompt=short, n=8)  # warm-up
        for _ in range(rounds):
            for kind in ("decode", "prefill"):
                times["nanoseek fp32"][kind].append(ours(kind))
                op = "time_decode" if kind == "decode" else "time_prefill"
                times[f"llama.cpp {t}"][kind].append(
                    llama(op, prompt=short if kind == "decode" else long, n=new)["seconds"])
    out = {}
    for engine, d in times.items():
        out[engine] = {"decode_tok_s": new / statistics.median(d["decode"]),
                       "prefill_tok_s": len(long) / statistics.median(d["prefill"]), "rounds": len(d["decode"])}
    return out


# ==== report =======================================================================================
def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def print_tables(results: dict) -> None:
    if not results["random"]:
        return print_timing(results)
    print("\n## Greedy parity (llama.cpp: flash attention off, f32 KV cache)\n")
    print("| model | type | runs | greedy tokens agreeing | first-step max abs logit diff |")
    print("|---|---|---:|---|---:|")
    for r in results["random"]:
        agree = ", ".join(f"{x['agree']}/{x['n']}" for x in r["runs"])
        diff = max(x["max_logit_diff"] for x in r["runs"])
        print(f"| {r['config']} (random, seeds {', '.join(str(x['seed']) for x in r['runs'])}) | {r['type']} | "
              f"{len(r['runs'])} | {agree} | {diff:.1e} |")
    demo = results.get("demo")
    if demo:
        for type, rows in demo["types"].items():
            agree = ", ".join(f"{x['agree']}/{x['n']}" for x in rows)
            same = sum(x["same"] for x in rows)
            print(f"| demo (trained), 3 chat prompts to EOS | {type} | {len(rows)} | {agree} "
                  f"({same}/{len(rows)} replies identical) | - |")
    print("\n## Tokenizer (llama.cpp's on the exported vocabulary vs nanoseek's)\n")
    for label, r in results["tokenizer"].items():
        print(f"- {label}: {r['equal']}/{r['texts']} mixed texts give identical ids ({r['tokens']} tokens)")
    print_timing(results)


def print_timing(results: dict) -> None:
    if results.get("timing"):
        print(f"\n## Speed, tokens/s ({results['machine']['threads']} threads; shared machine; medians of "
              "alternating rounds)\n")
        print("| model | engine | decode b1 (32 + 128 new) | prefill 256 |")
        print("|---|---|---:|---:|")
        for name, engines in results["timing"].items():
            for engine, t in engines.items():
                if isinstance(t, dict):
                    print(f"| {name} | {engine} | {t['decode_tok_s']:,.0f} | {t['prefill_tok_s']:,.0f} |")
        loads = [f"{e['load_average_after']:.1f}" for e in results["timing"].values()]
        print(f"\n(1-minute load average: {results['machine']['load_average_at_start']:.1f} at the start, "
              f"{', '.join(loads)} after each model's timing)")


def main() -> int:
    if "--worker" in sys.argv:
        worker()
        return 0
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", help="a trained demo model folder (default: train a quick demo here)")
    ap.add_argument("--quick", action="store_true", help="one seed, bench-8m only, one timing round")
    ap.add_argument("--no-timing", action="store_true", help="parity only")
    ap.add_argument("--timing-only", action="store_true", help="speed only (no parity runs, no demo)")
    ap.add_argument("--threads", type=int, help="CPU threads of both engines (default: torch's default); "
                    "on a loaded machine 1 thread avoids OpenMP's spinning against other processes")
    ap.add_argument("--rounds", type=int, default=3, help="timing rounds (default 3)")
    ap.add_argument("--tokens", type=int, default=64, help="greedy tokens compared (default 64)")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "gguf_parity.json")
    args = ap.parse_args()
    sys.path.insert(0, str(HERE.parent))
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    python = ensure_llama_env()
    llama = LlamaWorker(python)
    version = subprocess.run([str(python), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                             capture_output=True, text=True).stdout.strip()
    results = {"machine": {"cpu": cpu_name(), "threads": threads,
                           "llama_cpp_python": version, "torch": torch.__version__,
                           "load_average_at_start": os.getloadavg()[0]}, "random": []}
    configs = {"bench-8m": (0,)} if args.quick else {k: v[2] for k, v in CONFIGS.items()}
    try:
        with tempfile.TemporaryDirectory(prefix="gguf-parity-") as tmp:
            work = Path(tmp)
            tok_dir = work / "tokenizer"
            build_tokenizer(tok_dir)
            if not args.timing_only:
                print("parity:", flush=True)
                for name, seeds in configs.items():
                    results["random"].append(parity_random(llama, name, seeds, work, tok_dir, threads,
                                                           args.tokens))
                demo = demo_model(args.demo, work)
                results["demo"] = parity_demo(llama, demo, work, threads, n_chat=256)
                results["tokenizer"] = tokenizer_check(llama, {"bpe-4096 (stdlib + mixed)": work / "bench-8m-s0",
                                                               "demo (byte-level, no merges)": demo}, work, threads)
            if not args.no_timing:
                results["timing"] = {}
                for name in (["bench-8m"] if args.quick else ["bench-8m", "bench-192m"]):
                    print(f"timing {name} ...", flush=True)
                    results["timing"][name] = timing(llama, name, work, tok_dir, threads,
                                                     1 if args.quick else args.rounds)
                    results["timing"][name]["load_average_after"] = os.getloadavg()[0]
    finally:
        llama.close()
    print_tables(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
