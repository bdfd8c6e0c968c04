"""Task classification for task-aware expert loading (eMoE §2.4).

Contract:
  - `TaskClassifier(tasks=None)`: keyword/regex rules per task (defaults: the demo model's domains shakespeare,
    python, wiki; `tasks={"name": [regex, ...]}` adds or replaces tasks). `classify(prompt) -> task` picks the task
    whose rules match most of the prompt (match count per 100 characters); with no match it falls back to the
    learned classifier if one was fitted (`fit(labelled)`, a character-3-gram naive Bayes), else `default`.
  - `NGramBayes`: the cheap learned classifier (multinomial naive Bayes on character 3-grams), `fit`/`classify`.
  - `accuracy(classify, labelled)`: share of (text, task) pairs classified right.
"""

from __future__ import annotations

import math
import re
from collections import Counter

TASKS = ("shakespeare", "python", "wiki")


DEFAULT_RULES: dict[str, list[str]] = {
    # speaker tags, archaic pronouns and verbs, stage words
    "shakespeare": [r"(?m)^[A-Z][A-Za-z ]{1,30}:\s*$", r"\b(?:thou|thee|thy|thine|hath|doth|art|ay|nay|'tis|o')\b",
                    r"\b(?:lord|king|queen|duke|sir|madam|prithee|methinks|ere|wherefore)\b", r"(?m)^[A-Z]{3,}[A-Z ]*:"],
    # keywords, indentation, dunder names, calls and punctuation typical of Python source
    "python": [r"\b(?:def|class|import|from|return|self|None|elif|lambda|yield|raise|except|True|False)\b",
               r"(?m)^ {4,}\S", r"__\w+__", r"\w\(\w*\)?:?\s*$", r"[()\[\]{}=:]\s*(?:#.*)?$", r"\w+\.\w+\("],
    # WikiText's tokenisation (" , ", " @-@ ", "= = heading = ="), years, encyclopaedic vocabulary
    "wiki": [r" [,.;:] ", r" @[-.,]@ ", r"(?m)^ ?=+ [^=\n]+ =+ ?$", r"\b1[5-9]\d\d\b|\b20[0-2]\d\b",
             r"\b(?:century|population|species|album|company|located|released|born|battle|river|city|was)\b"],
}


def _check_rules(tasks: dict) -> dict[str, list[re.Pattern]]:
    if not isinstance(tasks, dict) or not tasks:
        raise ValueError("tasks: expected a non-empty dict {task name: [regex, ...]}")
    out = {}
    for name, rules in tasks.items():
        if not isinstance(name, str) or not name:
            raise ValueError(f"tasks: task names must be non-empty strings, got {name!r}")
        if isinstance(rules, str) or not rules:
            raise ValueError(f"tasks: {name!r} needs a non-empty list of keywords or regexes")
        try:
            out[name] = [re.compile(r) for r in rules]
        except re.error as exc:
            raise ValueError(f"tasks: {name!r}: bad regex ({exc})") from None
    return out


class NGramBayes:
    """Multinomial naive Bayes over character 3-grams (a cheap learned task classifier)."""

    def __init__(self, n: int = 3):
        self.n = n
        self.logp: dict[str, dict[str, float]] = {}
        self.unseen: dict[str, float] = {}
        self.prior: dict[str, float] = {}

    def grams(self, text: str) -> Counter:
        t = text.lower()
        return Counter(t[i: i + self.n] for i in range(max(0, len(t) - self.n + 1)))

    def fit(self, labelled: list[tuple[str, str]]) -> "NGramBayes":
        if not labelled:
            raise ValueError("fit: no labelled prompts")
        counts: dict[str, Counter] = {}
        for task, text in labelled:
            counts.setdefault(task, Counter()).update(self.grams(text))
        vocab = set().union(*counts.values())
        n_docs = Counter(t for t, _ in labelled)
        for task, c in counts.items():
            total = sum(c.values()) + len(vocab)  # add-one smoothing
            self.logp[task] = {g: math.log((v + 1) / total) for g, v in c.items()}
            self.unseen[task] = math.log(1 / total)
            self.prior[task] = math.log(n_docs[task] / len(labelled))
        return self

    def scores(self, text: str) -> dict[str, float]:
        g = self.grams(text)
        return {t: self.prior[t] + sum(v * lp.get(k, self.unseen[t]) for k, v in g.items()) for t, lp in self.logp.items()}

    def classify(self, text: str) -> str:
        s = self.scores(text)
        return max(s, key=s.get)


class TaskClassifier:
    """Keyword rules first; a fitted `NGramBayes` decides prompts no rule matches (or, with `learned_first`, all)."""

    def __init__(self, tasks: dict | None = None, default: str | None = None, extend_defaults: bool = True,
                 learned_first: bool = False):
        rules = dict(DEFAULT_RULES) if (extend_defaults or tasks is None) else {}
        rules.update(tasks or {})
        self.rules = _check_rules(rules)
        self.default = default if default is not None else next(iter(self.rules))
        if self.default not in self.rules:
            raise ValueError(f"default: {self.default!r} is not one of the tasks {', '.join(self.rules)}")
        self.learned: NGramBayes | None = None
        self.learned_first = learned_first

    @property
    def tasks(self) -> list[str]:
        return list(self.rules)

    def fit(self, labelled: list[tuple[str, str]]) -> "TaskClassifier":
        unknown = {t for t, _ in labelled} - set(self.rules)
        if unknown:
            raise ValueError(f"fit: tasks {sorted(unknown)} have no rules; known: {', '.join(self.rules)}")
        self.learned = NGramBayes().fit(labelled)
        return self

    def rule_scores(self, prompt: str) -> dict[str, float]:
        per = 100.0 / max(len(prompt), 1)  # matches per 100 characters: "match most of the prompt"
        return {t: per * sum(len(r.findall(prompt)) for r in rs) for t, rs in self.rules.items()}

    def classify(self, prompt: str) -> str:
        if self.learned_first and self.learned is not None:
            return self.learned.classify(prompt)
        s = self.rule_scores(prompt)
        best = max(s, key=s.get)
        top = sorted(s.values(), reverse=True)
        if top[0] > 0 and (len(top) == 1 or top[0] > top[1]):
            return best
        return self.learned.classify(prompt) if self.learned is not None else (best if top[0] > 0 else self.default)


def accuracy(classify, labelled: list[tuple[str, str]]) -> float:
    return sum(classify(p) == t for t, p in labelled) / len(labelled) if labelled else 0.0
