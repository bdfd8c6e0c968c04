"""Expert cache over the slot pool: which expert sits in which slot, and who is evicted.

Contract:
  - `ExpertCache.lookup(key)` returns the slot of a resident expert (a policy access) or None; `slot(key)` the
    same without telling the policy. The cache counts nothing: hits, misses and evictions are counted once, by
    the expert manager (moelite.core.counters).
  - `ExpertCache.acquire(key)` returns a slot for a new expert, free or taken from the policy's victim among
    unpinned slots of the key's partition (one global partition, or one per MoE layer). The previous owner is
    evicted. `pin`/`unpin` is the protection shield: a pinned expert is never evicted.
  - Policies see accesses and score observations; every policy changes speed only, never output.
  - Capacity is fixed at construction, so resident expert bytes can never exceed the budget.
  - `listeners` are called as fn(key, slot) when `key` becomes resident in `slot` and fn(key, None) when it is
    evicted (the CUDA path mirrors residency into a device slot table with them).
"""

from __future__ import annotations

from collections import OrderedDict, deque

import torch

Key = tuple[int, int]


class Policy:
    name = "base"

    def on_access(self, key: Key) -> None: ...
    def on_insert(self, key: Key) -> None: self.on_access(key)
    def on_evict(self, key: Key) -> None: ...
    def observe_scores(self, layer: int, scores: torch.Tensor) -> None: ...
    def victim(self, candidates: list[Key]) -> Key:
        raise NotImplementedError


class LRUPolicy(Policy):
    name = "lru"

    def __init__(self):
        self.order: OrderedDict[Key, None] = OrderedDict()

    def on_access(self, key):
        self.order[key] = None
        self.order.move_to_end(key)

    def on_evict(self, key):
        self.order.pop(key, None)

    def victim(self, candidates):
        cset = set(candidates)
        for key in self.order:  # oldest first
            if key in cset:
                return key
        return candidates[0]


class FIFOPolicy(LRUPolicy):
    name = "fifo"

    def on_access(self, key):
        self.order.setdefault(key, None)


class LFUPolicy(Policy):
    """Least frequently used; frequency counts survive eviction (so a popular expert returns quickly)."""

    name = "lfu"

    def __init__(self):
        self.count: dict[Key, int] = {}
        self.clock = 0
        self.last: dict[Key, int] = {}

    def on_access(self, key):
        self.clock += 1
        self.count[key] = self.count.get(key, 0) + 1
        self.last[key] = self.clock

    def victim(self, candidates):
        return min(candidates, key=lambda k: (self.count.get(k, 0), self.last.get(k, 0)))


class ScorePolicy(Policy):
    """SMoE Eq. 3: evict the resident expert with the lowest mean gate score over the last n decode iterations.

    Scores of all experts (active or not) are observed per layer; a layer's window keeps its last `window`
    per-iteration score vectors (the mean over the batch's tokens). Ties (and experts of a layer with no
    observation yet, e.g. after prefill only) go to the least recently used. The victim choice is a scan of plain
    Python floats, kept in step with the window at each observation: no tensor op per candidate."""

    name = "score"

    def __init__(self, window: int = 8):
        self.window = window
        self.hist: dict[int, deque] = {}
        self.mean: dict[int, torch.Tensor] = {}  # layer -> window sum [E]
        self._sums: dict[int, list[float]] = {}  # the same, as floats, for victim()
        self.clock = 0
        self.last: dict[Key, int] = {}  # key -> access clock (recency tie-break)

    def on_access(self, key):
        self.clock += 1
        self.last[key] = self.clock

    def on_evict(self, key):
        self.last.pop(key, None)

    def observe_scores(self, layer, scores):
        # running window sum: O(E) per observation
        s = scores.detach().float().cpu()
        h = self.hist.setdefault(layer, deque())
        total = self.mean.get(layer)
        total = s.clone() if total is None else total + s
        h.append(s)
        if len(h) > self.window:
            total -= h.popleft()
        self.mean[layer] = total
        self._sums[layer] = total.tolist()

    def mean_scores(self, layer):
        total = self.mean.get(layer)
        return None if total is None else total / len(self.hist[layer])

    def victim(self, candidates):
        # within a layer the window sum orders like the mean; across layers (global scope) divide by the window
        sums, hist, last = self._sums, self.hist, self.last

        def key(k):
            row = sums.get(k[0])
            return (row[k[1]] / len(hist[k[0]]) if row is not None else -1.0, last.get(k, 0))

        return min(candidates, key=key)


def make_policy(name: str, score_window: int = 8) -> Policy:
    if name == "lru":
        return LRUPolicy()
    if name == "lfu":
        return LFUPolicy()
    if name == "fifo":
        return FIFOPolicy()
    if name == "score":
        return ScorePolicy(score_window)
    raise ValueError(f"cache_policy: {name!r} is not one of lru, lfu, score, fifo")


class ExpertCache:
    def __init__(self, n_slots: int, slot_bytes: int, policy: Policy, layers: list[int], scope: str = "global"):
        self.n_slots, self.slot_bytes, self.policy = n_slots, slot_bytes, policy
        self.owner: list[Key | None] = [None] * n_slots
        self.slot_of: dict[Key, int] = {}
        self.pins: dict[int, int] = {}
        if scope == "layer":
            per = n_slots // len(layers)
            self.partition = {layer: range(i * per, (i + 1) * per) for i, layer in enumerate(layers)}
        else:
            self.partition = {layer: range(n_slots) for layer in layers}
        self.free = {layer: list(reversed(r)) for layer, r in self.partition.items()}
        if scope == "global":  # one shared free list
            shared = list(reversed(range(n_slots)))
            self.free = {layer: shared for layer in layers}
        self.last_evicted: Key | None = None
        self.per_layer = dict.fromkeys(layers, 0)  # layer -> resident experts (`resident_count`)
        self.listeners: list = []
        self.resident_peak = 0

    # ---- queries ---------------------------------------------------------------------------------------------
    def resident(self, key: Key) -> bool:
        return key in self.slot_of

    def resident_count(self, layer: int) -> int:
        """How many of `layer`'s experts are resident (a counter, kept in step by commit and eviction)."""
        return self.per_layer.get(layer, 0)

    def resident_experts(self, layer: int) -> list[int]:
        return [e for (l_, e) in self.slot_of if l_ == layer]

    @property
    def resident_bytes(self) -> int:
        """Bytes of slots holding an expert or a read in flight."""
        return sum(o is not None for o in self.owner) * self.slot_bytes

    def lookup(self, key: Key) -> int | None:
        """The slot of a resident expert (the policy sees an access), else None."""
        slot = self.slot_of.get(key)
        if slot is not None:
            self.policy.on_access(key)
        return slot

    def slot(self, key: Key) -> int | None:
        """The slot of a resident expert, else None; the policy sees nothing."""
        return self.slot_of.get(key)

    # ---- shield ----------------------------------------------------------------------------------------------
    def pin(self, slot: int) -> None:
        self.pins[slot] = self.pins.get(slot, 0) + 1

    def unpin(self, slot: int) -> None:
        n = self.pins.get(slot, 0) - 1
        if n <= 0:
            self.pins.pop(slot, None)
        else:
            self.pins[slot] = n

    def pins_snapshot(self) -> dict[int, int]:
        """A copy of the shield (slot -> pin count), for `restore_pins` after a failed layer."""
        return dict(self.pins)

    def restore_pins(self, pins: dict[int, int]) -> None:
        self.pins = dict(pins)

    # ---- insertion -------------------------------------------------------------------------------------------
    def can_acquire(self, layer: int) -> bool:
        if self.free[layer]:
            return True
        return any(self.owner[s] is not None and s not in self.pins and self.owner[s] in self.slot_of
                   for s in self.partition[layer])

    def acquire(self, key: Key) -> int:
        """A slot for `key` (not resident); evicts the policy's victim if the partition is full."""
        layer = key[0]
        free = self.free[layer]
        self.last_evicted = None
        if free:
            slot = free.pop()
        else:
            candidates = [self.owner[s] for s in self.partition[layer]
                          if self.owner[s] is not None and s not in self.pins and self.owner[s] in self.slot_of]
            if not candidates:
                raise RuntimeError("expert cache: every slot is pinned by the current layer; the budget is below "
                                   "what one layer needs at once")
            victim = self.policy.victim(candidates)
            slot = self.slot_of.pop(victim)
            self.per_layer[victim[0]] -= 1
            self.policy.on_evict(victim)
            for fn in self.listeners:
                fn(victim, None)
            self.last_evicted = victim
        self.owner[slot] = key
        return slot

    def release(self, slot: int) -> None:
        """Give back a slot acquired but not committed (a cancelled or failed load)."""
        key = self.owner[slot]
        if key is not None and self.slot_of.get(key) != slot:
            self.owner[slot] = None
            self.free[key[0]].append(slot)

    def commit(self, key: Key, slot: int) -> None:
        """Record `key` as resident in `slot` once its bytes are loaded."""
        if key not in self.slot_of:
            self.per_layer[key[0]] += 1
        self.slot_of[key] = slot
        for fn in self.listeners:
            fn(key, slot)
        self.policy.on_insert(key)
        self.resident_peak = max(self.resident_peak, self.resident_bytes)
