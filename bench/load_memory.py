"""Peak RSS while loading a ~1 GB checkpoint: nanoseek.load_model beside transformers' from_pretrained.

Each load runs in a fresh subprocess so its VmHWM measures that load alone (minus the interpreter and
imports, measured first). Prints a table and writes bench/results/load_memory.json.

    .venv/bin/python bench/load_memory.py [--size-gb 1.0] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CHILD = r"""
import sys, time, json, warnings
warnings.simplefilter("ignore")
import torch
which, path = sys.argv[1], sys.argv[2]
if which == "nanoseek":
    import nanoseek
else:
    import transformers
def hwm_kb():  # peak resident set of this process (ru_maxrss would include the parent's, kept over exec)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
base = hwm_kb()
t = time.perf_counter()
if which == "nanoseek":
    m = nanoseek.load_model(path, dtype=torch.float32)
else:
    m = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
dt = time.perf_counter() - t
peak = hwm_kb()
n = sum(p.numel() * p.element_size() for p in m.parameters())
print(json.dumps({"base_kb": base, "peak_kb": peak, "param_bytes": n, "seconds": dt}))
"""


def make_checkpoint(folder: Path, size_gb: float) -> int:
    import torch

    from nanoseek import ModelConfig, Transformer, save_model
    # bench-192m-like shape scaled in depth to reach the requested size in fp32
    cfg = ModelConfig.preset("bench-192m", num_nextn_predict_layers=0)
    per_layer = 4 * cfg.n_routed_experts * 3 * cfg.hidden_size * cfg.moe_intermediate_size
    layers = max(2, round(size_gb * 1e9 / per_layer))
    cfg = cfg.replace(num_hidden_layers=layers)
    torch.manual_seed(0)
    save_model(Transformer(cfg), folder)
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def measure(which: str, folder: Path) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, which, str(folder)], capture_output=True, text=True,
                         check=True)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    r["load_rss_bytes"] = (r["peak_kb"] - r["base_kb"]) * 1024
    return r


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size-gb", type=float, default=1.0)
    ap.add_argument("--out", default="bench/results/load_memory.json")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "ckpt"
        t = time.perf_counter()
        disk = make_checkpoint(folder, args.size_gb)
        print(f"checkpoint: {disk / 1e9:.2f} GB on disk, written in {time.perf_counter() - t:.1f}s")
        rows = {name: measure(name, folder) for name in ("nanoseek", "transformers")}
    print(f"\n{'loader':<14}{'peak RSS over baseline':>24}{'x checkpoint size':>20}{'seconds':>10}")
    for name, r in rows.items():
        print(f"{name:<14}{r['load_rss_bytes'] / 1e9:>21.2f} GB{r['load_rss_bytes'] / disk:>20.2f}"
              f"{r['seconds']:>10.2f}")
    result = {"checkpoint_bytes": disk, **rows,
              "ratio_nanoseek_vs_transformers": rows["nanoseek"]["load_rss_bytes"]
              / rows["transformers"]["load_rss_bytes"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
