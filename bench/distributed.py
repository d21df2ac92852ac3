"""Training tokens/s on 1 process against 2 processes (FSDP2 data parallel, and FSDP2 + EP=2), launched
by torchrun with gloo on this CPU, with the same recipe and global batch; plus the largest difference
of any logged loss from the single-process run (the correctness check).

On a 2-core machine this proves that the distributed path runs and computes the same thing, not
that it is faster: one process already uses both cores for its matmuls (2 threads), two processes
get one core each and add the collectives (FSDP all-gathers and reduce-scatters, all-to-alls) over
loopback TCP. Prints a table and writes bench/results/distributed.json.

    .venv/bin/python bench/distributed.py [--preset bench-8m] [--steps 12] [--batch-size 8] [--seq-len 128]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nanoseek.data import prepare  # noqa: E402
from nanoseek.tokenizer import Tokenizer  # noqa: E402

WARMUP_STEPS = 2  # steps left out of the rate (first-call allocations, thread pools)


def make_corpus(root: Path, vocab: int) -> Path:
    """A generated text corpus (no network): tokenizer + data folder."""
    rng = random.Random(0)
    words = [f"w{i}" for i in range(300)]
    files = []
    for i in range(40):
        f = root / f"doc{i}.txt"
        f.write_text("\n".join(" ".join(rng.choice(words) for _ in range(20)) for _ in range(200)))
        files.append(f)
    tok = Tokenizer.train((f.read_text() for f in files), vocab_size=vocab)
    tok.save(root / "tok")
    prepare(tok, files, root / "data", progress=False)
    return root / "data"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(name: str, procs: int, ep: int, threads: int, args: list[str], out: Path) -> dict:
    launcher = [sys.executable, "-m", "nanoseek"] if procs == 1 else [
        sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={procs}", "--master_addr=127.0.0.1",
        f"--master_port={free_port()}", "-m", "nanoseek"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads), "NANOSEEK_EP": str(ep)}
    proc = subprocess.run(launcher + ["train", *args, "--out", str(out)], env=env, cwd=REPO, capture_output=True,
                          text=True)
    if proc.returncode:
        sys.exit(f"{name} failed:\n{proc.stderr[-4000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    rates = [r["tokens_per_s"] for r in rows[WARMUP_STEPS:]]
    return {"name": name, "processes": procs, "ep": ep, "threads_per_process": threads,
            "tokens_per_s": statistics.median(rates), "losses": [r["loss"] for r in rows]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", default="bench-8m")
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch-size", type=int, default=8, help="global rows per step")
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "distributed.json")
    a = ap.parse_args()
    cores = os.cpu_count() or 1
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        data = make_corpus(tmp, vocab=1024)
        recipe = ["--data", str(data), "--preset", a.preset, "--model", json.dumps({"vocab_size": 1024}),
                  "--batch-size", str(a.batch_size), "--seq-len", str(a.seq_len), "--max-steps", str(a.steps),
                  "--warmup-steps", "2", "--eval-every", "0", "--save-every", "0", "--progress", "false"]
        load_before = os.getloadavg()[0]
        runs = [run("1 process", 1, 1, min(cores, 2), recipe, tmp / "one"),
                run("1 process, 1 thread", 1, 1, 1, recipe, tmp / "one-thread"),
                run("2 processes, FSDP2", 2, 1, max(cores // 2, 1), recipe, tmp / "fsdp"),
                run("2 processes, FSDP2 + EP=2", 2, 2, max(cores // 2, 1), recipe, tmp / "ep")]
    base = runs[0]
    print(f"{a.preset}, global batch {a.batch_size} x {a.seq_len} tokens, {a.steps} steps (median after "
          f"{WARMUP_STEPS}), {cores} CPU cores, gloo, load average {load_before:.1f} before the runs")
    print(f"{'run':<28} {'threads/proc':>12} {'tokens/s':>10} {'vs 1 proc':>10} {'max |loss diff|':>16}")
    for r in runs:
        r["speedup"] = r["tokens_per_s"] / base["tokens_per_s"]
        r["max_loss_diff"] = max(abs(x - y) for x, y in zip(r["losses"], base["losses"]))
        print(f"{r['name']:<28} {r['threads_per_process']:>12} {r['tokens_per_s']:>10.0f} "
              f"{r['speedup']:>9.2f}x {r['max_loss_diff']:>16.2e}")
    print("On this machine the point is correctness (same losses), not speed-up: with 2 cores, one process "
          "already uses both, 2 processes add collectives over loopback, and other jobs on the machine (see "
          "the load average) disturb multi-threaded runs most.")
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"preset": a.preset, "batch_size": a.batch_size, "seq_len": a.seq_len,
                                 "steps": a.steps, "cpu_cores": cores, "machine": platform.machine(),
                                 "load_average_before": load_before,
                                 "runs": runs}, indent=2))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
