"""A small built-in prompt set in the demo model's three domains (for traces, benchmarks and prediction).

Written for moelite (not copied from any data set). `load_prompts(path)` reads a user file instead: one prompt
per line, or JSON lines with {"prompt": ..., "domain": ...}."""

from __future__ import annotations

import json
from pathlib import Path

PROMPTS: list[tuple[str, str]] = [
    ("shakespeare", "ROMEO:\nWhat light is this that breaks upon the"),
    ("shakespeare", "KING HENRY:\nNow, lords, to arms! the field is"),
    ("shakespeare", "First Citizen:\nBefore we proceed any further, hear"),
    ("shakespeare", "JULIET:\nO gentle night, thou art the"),
    ("shakespeare", "HAMLET:\nWhat is a man, if his chief good"),
    ("shakespeare", "DUKE:\nGo to, my lord; the matter stands"),
    ("python", "def read_config(path):\n    \"\"\"Read a configuration file.\"\"\"\n    with open(path) as f:\n"),
    ("python", "import os\nimport sys\n\n\nclass Cache:\n    def __init__(self, size):\n        self."),
    ("python", "    for key, value in sorted(items.items()):\n        if value is None:\n"),
    ("python", "def _parse(self, text):\n        tokens = text.split()\n        result = []\n"),
    ("python", "try:\n    import threading\nexcept ImportError:\n    threading = None\n\n\ndef "),
    ("python", "    def __repr__(self):\n        return '%s(%r)' % (self.__class__.__name__, "),
    ("wiki", " = Battle of the river = \n\n The battle was fought in the early"),
    ("wiki", " The city is located on the northern bank of the river , and its population"),
    ("wiki", " In 1954 , the company released its first album , which"),
    ("wiki", " The species is found in the forests of South America , where it"),
    ("wiki", " = = Early life = = \n\n He was born in a small village near"),
    ("wiki", " The cathedral was built in the 12th century and"),
]


def load_prompts(path: str | Path | None = None) -> list[tuple[str, str]]:
    if path is None:
        return list(PROMPTS)
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompts: file {path.name!r} does not exist (one prompt per line, or JSON lines "
                         "with 'prompt' and optional 'domain')")
    out = []
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        if line.lstrip().startswith("{"):
            try:
                obj = json.loads(line)
                out.append((str(obj.get("domain", "default")), str(obj["prompt"])))
            except (ValueError, KeyError) as exc:
                raise ValueError(f"prompts: {path.name} line {n}: expected JSON with a 'prompt' field") from exc
        else:
            out.append(("default", line.replace("\\n", "\n")))
    if not out:
        raise ValueError(f"prompts: {path.name!r} holds no prompts")
    return out
