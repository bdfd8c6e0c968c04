"""Task awareness for expert preloading (eMoE §2.4): task classifier, sensitivity profiler, load rule, similarity.

Contract:
  - `TaskClassifier(tasks=None)`: keyword/regex rules per task (defaults: the demo model's domains shakespeare,
    python, wiki; `tasks={"name": [regex, ...]}` adds or replaces tasks). `classify(prompt) -> task` picks the task
    whose rules match most of the prompt (match count per 100 characters); with no match it falls back to the
    learned classifier if one was fitted (`fit(labelled)`, a character-3-gram naive Bayes), else `default`.
  - `NGramBayes`: the cheap learned classifier (multinomial naive Bayes on character 3-grams), `fit`/`classify`.
  - `profile_sensitivity(engine, prompts_by_task, ...)`: per task, routing is randomised progressively from the
    input side (MoE layers 0..j) through the engine's substitution hook; greedy continuations are compared with the
    exact model's; layer j is *insensitive* (s = 0) when the similarity with layers 0..j randomised stays >= the
    threshold (once it drops, that layer and all deeper ones are sensitive).
  - `load_scores(running, freq, sens, out_tokens)` -> N [L, E]: the eMoE load rule N_i = (sum of input tokens of
    the running requests of a task + T * expected output tokens) * s * f_i, summed over task types.
  - `plan_preload(scores, slots, scope)` -> [(layer_pos, expert)]: the top-L experts per layer (cache_scope
    "layer": L = slots per layer) or the top experts over all layers ("global"), best first, positive scores only.
  - `similarity(ref, gen)` -> token agreement (position-wise) and n-gram F1 (mean over n = 1..4) of two token lists.
  - Scoring of expert predictions (used by moelite.predictor): `score(pred [E], counts [E], k, L)` -> top-k accuracy
    (share of the k most used experts among the k predicted), precision/recall of the "hot" sets (experts above a
    uniform share, predicted vs actual), coverage@L (share of the selections inside the top-L predicted: the hit
    rate a preloaded cache of L per layer would see), each with its expectation for a random expert set of the
    same size; `evaluate_a` / `evaluate_l` average it over held-out requests; `table` renders the comparison.
  - `corpus_prompts(task, n, split, seed)` / `corpus_text(task, chars)`: prompts and text of the three domains from
    ../shared/data (Tiny Shakespeare, WikiText-2 test) and the interpreter's standard library; split "train" takes
    the first 70% of each source, "test" the rest, so predictors and classifiers are scored on unseen prompts.
"""

from __future__ import annotations

import math
import os
import time
import random
import re
import sysconfig
from collections import Counter
from pathlib import Path

import numpy as np
import torch

from .arch.base import Routing

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


# ---- corpora ---------------------------------------------------------------------------------------------------
def data_dir(path: str | Path | None = None) -> Path:
    p = Path(path or os.environ.get("MOELITE_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data"))
    if not p.is_dir():
        raise ValueError(f"data_dir: {p} does not exist (needs tinyshakespeare/ and wikitext-2/ from ../shared/data)")
    return p


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


# ---- similarity ------------------------------------------------------------------------------------------------
def similarity(ref: list[int], gen: list[int], n_max: int = 4) -> dict:
    """Token agreement (share of positions of the longer list where both have the same token) and n-gram F1
    averaged over n = 1..n_max (orders neither list is long enough for are skipped)."""
    ref, gen = list(ref), list(gen)
    if not ref and not gen:
        return {"token_agreement": 1.0, "ngram_f1": 1.0}
    agree = sum(a == b for a, b in zip(ref, gen)) / max(len(ref), len(gen))
    f1s = []
    for n in range(1, n_max + 1):
        a = Counter(tuple(ref[i: i + n]) for i in range(len(ref) - n + 1))
        b = Counter(tuple(gen[i: i + n]) for i in range(len(gen) - n + 1))
        if not a and not b:
            continue
        common = sum((a & b).values())
        p = common / max(sum(b.values()), 1)
        r = common / max(sum(a.values()), 1)
        f1s.append(2 * p * r / (p + r) if p + r else 0.0)
    return {"token_agreement": agree, "ngram_f1": float(np.mean(f1s)) if f1s else 0.0}


def greedy(engine, prompt, max_tokens: int, alpha: float = 0.0) -> list[int]:
    """Greedy continuation token ids (eos ignored, so every continuation has max_tokens tokens)."""
    eos, engine.eos_ids = engine.eos_ids, set()
    try:
        return engine.generate(prompt, max_tokens=max_tokens, temperature=0, substitution_alpha=alpha).token_ids
    finally:
        engine.eos_ids = eos


# ---- sensitivity profiling -------------------------------------------------------------------------------------
def random_router(adapter, layers: set[int], seed: int = 0):
    """A `manager.substitute` hook that replaces the routing of `layers` by k distinct random experts per token
    (combine weights from the gate's scores of those experts, as the architecture weighs them)."""
    gen = torch.Generator().manual_seed(seed)

    def hook(manager, layer: int, block, routing: Routing, alpha) -> Routing:
        if layer not in layers:
            return routing
        n, e = routing.probs.shape  # [N, E]
        k = routing.idx.shape[1]
        idx = torch.rand(n, e, generator=gen).argsort(dim=-1)[:, :k].to(routing.idx.device)  # [N, k]
        w = adapter.weigh(block, routing.probs, idx).to(routing.weights.dtype)  # [N, k]
        return Routing(routing.probs, routing.choice, idx, w)

    return hook


class routing_override:
    """Context manager: install a substitution hook on the engine for prefill and decode (restored on exit);
    generate with substitution_alpha > 0 (e.g. `ON`) so the hook runs."""

    ON = 0.5

    def __init__(self, engine, hook):
        self.engine, self.hook = engine, hook

    def __enter__(self):
        m = self.engine.manager
        self.saved = (m.substitute, m.substitute_in_prefill)
        m.substitute, m.substitute_in_prefill = self.hook, True
        return self

    def __exit__(self, *exc):
        m = self.engine.manager
        m.substitute, m.substitute_in_prefill = self.saved


def reroute_to_resident(manager, layer: int, block, routing: Routing, alpha) -> Routing:
    """eMoE's lossy miss handling as a `manager.substitute` hook: every token's top-k is re-chosen among the
    experts of `layer` now resident, by the architecture's own ranking (`routing.choice`), i.e. a non-resident
    selection is replaced by the next-ranked resident expert. With fewer than k residents the routing is kept
    (exact path). `alpha` is ignored (the hook runs while alpha > 0). Replaced selections are marked in
    `Routing.substituted`, so the expert manager counts them as substitutions, not as exact hits."""
    from .substitution import _adapter_of, resident_mask

    probs, choice, idx = routing.probs, routing.choice, routing.idx  # [N, E], [N, E], [N, k]
    n, e = probs.shape
    k = idx.shape[1]
    res = resident_mask(manager, layer, e, probs.device)  # [E]
    if bool(res.all()) or int(res.sum()) < k:
        return routing
    ranked = torch.where(res[None, :] & torch.isfinite(choice), choice.float(), float("-inf"))  # [N, E]
    new_idx = torch.topk(ranked, k, dim=-1).indices  # [N, k] best resident experts per token
    kept = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, idx, True).gather(1, new_idx)  # [N, k]
    if bool(kept.all()):
        return routing
    weights = _adapter_of(manager, block).weigh(block, probs, new_idx)  # [N, k] by their own gate scores
    return Routing(probs, choice, new_idx, weights.to(routing.weights.dtype), ~kept)


def profile_sensitivity(engine, prompts_by_task: dict[str, list], max_tokens: int = 16, threshold: float = 0.85,
                        metric: str = "ngram_f1", seed: int = 0) -> dict:
    """Per task: similarity to the exact model's greedy continuation with MoE layers 0..j randomised, for every
    j; `s[pos]` = 0 for insensitive layers (similarity >= threshold with that layer and all shallower randomised)."""
    if not 0 < threshold <= 1:
        raise ValueError(f"threshold: {threshold!r} must be in (0, 1]")
    if metric not in ("ngram_f1", "token_agreement"):
        raise ValueError(f"metric: {metric!r} is not one of ngram_f1, token_agreement")
    layers = list(engine.layout.layers)
    out = {}
    for task, prompts in prompts_by_task.items():
        refs = [greedy(engine, p, max_tokens) for p in prompts]
        sims = []
        for j in range(len(layers)):
            hook = random_router(engine.adapter, set(layers[: j + 1]), seed)
            with routing_override(engine, hook):
                gens = [greedy(engine, p, max_tokens, alpha=routing_override.ON) for p in prompts]
            sims.append(float(np.mean([similarity(r, g)[metric] for r, g in zip(refs, gens)])))
        s, ok = [], True
        for v in sims:
            ok = ok and v >= threshold
            s.append(0.0 if ok else 1.0)
        out[task] = {"similarity_randomised_through_layer": sims, "s": s,
                     "insensitive_layers": [layers[i] for i, v in enumerate(s) if v == 0.0]}
    return {"threshold": threshold, "metric": metric, "max_tokens": max_tokens, "layers": layers, "tasks": out}


# ---- load rule ---------------------------------------------------------------------------------------------------
def load_scores(running: list[tuple[str, int]], freq: dict[str, np.ndarray], sens: dict[str, list] | None = None,
                out_tokens: dict[str, float] | None = None) -> np.ndarray:
    """eMoE's load rule. running: (task, input tokens) of every running request; freq[task]: predicted expert
    frequencies [L, E]; sens[task]: s per layer [L] (default 1); out_tokens[task]: expected output tokens W_o.
    Returns N [L, E] = sum over tasks of (sum_j W_j + T * W_o) * s * f."""
    if not running:
        raise ValueError("running: no requests to plan for")
    by_task: dict[str, list[int]] = {}
    for task, w in running:
        if task not in freq:
            raise ValueError(f"running: task {task!r} has no predicted frequencies (have {', '.join(freq)})")
        by_task.setdefault(task, []).append(int(w))
    n = None
    for task, ws in by_task.items():
        f = np.asarray(freq[task], dtype=np.float64)  # [L, E]
        s = np.ones(f.shape[0]) if not sens or task not in sens else np.asarray(sens[task], dtype=np.float64)
        wo = (out_tokens or {}).get(task, 0.0)
        term = (sum(ws) + len(ws) * wo) * s[:, None] * f  # [L, E]
        n = term if n is None else n + term
    return n


def plan_preload(scores: np.ndarray, slots: int, scope: str = "layer") -> list[tuple[int, int]]:
    """(layer position, expert) pairs to make resident, best first. scope "layer": top-`slots` per layer;
    "global": top-`slots` over all layers. Only positive scores are planned."""
    if scope not in ("layer", "global"):
        raise ValueError(f"scope: {scope!r} is not one of layer, global")
    scores = np.asarray(scores)
    n_layers, n_exp = scores.shape
    if scope == "layer":
        per = min(slots, n_exp)
        order = np.argsort(-scores, axis=1, kind="stable")[:, :per]  # [L, per]
        pairs = [(int(p), int(e)) for r in range(per) for p, e in ((p, order[p, r]) for p in range(n_layers))]
    else:
        flat = np.argsort(-scores.reshape(-1), kind="stable")[:slots]
        pairs = [(int(i // n_exp), int(i % n_exp)) for i in flat]
    return [(p, e) for p, e in pairs if scores[p, e] > 0]


def register_profile_cli(sub, add_engine_flags, engine_config) -> None:
    """The `moelite predict profile` subcommand (registered by moelite.predictor)."""
    f = sub.add_parser("profile", help="per-task layer sensitivity to randomised routing (offline)")
    f.add_argument("--model", default=None, help="checkpoint folder (default: the demo model)")
    f.add_argument("--prompts-per-task", type=int, default=4)
    f.add_argument("--max-tokens", type=int, default=16)
    f.add_argument("--threshold", type=float, default=0.85)
    f.add_argument("--builtin", action="store_true", help="use the built-in prompts, not ../shared/data corpora")
    f.add_argument("--out", default=None, help="write the profile JSON here")
    add_engine_flags(f)
    f.set_defaults(func=lambda args: profile_cli(args, engine_config(args)))


def profile_cli(args, config) -> int:
    """`moelite predict profile`: the sensitivity profile of the built-in or corpus prompts, as JSON."""
    import json

    from .engine import Engine
    from .prompts import PROMPTS

    if args.prompts_per_task < 1:
        raise ValueError("prompts_per_task: must be >= 1")
    engine = Engine(args.model, config, progress=False)
    if args.builtin:
        by_task = {t: [p for d, p in PROMPTS if d == t][: args.prompts_per_task] for t in TASKS}
    else:
        by_task = {t: corpus_prompts(t, args.prompts_per_task, "test", seed=7) for t in TASKS}
    prof = profile_sensitivity(engine, by_task, args.max_tokens, args.threshold)
    if args.out:
        Path(args.out).write_text(json.dumps(prof, indent=1))
    print(json.dumps(prof))
    return 0


# ---- scoring expert predictions (predictors of moelite.predictor, duck-typed) -------------------------------------
def normalise(c: np.ndarray) -> np.ndarray:
    """Rows to relative frequencies; all-zero rows become uniform."""
    c = np.asarray(c, dtype=np.float64)
    s = c.sum(-1, keepdims=True)
    return np.where(s > 0, c / np.where(s > 0, s, 1), 1.0 / c.shape[-1])


def score(pred: np.ndarray, counts: np.ndarray, k: int, cover: int) -> dict:
    """Metrics of one layer's prediction [E] against actual selection counts [E], and their random expectations."""
    n_e = len(pred)
    top_pred = np.argsort(-pred, kind="stable")
    actual_top = set(np.argsort(-counts, kind="stable")[:k].tolist())
    hot_p = set(np.nonzero(pred > 1.0 / n_e)[0].tolist())
    hot_a = set(np.nonzero(normalise(counts) > 1.0 / n_e)[0].tolist())
    inter = len(hot_p & hot_a)
    total = counts.sum()
    return {
        "topk_accuracy": len(actual_top & set(top_pred[:k].tolist())) / k, "random_topk_accuracy": k / n_e,
        "precision": inter / len(hot_p) if hot_p else 0.0, "random_precision": len(hot_a) / n_e,
        "recall": inter / len(hot_a) if hot_a else 0.0, "random_recall": len(hot_p) / n_e,
        "coverage": counts[top_pred[:cover]].sum() / total if total else 0.0, "random_coverage": cover / n_e,
    }


def _mean(rows: list[dict]) -> dict:
    out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    for m in ("topk_accuracy", "precision", "recall", "coverage"):
        out[f"{m}_vs_random"] = out[m] / out[f"random_{m}"] if out[f"random_{m}"] else 0.0
    return out


def evaluate_a(pred, test: list, k: int, cover: int, classify=None,
               history: list = ()) -> dict:
    """Each test request predicted from the requests before it (the held-out stream in order)."""
    hist, rows, secs = list(history), [], 0.0
    for r in test:
        task = (classify(r.prompt) if classify else r.task) if pred.uses_task else None
        t0 = time.perf_counter()
        p = pred.predict(hist, task)
        secs += time.perf_counter() - t0
        rows += [score(p[i], r.counts[i], k, cover) for i in range(len(p))]
        hist.append(r)
    return dict(_mean(rows), call_ms=1000 * secs / len(test))


def evaluate_l(pred, test: list, k: int, cover: int) -> dict:
    rows, secs = [], 0.0
    for j, r in enumerate(test):
        prev = test[j - 1] if j else None
        t0 = time.perf_counter()
        preds = [pred.predict(r, pos, prev) for pos in range(len(r.counts))]  # one call per layer
        secs += time.perf_counter() - t0
        rows += [score(p, r.counts[pos], k, cover) for pos, p in enumerate(preds)]
    return dict(_mean(rows), call_ms=1000 * secs / len(test))  # all layers of one request


def table(res: dict) -> str:
    head = ("| variant | predictor | top-k acc | random | x | precision | random | recall | random | coverage@L | random "
            "| ms per request |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for v in ("A", "L"):
        for name, m in res[v].items():
            star = " *" if res.get(f"winner_{v}") == name else ""
            lines.append(f"| eMoE-{v} | {name}{star} | {m['topk_accuracy']:.3f} | {m['random_topk_accuracy']:.3f} | "
                         f"{m['topk_accuracy_vs_random']:.2f} | {m['precision']:.3f} | {m['random_precision']:.3f} | "
                         f"{m['recall']:.3f} | {m['random_recall']:.3f} | {m['coverage']:.3f} | "
                         f"{m['random_coverage']:.3f} | {m.get('call_ms', 0):.3f} |")
    return "\n".join(lines) + "\n"
