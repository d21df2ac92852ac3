"""Keep freed memory in the process during CPU training, so the next step's tensors reuse warm pages.

PyTorch's CPU allocator is glibc malloc. malloc serves every block above its mmap threshold (at most
32 MB on 64-bit Linux) with a fresh mmap and gives it back with munmap when freed, so a training
step's large tensors (expert weight stacks' gradients, their bf16 copies: 33-67 MB each for
bench-192m) arrive as new pages that the kernel zeroes on first touch, step after step. Measured on
this repository's CPU (2 threads): `w.float()` of a 16.7M-element bf16 tensor 18.5 ms into fresh
pages against 2.8 ms into a kept buffer; a bench-192m training step 1.10-1.17x faster in fp32 and
1.04x in bf16 with the pages kept (quiet machine; docs/precision.md, bench/perf.py --train-precision).

`keep_freed_memory()` tells glibc to serve all blocks from its heap (M_MMAP_MAX = 0) and never to
trim it (M_TRIM_THRESHOLD): freed blocks stay mapped and are reused, as a caching allocator would.
The process's resident memory then stays at its peak (what a training run reaches every step
anyway). It is process-wide and one-way, so only the trainers call it (pretraining, SFT,
distillation and GRPO on a CPU), never a library import or the server. glibc only; elsewhere, or
with NANOSEEK_KEEP_FREED_MEMORY=0, it does nothing. Large allocations of threads other than the main
one still take mmap where their arena cannot hold them (glibc >= 2.26 falls back to it).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import platform

from ..errors import ConfigError

ENV = "NANOSEEK_KEEP_FREED_MEMORY"  # "0": leave malloc as it is
M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4  # mallopt parameters (malloc.h)
_state = {"kept": False}


def _glibc():
    """glibc's handle, or None on another C library (musl, macOS, Windows)."""
    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse (see the module docstring). Returns whether it is in
    effect: False where it does not apply (not glibc, NANOSEEK_KEEP_FREED_MEMORY=0); another value of
    NANOSEEK_KEEP_FREED_MEMORY than 0 or 1 is a ConfigError naming it."""
    setting = os.environ.get(ENV, "1")
    if setting not in ("0", "1"):
        raise ConfigError(f"{ENV}={setting!r}: expected 1 (keep freed memory for reuse) or 0 (malloc's defaults)")
    if _state["kept"]:
        return True
    if setting == "0":
        return False
    libc = _glibc()
    if libc is None:
        return False
    ok = libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1) == 1
    _state["kept"] = ok
    return ok
