"""The offloaded MoE layer: transformers' router and shared experts, moelite's routed experts.

Contract:
  - `ExpertManager` owns the slot pool, the cache and the reader. `run(layer, x, idx, w)` computes
    sum_j w[n, j] * expert_{idx[n, j]}(x[n]) for every token, each expert once for all tokens routed to it, with
    the protection shield: resident experts of this layer are pinned until computed, then misses are loaded one
    at a time into free or evicted slots.
  - `OffloadedMoEBlock` replaces a transformers MoE block (`layer.mlp`), keeping its `gate` and shared-expert
    modules; forward([B, T, H]) -> [B, T, H] equals the original block's forward (the exactness tests check it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from .arch.base import ArchAdapter, Routing
from .expert_cache import ExpertCache
from .expert_store import ExpertReader, SlotPool

Key = tuple[int, int]


@dataclass
class LayerStats:
    hits: int = 0
    misses: int = 0
    tokens: int = 0


@dataclass
class ExpertManager:
    pool: SlotPool
    cache: ExpertCache
    reader: ExpertReader
    act_fn: nn.Module
    layer_stats: dict[int, LayerStats] = field(default_factory=dict)
    compute_seconds: float = 0.0
    stall_seconds: float = 0.0
    #: optional callback(layer, Routing, is_decode) for traces / score policies
    observers: list = field(default_factory=list)

    def expert_forward(self, slot: int, xs: torch.Tensor) -> torch.Tensor:
        """One expert on tokens xs [n, H] -> [n, H] (SwiGLU: down(act(gate x) * up x))."""
        gate_up = self.pool.gate_up(slot)  # [2I, H]
        down = self.pool.down(slot)  # [H, I]
        h = xs.to(gate_up.dtype)
        g, u = F.linear(h, gate_up).chunk(2, dim=-1)  # [n, I] each
        return F.linear(self.act_fn(g) * u, down).to(xs.dtype)  # [n, H]

    def load(self, key: Key) -> int:
        """Make `key` resident (a miss): take a slot, read the bytes, return the slot."""
        slot = self.cache.acquire(key)
        t0 = time.perf_counter()
        try:
            event = self.reader.read_into(key, slot)
        except BaseException:
            self.cache.release(slot)
            raise
        if event is not None:
            torch.cuda.current_stream(self.pool.device).wait_event(event)
        self.stall_seconds += time.perf_counter() - t0
        self.cache.commit(key, slot)
        return slot

    def run(self, layer: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        # x [N, H], idx [N, k], w [N, k] -> out [N, H]
        n_tok, k = idx.shape
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)  # [N*k] positions grouped by expert
        experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
        tok = order // k  # token of each (token, choice) pair, grouped by expert
        wts = w.reshape(-1)[order].to(x.dtype)
        out = torch.zeros_like(x)
        stats = self.layer_stats.setdefault(layer, LayerStats())
        stats.tokens += n_tok

        groups: list[tuple[int, int, int]] = []  # (expert, start, end) into tok/wts
        start = 0
        for e, c in zip(experts.tolist(), counts.tolist()):
            groups.append((e, start, start + c))
            start += c

        def compute(slot: int, s: int, t: int) -> None:
            t0 = time.perf_counter()
            ti = tok[s:t]
            y = self.expert_forward(slot, x[ti]) * wts[s:t, None]
            out.index_add_(0, ti, y)
            self.compute_seconds += time.perf_counter() - t0

        resident, missing = [], []
        for e, s, t in groups:
            slot = self.cache.lookup((layer, e))
            if slot is None:
                missing.append((e, s, t))
            else:
                self.cache.pin(slot)  # shield: not evictable until computed
                resident.append((slot, s, t))
        stats.hits += len(resident)
        stats.misses += len(missing)
        for slot, s, t in resident:
            compute(slot, s, t)
            self.cache.unpin(slot)
        for e, s, t in missing:
            slot = self.load((layer, e))
            self.cache.pin(slot)
            compute(slot, s, t)
            self.cache.unpin(slot)
        return out


class OffloadedMoEBlock(nn.Module):
    def __init__(self, block: nn.Module, layer: int, adapter: ArchAdapter, manager: ExpertManager, top_k: int):
        super().__init__()
        self.block = block  # transformers' block without its `experts`: gate + shared experts
        self.layer, self.adapter, self.top_k = layer, adapter, top_k
        self.manager = manager
        self.last_routing: Routing | None = None

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        bsz, seq, hid = hidden_states.shape
        x = hidden_states.reshape(-1, hid)  # [N, H]
        routing = self.adapter.route(self.block, x, self.top_k)  # idx [N, k]
        is_decode = seq == 1
        for obs in self.manager.observers:
            obs(self.layer, routing, is_decode)
        out = self.manager.run(self.layer, x, routing.idx, routing.weights)
        shared = self.adapter.shared(self.block, x)
        if shared is not None:
            out = out + shared
        return out.reshape(bsz, seq, hid)
