"""Scoring expert predictions against what requests really routed to.

Contract:
  - `score(pred [E], counts [E], k, L)` -> top-k accuracy (share of the k most used experts among the k predicted),
    precision/recall of the "hot" sets (experts above a uniform share, predicted vs actual), coverage@L (share of
    the selections inside the top-L predicted: the hit rate a preloaded cache of L per layer would see), each with
    its expectation for a random expert set of the same size.
  - `evaluate_a` / `evaluate_l` average it over held-out requests; `table` renders the comparison.
"""

from __future__ import annotations

import time

import numpy as np

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
