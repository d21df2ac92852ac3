"""The base I/O layer every run uses: metrics files, plots and atomic writes. No model imports.

- `MetricsLogger` / `read_metrics`: metrics.jsonl (one JSON object per line) mirrored to TensorBoard.
- `pyplot()` / `save_figure`: matplotlib on the Agg backend (no display needed), PNGs closed after saving.
- `write_text_atomic` / `write_json_atomic`: a reader sees the old file or the new one, never half of one.
- `swap_dir` / `staged_dir`: build a folder beside its target and swap it in with renames, so a failed or
  killed write leaves the old folder as it was.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

METRICS_FILE = "metrics.jsonl"


# ---- metrics ------------------------------------------------------------------------------------
class MetricsLogger:
    """Appends one JSON object per line to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.path = Path(run_dir) / METRICS_FILE
        if resume_step is not None and self.path.exists():  # drop rows written after the checkpoint
            rows = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(r + "\n" for r in rows))
        self.file = open(self.path, "a")
        self.tb = None
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tb = SummaryWriter(str(Path(run_dir) / "tb"))
        except ImportError:  # tensorboard not installed: JSONL only
            pass

    def log(self, row: dict) -> None:
        self.file.write(json.dumps(row) + "\n")
        self.file.flush()
        if self.tb is not None:
            step = row.get("step", 0)
            for key, value in row.items():
                if isinstance(value, (int, float)) and key != "step" and math.isfinite(value):
                    self.tb.add_scalar(key, value, step)

    def close(self) -> None:
        self.file.close()
        if self.tb is not None:
            self.tb.close()


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The rows of run_dir/metrics.jsonl ([] when there is none)."""
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []


# ---- plots --------------------------------------------------------------------------------------
def pyplot():
    """matplotlib.pyplot on the Agg backend (PNG files, no display)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, out: str | Path, dpi: int = 110) -> Path:
    """Lay out, write `fig` to the PNG `out` and close it."""
    fig.tight_layout()
    fig.savefig(out, dpi=dpi)
    pyplot().close(fig)
    return Path(out)


# ---- atomic writes ------------------------------------------------------------------------------
def write_text_atomic(path: str | Path, text: str) -> None:
    """Write `text` (UTF-8) to a temporary file in the same folder, fsync, then rename over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json_atomic(path: str | Path, obj) -> None:
    """`obj` as indented JSON, written atomically (see write_text_atomic)."""
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


def swap_dir(new: Path, target: Path, keep_old: Callable[[str], bool] | None = None) -> None:
    """Rename the folder `new` to `target`. An existing target is set aside first and put back if the
    rename fails; afterwards the entries of the old folder for which `keep_old(name)` holds (and that
    `new` does not have) move into the new one, and the rest is deleted."""
    new, target = Path(new), Path(target)
    old = None
    if target.exists():
        old = new.with_name(new.name + ".old")
        os.replace(target, old)
    try:
        os.replace(new, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is None:
        return
    if keep_old is not None:
        for entry in old.iterdir():
            if keep_old(entry.name) and not (target / entry.name).exists():
                os.replace(entry, target / entry.name)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def staged_dir(target: str | Path, keep_old: Callable[[str], bool] | None = None) -> Iterator[Path]:
    """Yield a fresh folder beside `target` (same file system, so renames are atomic); when the block
    succeeds it replaces `target` through `swap_dir`; on any error it is deleted and `target` is kept.
    Made with mkdir (mode 0777 & ~umask), not mkdtemp's 0700, so the result is not private."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
    tmp.mkdir()
    try:
        yield tmp
        swap_dir(tmp, target, keep_old)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
