"""The eMoE load rule: which experts to preload for the running requests.

Contract:
  - `load_scores(running, freq, sens, out_tokens)` -> N [L, E]: N_i = (sum of input tokens of the running requests
    of a task + T * expected output tokens) * s * f_i, summed over task types.
  - `plan_preload(scores, slots, scope)` -> [(layer_pos, expert)]: the top-L experts per layer (cache_scope
    "layer": L = slots per layer) or the top experts over all layers ("global"), best first, positive scores only.
"""

from __future__ import annotations

import numpy as np

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
