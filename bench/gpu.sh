#!/usr/bin/env bash
# One GPU, a few minutes: bf16 against fp32 for a training step and greedy decoding of bench-192m and a
# ~1B-parameter MoE; prints a table (tokens/s, MFU, peak memory, greedy equality with fp32 over 32
# tokens) and writes bench/results/gpu.json. Then the CUDA-only tests (pytest -m cuda).
#   bash bench/gpu.sh                 # needs CUDA
#   bash bench/gpu.sh --cpu --tiny    # smoke test of the script on a CPU (seconds)
# PYTHON overrides the interpreter (default: .venv/bin/python when there is one, else python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
"$PYTHON" -c 'import torch; print(f"torch {torch.__version__}, cuda {torch.version.cuda}, "
                                   f"available: {torch.cuda.is_available()}")'
"$PYTHON" bench/gpu_check.py "$@"
if [[ " $* " != *" --cpu "* ]]; then
    "$PYTHON" -m pytest -q -p no:cacheprovider -m cuda tests
fi
