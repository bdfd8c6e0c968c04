"""The offloaded MoE layer: transformers' router and shared experts, moelite's routed experts.

Contract:
  - `ExpertManager` owns the slot pool, the cache, the reader and the background loader.
    `run(layer, x, idx, w, scores)` computes sum_j w[n, j] * expert_{idx[n, j]}(x[n]) for every token, each expert
    once for all tokens routed to it. Order: resident experts are pinned (the protection shield) and computed
    while the misses are read in the background (for one token and small experts, all resident experts in one
    grouped pair of batched matrix-vector products: `grouped_forward`); each miss is computed as soon as its bytes land. A miss either
    goes into the cache ("load") or is computed straight from a read buffer without caching ("direct"; on CUDA
    that compute runs on the CPU, so the expert never crosses PCIe); with
    miss_policy="hybrid" the misses are split between the two paths by score and by their measured running
    costs so that neither path finishes much later than the other.
  - Prefetch (decode only): after routing layer L, the next MoE layer's gate is applied to layer L's input;
    predicted top experts that are not resident are read in the background; predictions the next layer does not
    use are cancelled if not yet started. Precision and recall are counted.
  - `OffloadedMoEBlock` replaces a transformers MoE block (`layer.mlp`), keeping its `gate` and shared-expert
    modules; forward([B, T, H]) -> [B, T, H] equals the original block's forward (the exactness tests check it).
  - Output never depends on cache policy, prefetch, loader or miss path beyond float rounding (they change the
    order in which expert outputs are summed); only substitution (alpha > 0) changes it. Without prefetch and the
    hybrid split (both depend on I/O timing), the same configuration on the same inputs gives bit-identical outputs.
"""

from __future__ import annotations

import time
from collections import deque
from contextlib import contextmanager
from concurrent.futures import Future
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from moelite.core.arch.base import ArchAdapter, Routing
from moelite.config import alpha_positive
from moelite.core.expert_cache import ExpertCache
from moelite.core.expert_store import ExpertReader, SlotPool
from moelite.core.loader import Loader, timed_read

Key = tuple[int, int]
#: largest total slot bytes that `ExpertManager.grouped_forward` gathers (a copy); above it, experts run one by one
GROUPED_MAX_BYTES = 8 << 20


@dataclass
class LayerStats:
    hits: int = 0
    misses: int = 0
    prefetch_hits: int = 0
    substitutions: int = 0
    tokens: int = 0
    evictions: int = 0
    bytes_read: int = 0
    stall_seconds: float = 0.0


class RunningCost:
    """Mean of the last n samples with outliers beyond one standard deviation dropped (as SMoE's code does)."""

    def __init__(self, n: int = 10):
        self.samples: deque[float] = deque(maxlen=n)

    def add(self, x: float) -> None:
        self.samples.append(x)

    def value(self, default: float) -> float:
        if not self.samples:
            return default
        t = torch.tensor(list(self.samples))
        if len(t) >= 3:
            keep = (t - t.mean()).abs() <= t.std() + 1e-12
            t = t[keep] if keep.any() else t
        return float(t.mean())


@dataclass
class ExpertManager:
    pool: SlotPool
    cache: ExpertCache
    reader: ExpertReader
    act_fn: nn.Module
    loader: Loader | None = None
    miss_policy: str = "load"  # load | direct | hybrid
    prefetch: bool = False
    prefetch_experts: int = 0  # per token, highest predicted score first; 0 = half of top-k
    layer_stats: dict[int, LayerStats] = field(default_factory=dict)
    compute_seconds: float = 0.0
    stall_seconds: float = 0.0
    #: optional callbacks(layer, Routing, is_decode) for traces / score policies
    observers: list = field(default_factory=list)
    #: substitution hook (SMoE cache router): fn(manager, layer, block, routing, alpha) -> Routing; None = exact
    substitute: object = None
    #: substitution threshold of the request(s) now decoding: a float, or a [N] tensor per token
    alpha: object = 0.0
    substitute_in_prefill: bool = False
    substitution_mode: str = "always"  # always | stall (see substitution.cache_router)
    #: per-layer multipliers of alpha (EngineConfig.substitution_profile); empty = the same alpha in every layer
    alpha_scale: dict = field(default_factory=dict)
    io_parallel: int = 1  # reads in flight at once (I/O threads): what "stall" mode counts rounds with
    substitutions: int = 0
    #: routing source that replaces the router (trace replay on real-shape checkpoints); None = the model's gate
    replay: object = None
    # prefetch bookkeeping
    inflight: dict = field(default_factory=dict)  # key -> (slot, Future, is_prefetch)
    prefetched_unused: set = field(default_factory=set)
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    decode_misses: int = 0
    decode_hits: int = 0
    loaded_misses: int = 0
    direct_misses: int = 0
    cost_load: RunningCost = field(default_factory=RunningCost)
    cost_direct: RunningCost = field(default_factory=RunningCost)
    blocks: dict = field(default_factory=dict)  # layer -> OffloadedMoEBlock (set by build_model)
    last_x: object = None  # input [N, H] of the MoE layer now running
    next_layer: dict = field(default_factory=dict)  # layer -> next MoE layer
    #: CUDA path (cuda_experts.CudaExperts) when the slots are in VRAM over a pinned host tier; None = this class
    cuda: object = None
    #: set by the CUDA-graph decoder while it captures: (flags [L], idx [L, N, k], scores [L, E] or None)
    graph_buffers: object = None
    #: True while a prompt is being prefilled (see `prefilling`): a one-token prompt is not a decode step
    prefill: bool = False

    @contextmanager
    def prefilling(self):
        """Forward passes inside are prefill (or full-sequence scoring), whatever their length."""
        old, self.prefill = self.prefill, True
        try:
            yield
        finally:
            self.prefill = old

    # ---- compute ---------------------------------------------------------------------------------------------
    def expert_forward(self, gate_up: torch.Tensor, down: torch.Tensor, xs: torch.Tensor) -> torch.Tensor:
        """One expert on tokens xs [n, H] -> [n, H] (SwiGLU: down(act(gate x) * up x)); gate_up [2I, H], down [H, I]."""
        h = xs.to(gate_up.dtype)
        g, u = F.linear(h, gate_up).chunk(2, dim=-1)  # [n, I] each
        return F.linear(self.act_fn(g) * u, down).to(xs.dtype)  # [n, H]

    def grouped_forward(self, slots: list[int], x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """One token through several resident experts at once: x [1, H], w [m] -> sum_j w[j] * expert_j(x) [1, H].

        Two batched matrix-vector products over the gathered slots replace m Python-level expert calls (the
        per-expert overhead, ~50 us on CPU, is most of a small model's MoE time). Gathering copies the slots, so
        `run` uses it only while they are small (GROUPED_MAX_BYTES)."""
        idx = torch.tensor(slots, device=self.pool.device)
        gate_up = self.pool.gate_up_all.index_select(0, idx)  # [m, 2I, H]
        down = self.pool.down_all.index_select(0, idx)  # [m, H, I]
        h = torch.matmul(gate_up, x[0].to(gate_up.dtype))  # [m, 2I]
        g, u = h.chunk(2, dim=-1)  # [m, I] each
        y = torch.matmul(down, (self.act_fn(g) * u).unsqueeze(-1)).squeeze(-1).to(x.dtype)  # [m, H]
        return (w.to(x.dtype) @ y).unsqueeze(0)  # [1, H], summed in the activation dtype as the per-expert path

    def _direct_weights(self, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
        """Read `key` into this thread's staging buffer and return gate_up / down views (no cache insertion).

        On CPU the views are on the slot dtype. On CUDA they are float32 *host* tensors: a direct miss is computed
        on the CPU (SMoE Algorithm 2, Fiddler), so its bytes never cross PCIe."""
        stage = self.reader.staging()
        self.reader.read_bytes(key, stage)
        lay = self.pool.layout
        h, i = lay.hidden, lay.intermediate
        want = self.pool.dtype if self.pool.device.type == "cpu" else torch.float32
        if stage.dtype != want:
            scratch = self._scratch(want)
            scratch.copy_(stage)  # into a preallocated buffer: no allocation per miss
            stage = scratch
        return stage[: 2 * i * h].view(2 * i, h), stage[2 * i * h:].view(h, i)

    def _scratch(self, dtype: torch.dtype) -> torch.Tensor:
        buf = getattr(self, "_scratch_buf", None)
        if buf is None or buf.dtype != dtype:
            buf = torch.empty(self.pool.slot_numel, dtype=dtype)  # host memory on every device
            self._scratch_buf = buf
        return buf

    # ---- loading ---------------------------------------------------------------------------------------------
    def _submit(self, key: Key, is_prefetch: bool) -> bool:
        layer = key[0]
        if not self.cache.can_acquire(layer):
            return False
        slot = self.cache.acquire(key)
        self.cache.pin(slot)
        evicted = self.cache.last_evicted
        copy_stream = self.reader.copy_stream
        if evicted is not None and copy_stream is not None:
            # CUDA without a host tier: kernels that read the evicted expert may still be queued; the copy that
            # refills the slot (issued later on the copy stream, from an I/O thread) must come after them
            ev = torch.cuda.Event()
            ev.record(torch.cuda.current_stream(self.pool.device))
            copy_stream.wait_event(ev)
        if evicted is not None:
            self.layer_stats.setdefault(evicted[0], LayerStats()).evictions += 1
        if evicted is not None and evicted in self.prefetched_unused:
            self.prefetched_unused.discard(evicted)
            self.prefetch_wasted += 1
        if self.loader is None:
            fut: Future = Future()
            try:
                fut.set_result(timed_read(self.reader, key, slot))
            except BaseException as exc:  # surfaced by _finish
                fut.set_exception(exc)
        else:
            fut = self.loader.submit(key, slot)
        self.inflight[key] = (slot, fut, is_prefetch)
        return True

    def _finish(self, key: Key) -> int:
        """Wait for an in-flight load, commit it to the cache; returns its (still pinned) slot."""
        slot, fut, _ = self.inflight.pop(key)
        t0 = time.perf_counter()
        try:
            event, read_seconds = fut.result()
        except BaseException:
            self.cache.unpin(slot)
            self.cache.release(slot)
            raise
        if event is not None:
            torch.cuda.current_stream(self.pool.device).wait_event(event)
        self.stall_seconds += time.perf_counter() - t0
        self.layer_stats.setdefault(key[0], LayerStats()).bytes_read += self.pool.layout.disk_bytes
        # a load's cost to the layer: its read time shared by the readers working in parallel (not its time in the
        # queue, which grows with the number of loads and would bias the hybrid split towards direct)
        self.cost_load.add(read_seconds / (self.io_parallel if self.loader is not None else 1))
        self.cache.commit(key, slot, count_miss=False)
        return slot

    def _settle(self, layer: int, needed: set[int]) -> None:
        """Commit finished loads; cancel this layer's prefetches that routing did not ask for."""
        for key in list(self.inflight):
            slot, fut, is_prefetch = self.inflight[key]
            unused = key[0] == layer and key[1] not in needed and is_prefetch
            if unused and fut.cancel():
                self._drop_prefetch(key, slot)
                continue
            if fut.done():
                if is_prefetch and fut.exception() is not None:  # a prediction that could not be read: drop it
                    self._drop_prefetch(key, slot)
                    continue
                self.cache.unpin(self._finish(key))

    def _drop_prefetch(self, key: Key, slot: int) -> None:
        del self.inflight[key]
        self.cache.unpin(slot)
        self.cache.release(slot)
        self.prefetched_unused.discard(key)
        self.prefetch_wasted += 1

    def _fill(self, layer: int, queue: deque, waiting: list) -> None:
        while queue and self._submit((layer, queue[0]), is_prefetch=False):
            waiting.append(queue.popleft())

    def _drain_one(self) -> None:
        if not self.inflight:
            raise RuntimeError("expert cache: no slot can be freed; the budget is below what one layer needs")
        key = next(iter(self.inflight))
        self.cache.unpin(self._finish(key))

    def prefetch_next(self, layer: int, x: torch.Tensor) -> None:
        """Predict the next MoE layer's experts from x [N, H] through its gate and read the top ones early."""
        nxt = self.next_layer.get(layer)
        if nxt is None:
            return
        if self.replay is not None:  # replayed routing: the recorded model's own next-layer prediction
            pred = self.replay.predicted(layer, nxt)
            if pred is None:
                return
        else:
            block = self.blocks[nxt]
            pred = block.adapter.route(block.block, x, block.top_k).idx  # [N, k], best first
        # only the most confident predictions: a wrong prefetch costs a read and may evict a useful expert
        m = self.prefetch_experts or max(1, pred.shape[1] // 2)
        for e in pred[:, :m].unique().tolist():
            key = (nxt, e)
            if self.cache.resident(key) or key in self.inflight:
                continue
            # on CUDA with a host tier the read is a copy from pinned RAM, issued at once
            started = self._submit(key, is_prefetch=True) if self.cuda is None else self.cuda.load(key) is not None
            if not started:
                break
            self.prefetch_issued += 1
            self.prefetched_unused.add(key)

    # ---- the layer ---------------------------------------------------------------------------------------------
    def run(self, layer: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, probs: torch.Tensor | None = None,
            is_decode: bool = False, substituted: torch.Tensor | None = None) -> torch.Tensor:
        # x [N, H], idx [N, k], w [N, k], substituted [N, k] bool or None -> out [N, H]
        if self.cuda is not None:
            return self.cuda.run(layer, x, idx, w, probs, is_decode, substituted)
        pins, inflight = dict(self.cache.pins), set(self.inflight)
        try:
            return self._run(layer, x, idx, w, probs, is_decode, substituted)
        except BaseException:
            self._recover(pins, inflight)
            raise

    def _recover(self, pins: dict, inflight: set) -> None:
        """After a layer failed (a read error, an interrupt): reads it started either land in the cache (if they
        succeeded) or give their slot back, and the shield is as it was before the layer, so that nothing stays
        pinned or queued and the next request runs on a consistent cache."""
        for key in [k for k in self.inflight if k not in inflight]:
            slot, fut, _ = self.inflight.pop(key)
            ok = False
            if not fut.cancel():
                try:
                    event, _ = fut.result()
                    if event is not None:
                        torch.cuda.current_stream(self.pool.device).wait_event(event)
                    ok = True
                except BaseException:  # noqa: BLE001 - this read's own failure is not the one being raised
                    ok = False
            if ok:
                self.cache.commit(key, slot, count_miss=False)
            else:
                self.cache.release(slot)
        self.cache.pins = pins

    def _run(self, layer, x, idx, w, probs, is_decode, substituted) -> torch.Tensor:
        n_tok, k = idx.shape
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)  # [N*k] (token, choice) pairs grouped by expert
        experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
        tok = order // k
        wts = w.reshape(-1)[order].to(x.dtype)
        out = torch.zeros_like(x)
        stats = self.layer_stats.setdefault(layer, LayerStats())
        stats.tokens += n_tok
        stall_at_start = self.stall_seconds

        groups: dict[int, tuple[int, int]] = {}
        start = 0
        for e, c in zip(experts.tolist(), counts.tolist()):
            groups[e] = (start, start + c)
            start += c
        self._settle(layer, set(groups))

        def compute(gate_up, down, e: int) -> None:
            t0 = time.perf_counter()
            s, t = groups[e]
            ti = tok[s:t]
            out.index_add_(0, ti, self.expert_forward(gate_up, down, x[ti]) * wts[s:t, None])
            self.compute_seconds += time.perf_counter() - t0

        host = None  # (x, tok, wts) on the CPU for direct misses of a CUDA layer, copied before any expert kernel
        # is queued so that the copy does not wait for them

        def compute_on_host(gate_up, down, e: int) -> None:
            hx, htok, hw = host
            s, t = groups[e]
            y = self.expert_forward(gate_up, down, hx[htok[s:t]]) * hw[s:t, None]  # [n, H] on the CPU
            out.index_add_(0, tok[s:t], y.to(out.device, out.dtype))

        sub_only = self.count_substitutions(stats, idx, substituted)
        resident, waiting, missing = [], [], []
        for e in groups:
            key = (layer, e)
            self.note_prefetch_use(key, stats)
            slot = self.cache.lookup(key, count=False)
            if slot is not None:
                self.cache.pin(slot)  # shield: not evictable until computed
                resident.append((e, slot))
            elif key in self.inflight:
                waiting.append(e)
                self.cache.policy.on_access(key)
            else:
                missing.append(e)
        n_hit = sum(e not in sub_only for e, _ in resident) + sum(e not in sub_only for e in waiting)
        self.cache.hits += n_hit
        self.cache.misses += len(missing)
        stats.hits += n_hit
        stats.misses += len(missing)
        if is_decode:
            self.decode_misses += len(missing)
            self.decode_hits += n_hit

        to_load, direct = self._split_misses(layer, missing, probs)
        if direct and x.device.type != "cpu":
            host = (x.detach().to("cpu", torch.float32), tok.cpu(), wts.to("cpu", torch.float32))
        queue = deque(to_load)
        self._fill(layer, queue, waiting)  # start I/O before computing the resident experts

        done: deque[int] = deque()  # computed slots stay shielded until the layer finishes
        if n_tok == 1 and len(resident) > 1 and len(resident) * self.pool.slot_bytes <= GROUPED_MAX_BYTES:
            t0 = time.perf_counter()
            slots = [slot for _, slot in resident]
            w_res = torch.stack([wts[slice(*groups[e])].sum() for e, _ in resident])  # [m] (an expert listed twice:
            # its weights add up, the token being the same)
            out += self.grouped_forward(slots, x, w_res)
            done.extend(slots)
            self.compute_seconds += time.perf_counter() - t0
        else:
            for e, slot in resident:
                compute(self.pool.gate_up(slot), self.pool.down(slot), e)
                done.append(slot)
        self._fill(layer, queue, waiting)
        if is_decode and self.prefetch and not queue:
            self.prefetch_next(layer, x)  # reads for layer L+1 queue behind this layer's misses
        for e in direct:  # computed from the read buffer on this thread while the loader fills slots
            t0 = time.perf_counter()
            gate_up, down = self._direct_weights((layer, e))
            self.stall_seconds += time.perf_counter() - t0
            stats.bytes_read += self.pool.layout.disk_bytes
            (compute if host is None else compute_on_host)(gate_up, down, e)
            self.cost_direct.add(time.perf_counter() - t0)
        while waiting or queue:
            if not waiting:  # no slot free: lift the shield of a computed expert, else let a read land
                if done:
                    self.cache.unpin(done.popleft())
                else:
                    self._drain_one()
                self._fill(layer, queue, waiting)
                continue
            e = waiting.pop(0)
            slot = self._finish((layer, e))
            compute(self.pool.gate_up(slot), self.pool.down(slot), e)
            done.append(slot)
            self._fill(layer, queue, waiting)
        for slot in done:
            self.cache.unpin(slot)
        stats.stall_seconds += self.stall_seconds - stall_at_start
        self.loaded_misses += len(to_load)
        self.direct_misses += len(direct)
        return out

    def count_substitutions(self, stats: LayerStats, idx: torch.Tensor, substituted: torch.Tensor | None) -> set[int]:
        """Count a layer's substituted evaluations (idx [N, k], substituted [N, k] bool or None, same device).
        Returns the experts present only as substitutes: resident by construction, so their lookups are
        substitutions, not hits."""
        if substituted is None:
            return set()
        n_sub = int(substituted.sum())
        if not n_sub:
            return set()
        self.substitutions += n_sub
        stats.substitutions += n_sub
        return set(idx[substituted].tolist()) - set(idx[~substituted].tolist())

    def note_prefetch_use(self, key: Key, stats: LayerStats) -> None:
        """A layer asked for `key`: if a prefetch brought it, that prefetch was used."""
        if key in self.prefetched_unused:
            self.prefetched_unused.discard(key)
            self.prefetch_used += 1
            stats.prefetch_hits += 1

    def _split_misses(self, layer: int, missing: list[int], probs: torch.Tensor | None) -> tuple[list[int], list[int]]:
        if not missing or self.miss_policy == "load":
            return missing, []
        if self.miss_policy == "direct":
            return [], missing
        # hybrid: highest-scoring misses go to the cache (likely reused), the low end is computed directly;
        # two pointers balance n_load * C_load against n_direct * C_direct (SMoE Algorithm 2)
        if probs is not None:
            score = probs.float().mean(0)
            missing = sorted(missing, key=lambda e: -float(score[e]))
        c_load = self.cost_load.value(1.0)
        c_direct = self.cost_direct.value(1.0)
        lo, hi = 0, len(missing)
        t_load = t_direct = 0.0
        while lo < hi:
            if t_load + c_load <= t_direct + c_direct:
                t_load += c_load
                lo += 1
            else:
                t_direct += c_direct
                hi -= 1
        return missing[:lo], missing[lo:]


class OffloadedMoEBlock(nn.Module):
    def __init__(self, block: nn.Module, layer: int, adapter: ArchAdapter, manager: ExpertManager, top_k: int):
        super().__init__()
        self.block = block  # transformers' block without its `experts`: gate + shared experts
        self.layer, self.adapter, self.top_k = layer, adapter, top_k
        self.manager = manager

    @torch.compiler.disable  # a compiled decoder layer breaks its graph here (compile_decode compiles the graph
    # path, `_graph_forward`, on its own; the eager path has host-side cache bookkeeping)
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        bsz, seq, hid = hidden_states.shape
        x = hidden_states.reshape(-1, hid)  # [N, H]
        m = self.manager
        if m.graph_buffers is not None:  # being captured into a CUDA graph: device-only path
            return self._graph_forward(x).reshape(bsz, seq, hid)
        m.last_x = x  # observers (trace recorder) may predict the next layer from it
        if m.replay is not None:
            idx, probs = m.replay.route(self.layer, x.shape[0], self.top_k, x.device)  # idx [N, k], probs [N, E]
            routing = Routing(probs, probs, idx, self.adapter.weigh(self.block, probs, idx))
        else:
            routing = self.adapter.route(self.block, x, self.top_k)  # idx [N, k]
        is_decode = seq == 1 and not m.prefill
        for obs in m.observers:
            obs(self.layer, routing, is_decode)
        if m.substitute is not None and (is_decode or m.substitute_in_prefill) and alpha_positive(m.alpha):
            routing = m.substitute(m, self.layer, self.block, routing, m.alpha)
        out = m.run(self.layer, x, routing.idx, routing.weights, routing.probs, is_decode, routing.substituted)
        shared = self.adapter.shared(self.block, x)
        if shared is not None:
            out = out + shared
        return out.reshape(bsz, seq, hid)

    def _graph_forward(self, x: torch.Tensor) -> torch.Tensor:
        m, b = self.manager, self.manager.graph_buffers
        if b.replay_idx is not None:
            r = m.cuda.row[self.layer]
            idx, probs = b.replay_idx[r], b.replay_probs[r]
            routing = Routing(probs, probs, idx, self.adapter.weigh(self.block, probs, idx))
        else:
            routing = self.adapter.route(self.block, x, self.top_k)
        out = m.cuda.graph_forward(self.layer, x, routing, b, self.block, self.adapter)
        shared = self.adapter.shared(self.block, x)
        return out if shared is None else out + shared
