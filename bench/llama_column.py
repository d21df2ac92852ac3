"""llama.cpp beside nanoseek on the same weights: the llama.cpp column of bench/perf.py (issue 18).

The model perf.py times is written with `nanoseek export gguf`'s exporter as f32 and q8_0 files and run
by llama.cpp (llama-cpp-python's low-level API, in a worker process of the side environment
bench/.llama-env that bench/gguf_parity.py builds) with the same threads and inputs:
- prefill: one 256-token prompt, the last position's logits;
- decode b1 / b8: greedy, 32-token prompts (all prefilled in one llama_decode), then one llama_decode
  per step with one token of each sequence (llama.cpp's multi-sequence decode: a llama_batch whose
  tokens carry their own sequence id), as many new tokens as nanoseek.generate's rows;
- GRPO rollouts (bench/rollouts.py's shape: 16 prompts x 8 samples, 128 new tokens, T=1): each prompt
  prefilled once into its group's first sequence, its KV copied to the other seven
  (llama_memory_seq_cp), then 128 sequences decoded together, sampled at temperature 1 in numpy.
llama.cpp runs as llama-cpp-python's `Llama` does by default (flash attention off, f16 KV cache,
n_batch 512); each sequence has its own KV stream (kv_unified off), q8_0 without weight repacking
(llama.cpp's repacked q8_0 crashed on MLA's 3-D weights on AMX, see docs/inference.md).

perf.py alternates these runs with its own (`interleaved`), so ratios come from one run. This script
measures the column alone (nanoseek fp32 and int8 against llama.cpp f32 and q8_0, the same random
weights as perf.py, alternating, median of 3), prints the table and which issue-18 targets hold, and
writes bench/results/llama_column.json:

    OMP_NUM_THREADS=2 .venv/bin/python bench/llama_column.py [--configs bench-8m bench-192m]
                                                            [--rollouts demo bench-8m] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gguf_parity import ENV, MIXED_TEXT, LlamaWorker, ensure_llama_env  # noqa: E402  (stdlib only)

TYPES = ("f32", "q8_0")
ENGINES = tuple(f"llama.cpp {t}" for t in TYPES)
SEQ_CTX = 256  # KV cells per sequence: 32 + 64 decode, 24 + 128 rollouts, 256 prefill


# ==== the llama.cpp worker (runs in the side environment: llama_cpp and numpy only) ==================
def worker() -> None:
    """JSON commands on stdin, one per line; one JSON answer per line on stdout ({"error": ...} if an
    op fails). Models stay loaded by name; a context per (name, sequences) is made on first use."""
    import numpy as np

    from llama_cpp import llama_cpp as lib
    from llama_cpp._logger import set_verbose
    set_verbose(False)
    lib.llama_backend_init()
    models, contexts = {}, {}

    def load(name, path, extra_bufts, threads):
        for key in [k for k in contexts if k[0] == name]:
            ctx, batch, _ = contexts.pop(key)
            lib.llama_batch_free(batch), lib.llama_free(ctx)
        if name in models:
            lib.llama_model_free(models.pop(name)[0])
        params = lib.llama_model_default_params()
        params.use_extra_bufts = extra_bufts
        model = lib.llama_model_load_from_file(path.encode(), params)
        if not model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        models[name] = (model, threads)

    def context(name, n_seq):
        if (name, n_seq) not in contexts:
            model, threads = models[name]
            p = lib.llama_context_default_params()
            p.n_ctx, p.n_batch, p.n_ubatch, p.n_seq_max = n_seq * SEQ_CTX, 512, 512, n_seq
            p.n_threads = p.n_threads_batch = threads
            p.flash_attn_type = lib.LLAMA_FLASH_ATTN_TYPE_DISABLED  # llama-cpp-python's Llama default
            p.kv_unified, p.no_perf = False, True  # unified: 2.6x slower at 128 x (24 + 128) here
            ctx = lib.llama_init_from_model(model, p)
            if not ctx:
                raise RuntimeError(f"llama.cpp could not make a context of {n_seq} sequences for {name}")
            n_vocab = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
            contexts[name, n_seq] = (ctx, lib.llama_batch_init(512, 0, 1), n_vocab)
        return contexts[name, n_seq]

    def step(ctx, batch, n_vocab, entries):
        """One llama_decode of [(token, pos, seq, wants_logits)]; the logits asked for, in order."""
        for i, (tok, pos, seq, out) in enumerate(entries):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = tok, pos, 1, out
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(entries)
        rc = lib.llama_decode(ctx, batch)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} for a batch of {len(entries)} tokens")
        n_out = sum(e[3] for e in entries)
        return np.ctypeslib.as_array(lib.llama_get_logits(ctx), shape=(n_out, n_vocab))

    def prefill(prompts, seqs, ctx, batch, n_vocab):
        entries = [(t, i, s, i == len(p) - 1) for p, s in zip(prompts, seqs) for i, t in enumerate(p)]
        return step(ctx, batch, n_vocab, entries)

    def decode(name, prompts, n):
        """Greedy: n new tokens for each prompt, one sequence each."""
        ctx, batch, n_vocab = context(name, 8 if len(prompts) <= 8 else len(prompts))
        lib.llama_memory_clear(lib.llama_get_memory(ctx), True)
        seqs = range(len(prompts))
        toks = prefill(prompts, seqs, ctx, batch, n_vocab).argmax(-1)
        out, pos = [toks], [len(p) for p in prompts]
        for k in range(n - 1):
            toks = step(ctx, batch, n_vocab, [(int(t), p + k, s, True) for t, p, s in zip(toks, pos, seqs)]).argmax(-1)
            out.append(toks)
        return np.stack(out, 1).tolist()

    def rollouts(name, prompts, group, n, seed):
        """Each prompt prefilled once (sequence i * group), its KV copied to the group's other sequences,
        n tokens per sample at temperature 1."""
        rng = np.random.default_rng(seed)
        n_seq = len(prompts) * group
        ctx, batch, n_vocab = context(name, n_seq)
        mem = lib.llama_get_memory(ctx)
        lib.llama_memory_clear(mem, True)
        logits = prefill(prompts, [i * group for i in range(len(prompts))], ctx, batch, n_vocab)
        for i in range(len(prompts)):
            for g in range(1, group):
                lib.llama_memory_seq_cp(mem, i * group, i * group + g, -1, -1)
        logits = np.repeat(logits, group, axis=0)  # (n_seq, vocab): a group's samples share the first
        pos = np.repeat([len(p) for p in prompts], group)
        for k in range(n):
            # temperature 1, no top-k / top-p: Gumbel-max is a draw from softmax(logits)
            u = np.maximum(rng.random(logits.shape, dtype=np.float32), np.finfo(np.float32).tiny)  # log(0)
            toks = (logits - np.log(-np.log(u))).argmax(-1)
            if k == n - 1:
                break
            logits = step(ctx, batch, n_vocab, [(int(t), int(p) + k, s, True)
                                                for s, (t, p) in enumerate(zip(toks, pos))])
        return n_seq * n

    ops = {"load": lambda c: load(c["name"], c["path"], c["extra_bufts"], c["threads"]),
           "decode": lambda c: {"tokens": decode(c["name"], c["prompts"], c["n"])},
           "prefill": lambda c: {"tokens": decode(c["name"], [c["prompt"]], 1)},
           "rollouts": lambda c: {"tokens": rollouts(c["name"], c["prompts"], c["group"], c["n"], c["seed"])}}
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            reply = ops[cmd["op"]](cmd) or {}
        except Exception as e:  # reported to the driver, which raises it with the op's name
            reply = {"error": f"{type(e).__name__}: {e}"}
        print(json.dumps(reply), flush=True)


class Worker(LlamaWorker):
    """gguf_parity's worker driver, running this module's worker and raising the errors it reports."""

    def __init__(self, python: Path):
        self.proc = subprocess.Popen([str(python), str(Path(__file__).resolve()), "--worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1)

    def __call__(self, op: str, **kw) -> dict:
        reply = super().__call__(op, **kw)
        if "error" in reply:
            raise RuntimeError(f"llama.cpp worker, {op}: {reply['error']}")
        return reply


# ==== the driver (main environment) ===============================================================
def side_env_python() -> Path | None:
    """The side environment's python when llama_cpp imports there, else None (never builds)."""
    python = ENV / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import llama_cpp"],
                                          capture_output=True).returncode == 0:
        return python
    return None


def export_pair(model, folder: Path) -> dict[str, Path]:
    """`model` saved to `folder` with a byte-level tokenizer (the GGUF carries one; the runs feed ids),
    then exported as {type: GGUF path} by nanoseek's exporter."""
    from nanoseek import save_model
    from nanoseek.export import export_gguf
    from nanoseek.tokenizer import MIN_VOCAB_SIZE, Tokenizer
    save_model(model, folder)
    Tokenizer.train(MIXED_TEXT, vocab_size=MIN_VOCAB_SIZE).save(folder)
    files = {t: folder.parent / f"{folder.name}-{t}.gguf" for t in TYPES}
    for t, path in files.items():
        export_gguf(folder, path, t)
    return files


class Column:
    """llama.cpp f32 and q8_0 copies of one nanoseek model at a time, as perf.py's {row: (fn, tokens)}."""
    enabled = True

    def __init__(self, python: Path, threads: int):
        self.threads = threads
        self.version = subprocess.run([str(python), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                                      capture_output=True, text=True).stdout.strip()
        self.worker = Worker(python)
        self.tmp = tempfile.TemporaryDirectory(prefix="llama-column-")

    def load(self, model, name: str = "model") -> None:
        """Export `model` (f32, q8_0) and load both files into the worker."""
        files = export_pair(model, Path(self.tmp.name) / name)
        for t, path in files.items():
            self.worker("load", name=t, path=str(path), extra_bufts=t == "f32", threads=self.threads)

    def prefill(self, x) -> dict:
        """{'prefill llama.cpp T': (fn, tokens)} for the (1, T) prompt tensor x."""
        prompt = x[0].tolist()
        return {f"prefill {e}": (lambda t=t: self.worker("prefill", name=t, prompt=prompt), len(prompt))
                for t, e in zip(TYPES, ENGINES)}

    def decode(self, prompts: list[list[int]], new: int) -> dict:
        """{'decode bN llama.cpp T': (fn, tokens)}: greedy, `new` tokens for each of the N prompts."""
        bs = len(prompts)
        return {f"decode b{bs} {e}": (lambda t=t: self.worker("decode", name=t, prompts=prompts, n=new), bs * new)
                for t, e in zip(TYPES, ENGINES)}

    def rollouts(self, prompts: list[list[int]], group: int, new: int) -> dict:
        """{'llama.cpp T': fn}: the GRPO rollout of bench/rollouts.py with a shared prefill per prompt."""
        return {e: (lambda t=t: self.worker("rollouts", name=t, prompts=prompts, group=group, n=new, seed=0))
                for t, e in zip(TYPES, ENGINES)}

    def close(self) -> None:
        self.worker.close()
        self.tmp.cleanup()


class NoColumn:
    """perf.py's stand-in when the side environment is missing: no rows."""
    enabled, version = False, None

    def load(self, model, name: str = "model") -> None:
        pass

    def prefill(self, x) -> dict:
        return {}

    def decode(self, prompts, new) -> dict:
        return {}

    def close(self) -> None:
        pass


def for_perf(build: bool, threads: int) -> Column | NoColumn:
    """perf.py's column: built with --llama, used when the side environment exists, else one note."""
    python = ensure_llama_env() if build else side_env_python()
    if python is None:
        print(f"llama.cpp column skipped: no llama-cpp-python in {ENV} (pass --llama to build it, ~7-10 "
              "minutes on 2 cores)", flush=True)
        return NoColumn()
    return Column(python, threads)


# ==== the table (pure) =============================================================================
def split_row(key: str) -> tuple[str, str] | None:
    """'decode b8 nanoseek int8' -> ('decode b8', 'nanoseek int8'); 'prefill fp32' -> ('prefill', 'fp32');
    None for rows of other phases."""
    words = key.split()
    if words[0] == "prefill" and len(words) > 1:
        return "prefill", " ".join(words[1:])
    if words[0] == "decode" and len(words) > 2 and words[1].startswith("b"):
        return " ".join(words[:2]), " ".join(words[2:])
    return None


def comparison(rows: dict) -> list[dict]:
    """One entry per nanoseek prefill / decode row whose workload llama.cpp ran: {row, tokens_per_s, and
    per llama.cpp engine its tokens/s and our ratio to it}. Transformers' rows are left out."""
    out = []
    for key, r in rows.items():
        split = split_row(key)
        if split is None or split[1] in ENGINES or split[1].startswith("transformers"):
            continue
        theirs = {e: rows[f"{split[0]} {e}"]["tokens_per_s"] for e in ENGINES if f"{split[0]} {e}" in rows}
        if theirs:
            out.append({"row": key, "tokens_per_s": r["tokens_per_s"], "llama_cpp": theirs,
                        "ratios": {e: r["tokens_per_s"] / v for e, v in theirs.items()}})
    return out


def llama_targets(rows: dict) -> list[dict]:
    """Issue 18's targets against llama.cpp for the rows present: our fp32 decode ('decode bN nanoseek')
    at least llama.cpp f32's tokens/s, an int8 decode row at least llama.cpp q8_0's."""
    checks = []
    for c in comparison(rows):
        workload, engine = split_row(c["row"])
        if not workload.startswith("decode"):
            continue
        ref = "llama.cpp q8_0" if "int8" in engine else "llama.cpp f32" if engine == "nanoseek" else None
        if ref in c["ratios"]:
            ratio = c["ratios"][ref]
            checks.append({"goal": f"{c['row']} >= {ref}", "value": ratio, "holds": ratio >= 1})
    return checks


def print_comparison(rows: dict, header: str) -> None:
    entries = comparison(rows)
    if not entries:
        return
    print(header)
    print(f"{'row':<34}{'tokens/s':>10}" + "".join(f"{e:>16}{'ratio':>8}" for e in ENGINES))
    for c in entries:
        cells = "".join(f"{c['llama_cpp'][e]:>16.1f}{c['ratios'][e]:>7.2f}x" if e in c["llama_cpp"] else " " * 24
                        for e in ENGINES)
        print(f"{c['row']:<34}{c['tokens_per_s']:>10.1f}{cells}")
    for t in llama_targets(rows):
        print(f"  {t['goal']:<48}{t['value']:>7.2f}x  {'holds' if t['holds'] else 'MISSED'}")


# ==== this script: the column alone ================================================================
def column_rows(column: Column, name: str, rounds: int, new: int = 64) -> dict:
    """perf.py's prefill and decode workloads on its random `name` model (seed 0, no MTP): nanoseek fp32
    and int8 (quantize_int8) alternating with llama.cpp f32 and q8_0, medians of `rounds`."""
    import copy

    import torch

    from nanoseek import ModelConfig, generate
    from nanoseek.infer.quant import quantize_int8
    from perf import interleaved, random_model
    cfg = ModelConfig.preset(name, num_nextn_predict_layers=0)
    model = random_model(cfg).eval()
    qmodel = quantize_int8(copy.deepcopy(model))
    column.load(model, name)
    batch = torch.randint(0, cfg.vocab_size, (8, 257), generator=torch.Generator().manual_seed(0))
    rows: dict = {}
    x = batch[:1, :256]
    with torch.inference_mode():
        interleaved(rows, {"prefill nanoseek": (lambda: model(x), 256), "prefill nanoseek int8": (lambda: qmodel(x), 256),
                           **column.prefill(x)}, rounds)
    for bs in (1, 8):
        prompts = batch[:bs, :32].tolist()
        interleaved(rows, {
            f"decode b{bs} nanoseek": (lambda p=prompts: generate(model, p, max_new_tokens=new), bs * new),
            f"decode b{bs} nanoseek int8": (lambda p=prompts: generate(qmodel, p, max_new_tokens=new), bs * new),
            **column.decode(prompts, new)}, rounds)
    return rows


def rollout_rows(column: Column, name: str, rounds: int, prompts: int = 16, group: int = 8, new: int = 128,
                 prompt_len: int = 24) -> dict:
    """bench/rollouts.py's rollout (its model and prompts) through nanoseek with prefix reuse, alternating
    with llama.cpp f32 and q8_0: {row: {seconds, tokens_per_s}} of generated tokens, medians."""
    import torch

    import rollouts
    with tempfile.TemporaryDirectory() as tmp:
        model, hf = rollouts.build(name, Path(tmp) / "m")
    ids = torch.randint(0, model.config.vocab_size, (prompts, prompt_len),
                        generator=torch.Generator().manual_seed(0)).tolist()
    ours = rollouts.rollout_fns(model, hf, ids, group, new)["nanoseek prefix reuse"]
    column.load(model, f"rollouts-{name}")
    seconds = rollouts.interleaved({"nanoseek prefix reuse": ours, **column.rollouts(ids, group, new)}, rounds)
    return {"config": name, "prompts": prompts, "group": group, "new_tokens": new, "prompt_len": prompt_len,
            "rows": {k: {"seconds": s, "tokens_per_s": prompts * group * new / s} for k, s in seconds.items()}}


def print_rollouts(res: dict) -> None:
    rows = res["rows"]
    print(f"== {res['config']}: rollouts {res['prompts']} prompts x {res['group']} samples, {res['new_tokens']} "
          f"new tokens, T=1 (tokens/s; medians, alternating)")
    ours = rows["nanoseek prefix reuse"]["tokens_per_s"]
    for key, r in rows.items():
        ratio = "" if key.startswith("nanoseek") else f"   nanoseek prefix reuse / this {ours / r['tokens_per_s']:.2f}x"
        print(f"  {key:<28}{r['tokens_per_s']:>10.0f}{ratio}")


def main() -> int:
    if "--worker" in sys.argv:
        worker()
        return 0
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--configs", nargs="*", default=["bench-8m", "bench-192m"])
    ap.add_argument("--rollouts", nargs="*", default=[], help="rollout configs (bench/rollouts.py's: demo, bench-8m)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=HERE / "results" / "llama_column.json")
    args = ap.parse_args()
    import torch
    torch.set_num_threads(args.threads)
    column = Column(ensure_llama_env(), args.threads)
    results = {"meta": {"threads": args.threads, "llama_cpp_python": column.version, "torch": torch.__version__,
                        "load_average_at_start": os.getloadavg()[0], "started": time.strftime("%Y-%m-%d %H:%M:%S")},
               "configs": {}, "rollouts": {}}
    try:
        for name in args.configs:
            rows = column_rows(column, name, args.rounds)
            results["configs"][name] = {"rows": rows, "comparison": comparison(rows), "targets": llama_targets(rows)}
            print_comparison(rows, f"== {name}: tokens/s, {args.threads} threads (medians of {args.rounds}, alternating)")
        for name in args.rollouts:
            results["rollouts"][name] = rollout_rows(column, name, args.rounds)
            print_rollouts(results["rollouts"][name])
    finally:
        column.close()
    results["meta"]["load_average_after"] = os.getloadavg()[0]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
