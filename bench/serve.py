"""Inference benchmarks: nanoseek's Engine against transformers' `generate`, the HTTP server under
concurrent clients, and self-speculative decoding with the MTP head.

1. decode: greedy tokens/s at batch 1 and 8 (32-token prompts, `--new-tokens` each, prefill included)
   on one checkpoint: nanoseek's Engine, `nanoseek.generate`, transformers' `generate` (the tokens are
   checked to agree).
2. server: `nanoseek serve` in a subprocess; 1, 8 and 32 concurrent clients each send completions
   (ignore_eos, fixed length); completion tokens/s and latency, speed-up over 1 client (sequential).
3. MTP: acceptance rate and speed-up of `--speculative` on (a) the benchmark model with random weights
   (worst case: drafts rejected), (b) a small model trained here for `--train-steps` on Python source,
   (c) the toy model that memorized its replies (best case).

    .venv/bin/python bench/serve.py [--config bench-8m] [--new-tokens 128] [--quick]

Prints a table and writes bench/results/serve.json. Timings depend on the machine's load: compare
rows of one run, not runs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the toy model is a test fixture

from nanoseek import ModelConfig, Transformer, generate, load_model, save_model  # noqa: E402
from nanoseek.infer import Engine, SamplingParams, load_tokenizer  # noqa: E402
from toy import CONVERSATIONS, make_toy_chat_model  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402

warnings.simplefilter("ignore")
ROOT = Path(__file__).resolve().parents[1]


# ---- checkpoints ----------------------------------------------------------------------------------
def python_source(max_bytes: int) -> list[str]:
    """Real text available everywhere: the running interpreter's standard library."""
    texts, size = [], 0
    for f in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        text = f.read_text(encoding="utf-8", errors="ignore")
        texts.append(text)
        size += len(text)
        if size >= max_bytes:
            break
    return texts


def make_checkpoint(folder: Path, config: str, tok: Tokenizer) -> Path:
    cfg = ModelConfig.preset(config, num_nextn_predict_layers=1)
    torch.manual_seed(0)
    save_model(Transformer(cfg), folder)
    tok.save(folder)
    return folder


def train_small(folder: Path, tok: Tokenizer, texts: list[str], steps: int) -> Path:
    """A small model (MTP depth 1) trained briefly on Python source: a realistic MTP acceptance."""
    cfg = ModelConfig.preset("tiny", vocab_size=tok.vocab_size, num_nextn_predict_layers=1)
    torch.manual_seed(0)
    model = Transformer(cfg)
    ids = torch.tensor([t for text in texts for t in tok.encode(text)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    rng = random.Random(0)
    B, T = 8, 128
    model.train()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small matrices: one thread is faster
    for step in range(steps):
        starts = [rng.randrange(len(ids) - T - 2) for _ in range(B)]
        batch = torch.stack([ids[s:s + T + 2] for s in starts])
        logits, (mtp,) = model(batch[:, :T], return_mtp=True)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, 1:T + 1].flatten())
        loss = loss + torch.nn.functional.cross_entropy(mtp.flatten(0, 1), batch[:, 2:T + 1].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  train step {step}: loss {loss.item():.2f} (main + MTP)", file=sys.stderr)
    torch.set_num_threads(threads)
    model.eval()
    save_model(model, folder)
    tok.save(folder)
    return folder


# ---- 1. decode ------------------------------------------------------------------------------------
def bench_decode(path: Path, new_tokens: int, repeats: int) -> list[dict]:
    import transformers
    transformers.logging.set_verbosity_error()  # the MTP layer is unknown to transformers: it says so at length
    model = load_model(path, dtype=torch.float32)
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    rows = []
    for batch in (1, 8):
        prompts = [[(7 * b + 3 * i) % 4000 + 10 for i in range(32)] for b in range(batch)]
        params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)

        def engine():
            return [r.output_ids for r in Engine(model, max_batch=batch).generate(prompts, params)]

        def engine_spec():
            return [r.output_ids for r in Engine(model, max_batch=batch, speculative=True).generate(prompts, params)]

        def api():
            return generate(model, prompts, max_new_tokens=new_tokens)

        def reference():
            with torch.no_grad():
                out = hf.generate(torch.tensor(prompts), attention_mask=torch.ones(batch, 32, dtype=torch.long),
                                  max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                  eos_token_id=None, pad_token_id=0)
            return out[:, 32:].tolist()

        results = race({"nanoseek Engine": engine, "nanoseek.generate": api,
                        "nanoseek Engine --speculative": engine_spec, "transformers generate": reference}, repeats)
        outputs = [tokens for _, tokens in results.values()]
        for name, (seconds, _) in results.items():
            rows.append({"batch": batch, "impl": name, "tokens_per_s": batch * new_tokens / seconds,
                         "seconds": seconds, "tokens_agree": all(o == outputs[0] for o in outputs)})
    return rows


def race(fns: dict, repeats: int) -> dict:
    """name -> (best seconds, output): one warm-up each, then `repeats` rounds taking turns, so a
    machine's changing load falls on every contender alike."""
    best = {name: (float("inf"), fn()) for name, fn in fns.items()}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            out = fn()
            best[name] = (min(best[name][0], time.perf_counter() - t), out)
    return best


# ---- 2. server ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_server(path: Path, new_tokens: int, requests: int, threads: int, speculative: bool) -> list[dict]:
    import httpx
    port = free_port()
    cmd = [sys.executable, "-m", "nanoseek", "serve", str(path), "--port", str(port), "--max-batch", "32",
           "--max-waiting", "64", "--log-level", "warning", "--threads", str(threads)]
    if speculative:
        cmd.append("--speculative")
    server = subprocess.Popen(cmd, cwd=ROOT, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                if httpx.get(url + "/health").status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline or server.poll() is not None:
                raise RuntimeError("the server did not start")
            time.sleep(0.2)
        body = {"prompt": "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
                "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}
        rows = []
        asyncio.run(run_clients(url, body, 2, 2))  # warm-up
        for clients in (1, 8, 32):
            total = max(requests, clients)
            seconds, latencies, tokens = asyncio.run(run_clients(url, body, clients, total))
            rows.append({"clients": clients, "requests": total, "seconds": seconds,
                         "tokens_per_s": tokens / seconds, "requests_per_s": total / seconds,
                         "mean_latency_s": sum(latencies) / len(latencies), "speculative": speculative})
        base = rows[0]["tokens_per_s"]
        for r in rows:
            r["speedup_vs_sequential"] = r["tokens_per_s"] / base
        return rows
    finally:
        server.terminate()
        server.wait(30)


async def run_clients(url: str, body: dict, clients: int, total: int):
    import httpx
    queue = list(range(total))
    latencies, tokens = [], 0

    async def client(http):
        nonlocal tokens
        while queue:
            queue.pop()
            t = time.perf_counter()
            r = await http.post(url + "/v1/completions", json=body)
            r.raise_for_status()
            latencies.append(time.perf_counter() - t)
            tokens += r.json()["usage"]["completion_tokens"]

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=64)) as http:
        t = time.perf_counter()
        await asyncio.gather(*(client(http) for _ in range(clients)))
        return time.perf_counter() - t, latencies, tokens


# ---- 3. MTP ---------------------------------------------------------------------------------------
def bench_mtp(name: str, path: Path, prompts: list[list[int]], params: SamplingParams, repeats: int) -> dict:
    model = load_model(path, dtype=torch.float32)
    tok = load_tokenizer(path)
    engines = []

    def run(spec: bool):
        e = Engine(model, tok, max_batch=1, speculative=spec)
        engines.append(e)
        return [e.generate([p], params)[0].output_ids for p in prompts]  # batch 1, one by one

    results = race({False: lambda: run(False), True: lambda: run(True)}, repeats)
    (t0, plain), (t1, spec_tokens) = results[False], results[True]
    engine = engines[-1]  # the last speculative run
    n = sum(len(t) for t in plain)
    return {"model": name, "acceptance_rate": engine.acceptance_rate(), "tokens": n,
            "tokens_per_step": n / max(1, engine.stats["steps"]), "plain_tokens_per_s": n / t0,
            "speculative_tokens_per_s": n / t1, "speedup": t0 / t1, "identical_tokens": plain == spec_tokens}


# ---- report ---------------------------------------------------------------------------------------
def table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> str:
    lines = [title, "  " + "  ".join(f"{h:>{w}}" for h, _, w in ((c[0], c[1], c[2]) for c in columns))]
    for r in rows:
        cells = []
        for head, key, width in columns:
            v = r[key]
            cells.append(f"{v:>{width}.2f}" if isinstance(v, float) else f"{str(v):>{width}}")
        lines.append("  " + "  ".join(cells))
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="bench-8m", help="preset of the decode / server model (random weights)")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--requests", type=int, default=32, help="requests per server run (at least the clients)")
    ap.add_argument("--train-steps", type=int, default=400, help="training steps of the MTP acceptance model")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads for the in-process runs (default 1: small models, shared machines)")
    ap.add_argument("--server-threads", type=int, default=1,
                    help="torch threads of the server process (the clients use the rest)")
    ap.add_argument("--quick", action="store_true", help="fewer tokens and requests, one repeat")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "serve.json")
    args = ap.parse_args()
    if args.quick:
        args.new_tokens, args.requests, args.train_steps = 32, 8, 150
    repeats = 1 if args.quick else 3
    torch.set_num_threads(args.threads)
    result = {"machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
                          "threads": args.threads, "server_threads": args.server_threads},
              "config": args.config, "new_tokens": args.new_tokens}

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        clock = time.perf_counter()
        print("building checkpoints ...", file=sys.stderr)
        texts = python_source(2_000_000)
        tok = Tokenizer.train(texts, vocab_size=4096)
        ckpt = make_checkpoint(tmp / "bench", args.config, tok)
        trained = train_small(tmp / "trained", tok, texts, args.train_steps)
        toy = make_toy_chat_model(tmp / "toy")

        print(f"decode ... (after {time.perf_counter() - clock:.0f} s)", file=sys.stderr)
        result["decode"] = bench_decode(ckpt, args.new_tokens, repeats)
        print(f"MTP ... (after {time.perf_counter() - clock:.0f} s)", file=sys.stderr)
        source = "".join(texts)
        code_prompts = [tok.encode(source[i:i + 400])[:32] for i in range(100_000, 500_000, 100_000)]
        toy_tok = load_tokenizer(toy)
        chats = [toy_tok.chat_prompt([{"role": "user", "content": q}])[0] for q, _, _ in CONVERSATIONS]
        result["mtp"] = [
            bench_mtp(f"{args.config} (random weights)", ckpt, code_prompts,
                      SamplingParams(max_tokens=args.new_tokens, ignore_eos=True), repeats),
            bench_mtp(f"tiny trained {args.train_steps} steps on Python source", trained, code_prompts,
                      SamplingParams(max_tokens=args.new_tokens, ignore_eos=True), repeats),
            bench_mtp("toy (memorized replies, until EOS)", toy, chats, SamplingParams(max_tokens=200), repeats)]
        print(f"server ... (after {time.perf_counter() - clock:.0f} s)", file=sys.stderr)
        result["server"] = bench_server(ckpt, min(args.new_tokens, 64), args.requests, args.server_threads, False)

    print(table(f"\ndecode, greedy, 32-token prompts + {args.new_tokens} new tokens ({args.config}, "
                f"{args.threads} threads)", result["decode"],
                [("batch", "batch", "5"), ("implementation", "impl", "30"), ("tok/s", "tokens_per_s", "9"),
                 ("agree", "tokens_agree", "5")]))
    print(table(f"\nserver ({args.config}, {min(args.new_tokens, 64)} tokens per completion, "
                f"server on {args.server_threads} thread(s))", result["server"],
                [("clients", "clients", "7"), ("requests", "requests", "8"), ("tok/s", "tokens_per_s", "8"),
                 ("req/s", "requests_per_s", "6"), ("latency s", "mean_latency_s", "9"),
                 ("x sequential", "speedup_vs_sequential", "12")]))
    print(table("\nself-speculative decoding with MTP (batch 1, greedy)", result["mtp"],
                [("model", "model", "44"), ("accept", "acceptance_rate", "6"), ("tok/step", "tokens_per_step", "8"),
                 ("plain tok/s", "plain_tokens_per_s", "11"), ("spec tok/s", "speculative_tokens_per_s", "10"),
                 ("speed-up", "speedup", "8"), ("same", "identical_tokens", "5")]))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
