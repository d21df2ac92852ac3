"""The package's imports flow one way (DESIGN.md): no module imports one above it, not even inside a
function (bench/imports_graph.py reads every import with ast and exits 1 on an arrow that goes up)."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_no_import_goes_up_the_layering():
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "imports_graph.py")], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    forbidden = [line.strip() for line in proc.stdout.splitlines() if "FORBIDDEN" in line or "UNPLACED" in line]
    assert proc.returncode == 0 and not forbidden, "\n".join(forbidden) or proc.stderr
