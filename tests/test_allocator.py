"""The trainers keep freed memory for reuse on a CPU (nanoseek.train.allocator): a large tensor
allocated again after it was freed lands on warm pages instead of fresh ones the kernel must zero.
Measured by the process's minor page faults, in a fresh interpreter (the setting is process-wide)."""

import json
import os
import subprocess
import sys

import pytest

from nanoseek.train.allocator import _glibc

CHILD = r"""
import json, resource, sys, torch
from nanoseek.train.allocator import keep_freed_memory
kept = keep_freed_memory()
def faults_of_a_fresh_64mb_tensor():
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(16 * 2**20).fill_(1.0)  # 64 MB, freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
faults_of_a_fresh_64mb_tensor()  # the first time pages are always new
print(json.dumps({"kept": kept, "faults": sorted(faults_of_a_fresh_64mb_tensor() for _ in range(5))}))
"""


def child(env_value: str | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k != "NANOSEEK_KEEP_FREED_MEMORY"}
    if env_value is not None:
        env["NANOSEEK_KEEP_FREED_MEMORY"] = env_value
    out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(_glibc() is None, reason="glibc's mallopt only")
def test_freed_memory_is_reused_without_page_faults():
    kept = child(None)
    assert kept["kept"] is True
    # 64 MB is 16,384 pages of 4 KB; reused, next to none fault. Not always: when the main arena's lock
    # is contended glibc may serve the thread from another arena, too small for 64 MB (fresh pages)
    assert kept["faults"][2] < 200  # the median of 5
    default = child("0")  # the opt-out leaves malloc as it was: every 64 MB block is fresh pages
    assert default["kept"] is False
    assert default["faults"][0] > 4000


def test_a_bad_setting_is_an_error_naming_it(monkeypatch):
    """NANOSEEK_KEEP_FREED_MEMORY takes 0 or 1: "false" must not quietly mean "keep"."""
    from nanoseek.errors import ConfigError
    from nanoseek.train.allocator import keep_freed_memory
    monkeypatch.setenv("NANOSEEK_KEEP_FREED_MEMORY", "false")
    with pytest.raises(ConfigError, match="NANOSEEK_KEEP_FREED_MEMORY='false'"):
        keep_freed_memory()
