"""Text of the three demo domains for prompts and held-out scoring.

Contract:
  - `data_dir(path=None, required=True)`: THE data folder of every data-reading command and helper: `path` (the
    `--data-dir` flag) if given, else $MOELITE_DATA_DIR, else ../shared/data beside the checkout. A folder named
    by the flag or the variable that does not exist is always an error naming both; the default missing is an
    error only when `required` (else None).
  - `corpus_prompts(task, n, split, seed)` / `corpus_text(task, chars)`: prompts and text of the three domains
    (Tiny Shakespeare, WikiText-2 test, the interpreter's standard library); split "train" takes the first 70% of
    each source, "test" the rest, so predictors and classifiers are scored on unseen prompts.
  - `mixed_stream(prompts_by_task, n, run_len, seed)`: a request stream whose task changes in runs.
"""

from __future__ import annotations

import os
import re
from collections import Counter
import random
import sysconfig
from pathlib import Path

from moelite.emoe.classifier import TASKS

#: the environment variable that names the data folder (the `--data-dir` flag wins over it)
DATA_ENV = "MOELITE_DATA_DIR"
#: the data folder when neither the flag nor the variable names one: ../shared/data beside the checkout
BESIDE_CHECKOUT = Path(__file__).resolve().parents[3] / "shared" / "data"


def data_dir(path: str | Path | None = None, required: bool = True) -> Path | None:
    """The data folder (see the module contract)."""
    named = path or os.environ.get(DATA_ENV) or None
    p = Path(named) if named else BESIDE_CHECKOUT
    if p.is_dir():
        return p
    if named is None and not required:
        return None
    if path:
        how = "--data-dir"
    else:
        how = f"${DATA_ENV}" if named else f"the default ../shared/data (no --data-dir, no ${DATA_ENV})"
    raise ValueError(f"data_dir: {p} does not exist (from {how}); give the folder that holds tinyshakespeare/ and "
                     f"wikitext-2/ with --data-dir or ${DATA_ENV}")


def _source(task: str, root: Path) -> list[str]:
    """Documents of a task in a fixed order (the split cuts this list)."""
    if task == "shakespeare":
        text = (root / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
        return [b.strip("\n") for b in text.split("\n\n") if len(b) > 80]  # speeches, each with its speaker line
    if task == "wiki":
        lines = (root / "wikitext-2" / "test.txt").read_text(encoding="utf-8").splitlines()
        return [ln for ln in lines if len(ln) > 200 and not ln.lstrip().startswith("=")]  # article paragraphs
    if task == "python":
        base = Path(sysconfig.get_paths()["stdlib"])
        files = sorted(p for p in base.glob("*.py") if p.stat().st_size < 200_000)
        docs = []
        for f in files:
            text = f.read_text(encoding="utf-8", errors="replace")
            docs += [b for b in re.split(r"\n(?=def |class |    def )", text) if len(b) > 120]
        return docs
    raise ValueError(f"task: {task!r} has no built-in corpus; use one of {', '.join(TASKS)}")


_DOCS: dict = {}


def _docs(task: str, split: str, root: Path) -> list[str]:
    if split not in ("train", "test"):
        raise ValueError(f"split: {split!r} is not one of train, test")
    key = (task, str(root))
    if key not in _DOCS:
        _DOCS[key] = _source(task, root)
    docs = _DOCS[key]
    cut = int(len(docs) * 0.7)
    return docs[:cut] if split == "train" else docs[cut:]


def corpus_prompts(task: str, n: int, split: str = "train", seed: int = 0, chars: int = 200,
                   root: str | Path | None = None) -> list[str]:
    """n prompts of about `chars` characters (cut at a word boundary) from distinct documents of a task."""
    docs = _docs(task, split, data_dir(root))
    rng = random.Random(f"{task}-{split}-{seed}")
    picks = rng.sample(range(len(docs)), min(n, len(docs)))
    out = []
    for i in picks:
        d = docs[i]
        cut = d[:chars]
        sp = cut.rfind(" ", chars // 2)
        out.append(cut[:sp] if sp > 0 and len(d) > chars else cut)
    return out


def corpus_text(task: str, chars: int = 4000, root: str | Path | None = None) -> str:
    """Held-out ("test" split) text of a task for perplexity: consecutive documents up to `chars` characters."""
    out, n = [], 0
    for d in _docs(task, "test", data_dir(root)):
        out.append(d)
        n += len(d) + 2
        if n >= chars:
            break
    return ("\n\n" if task != "wiki" else "\n").join(out)[:chars]


def mixed_stream(prompts_by_task: dict[str, list[str]], n: int, run_len: tuple[int, int] = (3, 8),
                 seed: int = 0) -> list[tuple[str, str]]:
    """n (task, prompt) pairs with tasks interleaved in runs of run_len[0]..run_len[1] prompts (as a service sees
    them: users of one kind arrive together); prompts of a task are used round-robin."""
    if not prompts_by_task or any(not v for v in prompts_by_task.values()):
        raise ValueError("prompts_by_task: every task needs at least one prompt")
    rng = random.Random(seed)
    tasks, pos, out, prev = sorted(prompts_by_task), Counter(), [], None
    while len(out) < n:
        task = rng.choice([t for t in tasks if t != prev] or tasks)
        for _ in range(rng.randint(*run_len)):
            ps = prompts_by_task[task]
            out.append((task, ps[pos[task] % len(ps)]))
            pos[task] += 1
        prev = task
    return out[:n]
