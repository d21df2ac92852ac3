"""The base I/O layer every run uses: metrics files, plots and atomic writes. No model imports.

- `MetricsLogger` / `read_metrics`: metrics.jsonl (one JSON object per line) mirrored to TensorBoard.
- `pyplot()` / `save_figure`: matplotlib on the Agg backend (no display needed), PNGs closed after saving.
- `write_text_atomic` / `write_json_atomic`: a reader sees the old file or the new one, never half of one.
- `swap_dir` / `staged_dir`: build a folder beside its target and swap it in with renames, so a failed or
  killed write leaves the old folder as it was; `remove_stale_staging`: what a killed writer left.
- `chmod_like_new`: the mode an ordinary new file gets (0666 & ~umask), for files that libraries
  write through mkstemp (0600).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import uuid
from pathlib import Path
from typing import Callable, Iterator

from .errors import DataError

METRICS_FILE = "metrics.jsonl"


# ---- metrics ------------------------------------------------------------------------------------
class MetricsLogger:
    """Appends one JSON object per line to metrics.jsonl and mirrors scalars to TensorBoard."""

    def __init__(self, run_dir: Path, resume_step: int | None = None):
        self.path = Path(run_dir) / METRICS_FILE
        if resume_step is not None and self.path.exists():  # drop rows written after the checkpoint
            rows = [row for row in _read_rows(self.path) if row.get("step", 0) <= resume_step]
            write_text_atomic(self.path, "".join(json.dumps(row) + "\n" for row in rows))
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
    return _read_rows(path) if path.exists() else []


def _read_rows(path: Path) -> list[dict]:
    """The JSON rows of a metrics file. A last line that does not parse is what a kill in the middle of
    a write leaves: it is dropped. A bad line before the last is damage, not a kill: DataError names it."""
    lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if number == len(lines):
                break
            raise DataError(f"{path}:{number}: not a JSON object ({e.msg}); the metrics log is damaged "
                            "before its last line: repair or remove that line") from None
        if not isinstance(row, dict):
            raise DataError(f"{path}:{number}: not a JSON object")
        rows.append(row)
    return rows


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


def current_umask() -> int:
    """The process's umask (from /proc on Linux; elsewhere set and restored, which is not thread-safe)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def chmod_like_new(path: str | Path) -> None:
    """Give `path` the mode of a file made by open(): 0666 & ~umask. safetensors' save_file writes
    through a mkstemp file (always 0600) and renames it, so its files would be private otherwise."""
    os.chmod(path, 0o666 & ~current_umask())


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


STAGING = re.compile(r"\.(?P<target>.+)\.tmp-[0-9a-f]{32}(?P<old>\.old)?")  # names staged_dir gives
LEGACY_STAGING = re.compile(r"\.tmp-step-.*")  # the checkpoint staging folders of earlier versions


def remove_stale_staging(parent: str | Path, target: str, legacy: re.Pattern | None = None) -> list[Path]:
    """Remove what a killed `staged_dir` left in `parent` for targets whose names fully match the regex
    `target`: `.{name}.tmp-{uuid}` folders (a half-built new version) and `.{name}.tmp-{uuid}.old`
    (the old version that `swap_dir` had set aside; when the kill came between its two renames the
    target is missing, and the old version is put back instead of deleted). Entries matching `legacy`
    (older staging names) go too; nothing else is touched. Returns the paths removed or restored.

    Only for a folder that no other process writes at the same time: a live writer's staging folder
    looks exactly like a dead one's. A run folder has one writer (rank 0 of one run), so a run calls
    this on rank 0 before any rank looks at its checkpoints."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    found = []
    for entry in sorted(parent.iterdir()):
        m = STAGING.fullmatch(entry.name)
        if m and re.fullmatch(target, m["target"]):
            found.append((entry, m))
        elif legacy is not None and legacy.fullmatch(entry.name):
            found.append((entry, None))
    handled = []
    for entry, m in found:
        home = parent / m["target"] if m else None
        if m and m["old"] and entry.is_dir() and not home.exists():
            os.replace(entry, home)
        elif entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        handled.append(entry)
    return handled


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
