"""Per-task layer sensitivity to randomised routing (eMoE §2.4), and the routing overrides it uses.

Contract:
  - `profile_sensitivity(engine, prompts_by_task, ...)`: per task, routing is randomised progressively from the
    input side (MoE layers 0..j) through the engine's routing hook; greedy continuations are compared with the
    exact model's; layer j is *insensitive* (s = 0) when the similarity with layers 0..j randomised stays >= the
    threshold (once it drops, that layer and all deeper ones are sensitive).
  - `similarity(ref, gen)` -> token agreement (position-wise) and n-gram F1 (mean over n = 1..4) of two token lists.
  - `random_router`, `routing_override` (a context manager: a routing hook for the calls inside, prefill
    included; `engine.request(hook=...)` underneath, so it ends with the block), `reroute_to_resident` (a lossy
    hook that sends missing experts to resident ones). Hooks have the engine's hook type,
    fn(ctx: moe_layer.RouteContext, layer, block, routing, alpha) -> Routing.
"""

from __future__ import annotations

from collections import Counter

import numpy as np
import torch

from moelite.core.arch.base import Routing
from moelite.core.substitution import resident_mask

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


def random_router(adapter, layers: set[int], seed: int = 0):
    """A routing hook that replaces the routing of `layers` by k distinct random experts per token (combine
    weights from the gate's scores of those experts, as the architecture weighs them)."""
    gen = torch.Generator().manual_seed(seed)

    def hook(ctx, layer: int, block, routing: Routing, alpha) -> Routing:
        if layer not in layers:
            return routing
        n, e = routing.probs.shape  # [N, E]
        k = routing.idx.shape[1]
        idx = torch.rand(n, e, generator=gen).argsort(dim=-1)[:, :k].to(routing.idx.device)  # [N, k]
        w = adapter.weigh(block, routing.probs, idx).to(routing.weights.dtype)  # [N, k]
        return Routing(routing.probs, routing.choice, idx, w)

    return hook


class routing_override:
    """Context manager: `hook` routes prefill and decode of the calls inside (the engine's own hook again on
    exit, exceptions included); generate with substitution_alpha > 0 (e.g. `ON`) so the hook runs."""

    ON = 0.5

    def __init__(self, engine, hook):
        self.engine, self.hook = engine, hook
        self._call = None

    def __enter__(self):
        self._call = self.engine.request(hook=self.hook, in_prefill=True)
        self._call.__enter__()
        return self

    def __exit__(self, *exc):
        call, self._call = self._call, None
        return call.__exit__(*exc)


def reroute_to_resident(ctx, layer: int, block, routing: Routing, alpha) -> Routing:
    """eMoE's lossy miss handling as a routing hook: every token's top-k is re-chosen among the
    experts of `layer` now resident, by the architecture's own ranking (`routing.choice`), i.e. a non-resident
    selection is replaced by the next-ranked resident expert. With fewer than k residents the routing is kept
    (exact path). `alpha` is ignored (the hook runs while alpha > 0). Replaced selections are marked in
    `Routing.substituted`, so the expert manager counts them as substitutions, not as exact hits."""
    probs, choice, idx = routing.probs, routing.choice, routing.idx  # [N, E], [N, E], [N, k]
    n, e = probs.shape
    k = idx.shape[1]
    res = resident_mask(ctx, layer, e, probs.device)  # [E]
    if bool(res.all()) or int(res.sum()) < k:
        return routing
    ranked = torch.where(res[None, :] & torch.isfinite(choice), choice.float(), float("-inf"))  # [N, E]
    new_idx = torch.topk(ranked, k, dim=-1).indices  # [N, k] best resident experts per token
    kept = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, idx, True).gather(1, new_idx)  # [N, k]
    if bool(kept.all()):
        return routing
    weights = ctx.adapter.weigh(block, probs, new_idx)  # [N, k] by their own gate scores
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
