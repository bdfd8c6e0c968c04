"""Offline cache simulation on a recorded routing trace, including Belady's optimal policy.

Contract: `simulate(trace, n_slots, policy)` replays the trace's accesses (per request, step and layer: the set of
experts needed) against a cache of `n_slots` slots with the same semantics as the engine (the current layer's
experts are shielded from eviction; global pool) and returns the hit rate. `policy` is any online policy name
("lru", "lfu", "fifo", "score") or "belady": evict the resident expert whose next use is farthest in the future,
which no online policy can beat on the same trace.
"""

from __future__ import annotations

import bisect

import torch

from moelite.core.expert_cache import make_policy
from moelite.core.traces import Trace


def simulate(trace: Trace, n_slots: int, policy: str, decode_only: bool = True, score_window: int = 8) -> dict:
    """Replay every access (prefill included, as it warms the cache); count hits of decode steps only if
    `decode_only`."""
    accesses = list(trace.accesses(decode_only=False))
    if not accesses:
        raise ValueError("trace: no accesses to simulate (record some decode steps first)")
    keys_at = [[(a[2], e) for e in sorted(a[3])] for a in accesses]
    if policy == "belady":
        positions: dict = {}
        for i, ks in enumerate(keys_at):
            for k in ks:
                positions.setdefault(k, []).append(i)

        def next_use(k, i):
            p = positions.get(k, [])
            j = bisect.bisect_right(p, i)
            return p[j] if j < len(p) else float("inf")
        pol = None
    else:
        pol = make_policy(policy, score_window)
    resident: set = set()
    hits = misses = 0
    for i, ((_, _, layer, _, probs), ks) in enumerate(zip(accesses, keys_at)):
        step = accesses[i][1]
        count = not decode_only or step > 0
        if pol is not None and hasattr(pol, "observe_scores") and step > 0:
            pol.observe_scores(layer, torch.from_numpy(probs))
        shield = set(ks)
        for k in ks:
            if k in resident:
                hits += count
                if pol is not None:
                    pol.on_access(k)
                continue
            misses += count
            if len(resident) >= n_slots:
                candidates = [r for r in resident if r not in shield]
                if not candidates:
                    continue  # computed without caching (budget below the layer's needs)
                if pol is None:
                    victim = max(candidates, key=lambda r: next_use(r, i))
                    if next_use(victim, i) < next_use(k, i):
                        continue  # optimal bypass: k is needed later than every resident expert

                else:
                    victim = pol.victim(candidates)
                    pol.on_evict(victim)
                resident.discard(victim)
            resident.add(k)
            if pol is not None:
                pol.on_insert(k)
    total = hits + misses
    return {"policy": policy, "slots": n_slots, "hits": hits, "misses": misses,
            "hit_rate": hits / total if total else 0.0}
