"""Routed experts on a CUDA device: VRAM slots over the pinned host tier, one fused computation per layer.

Contract:
  - `CudaExperts(manager, host)` takes over `ExpertManager.run` when the slot pool is on a CUDA device and a host
    tier exists. Each expert has a code in `slot_table` [layer rows, E] (pinned CPU; `device_table` is its device
    copy): a VRAM slot (>= 0), else its pinned host row as -row-2, else -1 (on SSD only).
  - Eager layer (`run`: prefill, and decode without graphs): one host synchronisation (the routing indices), the
    resident experts in one fused call, then the misses: copied from the pinned row into a slot (one asynchronous
    copy on the copy stream, no staging copy) and computed in a second fused call, or computed on the CPU from
    the pinned row while the GPU works (SMoE Algorithm 2: "hybrid" splits them by score and measured costs, the
    copy's bytes over the measured pinned bandwidth against the CPU's running time per expert). Experts outside
    the host tier are read from SSD into the slot through the reader.
  - Graph layer (`graph_forward`, captured by graph_decode): routing, the optional SMoE cache router (on the
    device: resident = has a VRAM slot), the code lookup and one fused call, with no host synchronisation. A miss
    is computed in place by the fused kernels reading its pinned host row over the bus (zero-copy). Only an
    expert on SSD (-1) raises the layer's flag (the step is then redone eagerly); with the torch backend, which
    cannot read host rows, every miss does.
  - After a replayed step (`after_graph_step`) the policy sees the accesses; misses are copied into VRAM slots in
    the background per `miss_policy`: "load" every miss, "direct" none (the warm set stays), "hybrid" the
    highest-scoring misses whose copies fit in one step's time. A slot being filled keeps its expert's host code
    in the table until the copy's event has completed, so a replay never waits for a copy and never reads a
    half-written slot.
  - Counting (moelite.core.counters): an expert whose VRAM slot holds its bytes is an exact hit; one whose fill (a
    prefetch, a background copy) has not completed when the layer needs it is a read in flight, never a hit; one
    with no slot is a miss.
  - Ordering without host waits: each slot has a "ready" event (its last fill) that the compute stream waits on
    before an eager kernel reads it, and a "last read" event that the copy stream waits on before overwriting
    it (the last eager kernel that read it, and the last graph replay). Slots are unpinned as soon as their
    kernels are queued.
"""

from __future__ import annotations

import time

import torch

from moelite.config import layer_alpha
from moelite.core.fused_moe import fused_experts, triton_available
from moelite.core.host_tier import HostTier
from moelite.core.substitution import plan_batch

Key = tuple[int, int]


class CudaExperts:
    def __init__(self, manager, host: HostTier, backend: str = "auto"):
        self.m, self.host, self.backend = manager, host, backend
        pool = manager.pool
        self.device = pool.device
        self.hidden, self.inter = pool.layout.hidden, pool.layout.intermediate
        self.layers = sorted(manager.cache.partition)
        self.row = {layer: i for i, layer in enumerate(self.layers)}
        self.n_experts = max(e for (_, e) in pool.layout.experts) + 1
        self.slot_table = torch.full((len(self.layers), self.n_experts), -1, dtype=torch.int32).pin_memory()
        for (layer, e), r in host.row_of.items():
            self.slot_table[self.row[layer], e] = -r - 2
        self.device_table = self.slot_table.to(self.device)
        # the async table copy reads a pinned snapshot that nothing writes until two publications later (the
        # decoder waits for each step), never slot_table itself, which the bookkeeping edits while a step runs
        self._snapshots = [self.slot_table.clone().pin_memory() for _ in range(2)]
        self._snap = 0
        # the torch backend cannot read pinned host rows: a graph step must then flag every miss
        self.zero_copy = backend == "triton" or (backend == "auto" and triton_available())
        size = pool.buffer.element_size()
        base = pool.buffer.data_ptr()
        offs = [(host.row_by_index(r).data_ptr() - base) // size for r in range(len(host))] or [0]
        self.host_offsets = torch.tensor(offs, dtype=torch.int64, device=self.device)
        self.copy_stream = torch.cuda.Stream(self.device)
        self.ready: dict[int, torch.cuda.Event] = {}  # slot -> event of its last fill, not yet waited on
        self.last_read: dict[int, torch.cuda.Event] = {}  # slot -> event after the last eager kernel that read it
        self.graph_event: torch.cuda.Event | None = None  # after the last graph replay (it may read any slot)
        self.pending: dict[int, tuple[Key, torch.cuda.Event]] = {}  # slot -> (key, fill event): table shows host
        self.copies = 0
        self.copy_bytes = 0
        self.cpu_computed = 0
        self.graph_misses_loaded = 0
        manager.cache.listeners.append(self._on_cache_change)
        self.h2d_gbps = self._measure_h2d()

    # ---- codes ---------------------------------------------------------------------------------------------
    def host_code(self, key: Key) -> int:
        r = self.host.row_of.get(key)
        return -1 if r is None else -r - 2

    def _on_cache_change(self, key: Key, slot: int | None) -> None:
        r = self.row.get(key[0])
        if r is not None:
            self.slot_table[r, key[1]] = self.host_code(key) if slot is None else slot

    def sync_table(self) -> None:
        """Before a replay: publish finished background fills, order the compute stream after eager fills, and copy
        the table to the device."""
        for slot, (key, ev) in list(self.pending.items()):
            if ev.query():
                del self.pending[slot]
                if self.m.cache.slot_of.get(key) == slot:
                    self.slot_table[self.row[key[0]], key[1]] = slot
        stream = torch.cuda.current_stream(self.device)
        for slot in [s for s in self.ready if s not in self.pending]:
            stream.wait_event(self.ready.pop(slot))
        snap = self._snapshots[self._snap]
        self._snap ^= 1
        snap.copy_(self.slot_table)
        self.device_table.copy_(snap, non_blocking=True)
        return snap.tolist()  # what the next replay sees: decides hit or miss in its bookkeeping

    def _measure_h2d(self) -> float:
        """Pinned host -> VRAM bandwidth in GB/s, measured once on one expert (the cost model of a copy)."""
        if not len(self.host):
            return 25.0
        src = self.host.row_by_index(0)
        dst = torch.empty_like(src, device=self.device)
        for _ in range(2):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(self.device)
        t0 = time.perf_counter()
        for _ in range(5):
            dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(self.device)
        return 5 * src.numel() * src.element_size() / max(time.perf_counter() - t0, 1e-9) / 1e9

    # ---- filling slots ---------------------------------------------------------------------------------------
    def _fill(self, key: Key, slot: int) -> torch.cuda.Event | None:
        """Queue the copy of `key` into `slot` after the slot's last readers; returns the fill's event."""
        src = self.host.row(key)
        last = self.last_read.pop(slot, None)
        prev = self.ready.pop(slot, None)  # an earlier fill of this slot that may not have landed yet
        self.pending.pop(slot, None)
        if src is None:  # not in the host tier: read from SSD (synchronous read, then an async copy)
            for ev in (last, self.graph_event, prev):
                if ev is not None:
                    ev.synchronize()
            return self.m.reader.read_into(key, slot)
        with torch.cuda.stream(self.copy_stream):
            for ev in (last, prev):  # the slot's last reader, and its previous fill (possibly on another stream)
                if ev is not None:
                    self.copy_stream.wait_event(ev)
            if self.graph_event is not None:
                self.copy_stream.wait_event(self.graph_event)
            self.m.pool.flat(slot).copy_(src, non_blocking=True)
            ev = torch.cuda.Event()
            ev.record(self.copy_stream)
        self.copies += 1
        self.copy_bytes += self.host.row_bytes
        return ev

    def load(self, key: Key, background: bool = False) -> int | None:
        """Make `key` resident (acquiring a slot, evicting per policy); None when every slot is shielded.
        background=True: the table keeps the host code until the copy has landed (graph steps read it zero-copy
        meanwhile); eager readers still find it in the cache and wait for its ready event."""
        cache = self.m.cache
        if not cache.can_acquire(key[0]):
            return None
        slot = cache.acquire(key)
        evicted = cache.last_evicted
        if evicted is not None:
            self.m.note_eviction(evicted)
        ev = self._fill(key, slot)
        cache.commit(key, slot)
        if ev is not None:
            self.ready[slot] = ev
            if background and self.host.row(key) is not None:
                self.pending[slot] = (key, ev)
                self.slot_table[self.row[key[0]], key[1]] = self.host_code(key)
        return slot

    def warm(self) -> int:
        """Fill the free slots from the host tier, one expert of every layer in turn (lowest index first)."""
        cache, n = self.m.cache, 0
        for e in range(self.n_experts):
            for layer in self.layers:
                key = (layer, e)
                if key in self.host.row_of and not cache.resident(key) and cache.free[layer]:
                    self.load(key)
                    n += 1
        self.sync_table()
        return n

    def landed(self, slot: int) -> bool:
        """Whether the last fill of `slot` has completed (no host wait)."""
        ev = self.ready.get(slot)
        return ev is None or ev.query()

    def _wait_ready(self, slots) -> None:
        stream = torch.cuda.current_stream(self.device)
        for s in slots:
            ev = self.ready.pop(s, None)
            pend = self.pending.pop(s, None)
            if pend is not None and self.m.cache.slot_of.get(pend[0]) == s:  # the stream waits for it from now on,
                self.slot_table[self.row[pend[0][0]], pend[0][1]] = s  # so graph steps may read the slot too
            if ev is not None:
                stream.wait_event(ev)

    def _mark_read(self, slots) -> None:
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        for s in slots:
            self.last_read[s] = ev

    def _fused(self, x, codes, w):
        return fused_experts(x, self.m.pool.buffer, self.hidden, self.inter, codes, w, self.backend,
                             host_offsets=self.host_offsets)

    # ---- the eager layer -------------------------------------------------------------------------------------
    def run(self, layer: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, probs: torch.Tensor | None,
            decode: bool, substituted: torch.Tensor | None) -> torch.Tensor:
        # x [N, H] on the device, idx [N, k], w [N, k] -> out [N, H]
        m, cache = self.m, self.m.cache
        stats = m.counters.layer(layer)
        idx_h = idx.to("cpu")  # the one host synchronisation of the layer
        n_tok, k = idx_h.shape
        stats.tokens += n_tok
        experts = list(dict.fromkeys(idx_h.reshape(-1).tolist()))
        sub_only = m.count_substitutions(stats, idx_h, None if substituted is None else substituted.to("cpu"), decode)
        resident: dict[int, int] = {}
        missing: list[int] = []
        n_hit = n_wait = 0
        for e in experts:
            key = (layer, e)
            m.note_prefetch_use(key, stats)
            slot = cache.lookup(key)
            if slot is not None:
                cache.pin(slot)
                resident[e] = slot
                if e not in sub_only:
                    if self.landed(slot):
                        n_hit += 1
                    else:  # its copy is still queued: the kernels wait for it
                        n_wait += 1
            else:
                missing.append(e)
        m.account(stats, m.counters.phase(decode), n_hit, len(missing), n_wait)

        m.cost_load.add(self.host.row_bytes / (self.h2d_gbps * 1e9))
        to_load, direct = m.split_misses(layer, missing, probs)
        loaded: dict[int, int] = {}
        for e in to_load:
            slot = self.load((layer, e))
            if slot is None:  # every slot shielded by this layer: the CPU takes the rest
                direct.append(e)
                continue
            cache.pin(slot)
            loaded[e] = slot
        host_x = x.to("cpu", torch.float32) if direct else None

        out = None
        t0 = time.perf_counter()
        size = int(idx_h.max()) + 1
        for slots in (resident, loaded):  # resident experts first: they need not wait for any copy
            if not slots:
                continue
            self._wait_ready(slots.values())
            lut = torch.full((size,), -1, dtype=torch.int32)
            for e, s in slots.items():
                lut[e] = s
            y = self._fused(x, lut[idx_h].to(self.device, non_blocking=True), w)
            out = y if out is None else out + y
        used = list(resident.values()) + list(loaded.values())
        if used:
            self._mark_read(used)
        for s in used:
            cache.unpin(s)
        if direct:
            out = self._cpu_experts(layer, host_x, idx_h, w, direct, out, stats)
        m.counters.compute_seconds += time.perf_counter() - t0
        if out is None:
            out = torch.zeros_like(x)
        m.counters.misses_loaded += len(loaded)
        m.counters.misses_direct += len(direct)
        if decode and m.options.prefetch:
            m.prefetch_next(layer, x)
        return out

    def _cpu_experts(self, layer, host_x, idx_h, w, direct, out, stats):
        """Misses computed on the CPU from their pinned rows (or read from SSD), overlapping the queued GPU work."""
        m = self.m
        w_h = w.to("cpu", torch.float32)
        acc = torch.zeros_like(host_x)
        h, i = self.hidden, self.inter
        for e in direct:
            t0 = time.perf_counter()
            row = self.host.row((layer, e))
            if row is None:
                gate_up, down = m.direct_weights((layer, e))
                gate_up, down = gate_up.cpu(), down.cpu()
                stats.bytes_read += m.pool.layout.disk_bytes
            else:
                gate_up, down = row[: 2 * i * h].view(2 * i, h), row[2 * i * h:].view(h, i)
            sel = idx_h == e
            toks = sel.any(1).nonzero().flatten()
            wt = (w_h * sel).sum(1)[toks]
            acc.index_add_(0, toks, m.expert_forward(gate_up, down, host_x[toks]).float() * wt[:, None])
            m.cost_direct.add(time.perf_counter() - t0)
            self.cpu_computed += 1
        y = acc.to(self.device).to(out.dtype if out is not None else host_x.dtype)
        return y if out is None else out + y

    # ---- the capture-safe layer --------------------------------------------------------------------------------
    def graph_forward(self, layer: int, x: torch.Tensor, routing, buffers, block, adapter) -> torch.Tensor:
        """x [N, H] -> routed-expert output [N, H] with no host synchronisation (see the module contract)."""
        r = self.row[layer]
        table = self.device_table[r]  # [E] codes
        idx, weights = routing.idx, routing.weights
        if buffers.alpha is not None:  # SMoE cache router on the device; alpha [L] per layer, set before replay
            k = idx.shape[1]
            a = buffers.alpha[r].expand(idx.shape[0], 1)
            planned = plan_batch(routing, k, a, table >= 0, sync=False)
            if planned is not None:
                idx, sub = planned
                weights = adapter.weigh(block, routing.probs, idx).to(routing.weights.dtype)
                buffers.substituted[r].copy_(sub)
        codes = table[idx]  # [N, k]
        buffers.flags[r] = (codes == -1).any() if self.zero_copy else (codes < 0).any()
        buffers.idx[r].copy_(idx)
        if buffers.scores is not None:
            buffers.scores[r].copy_(routing.probs.float().mean(0))
        return self._fused(x, codes, weights)

    def alphas(self, alpha: float) -> list[float]:
        """Per-layer alpha of the graph's cache router (the call's profile applied)."""
        scale = self.m.call.alpha_scale
        return [layer_alpha(alpha, scale.get(layer, 1.0)) for layer in self.layers]

    def after_graph_step(self, idx: torch.Tensor, substituted: torch.Tensor | None, scores: torch.Tensor | None,
                         step_seconds: float, table: list) -> None:
        """Bookkeeping of a replayed step (idx [L, N, k] on the CPU; `table` the codes that step saw) and the
        background copies of its misses. Runs while the next step's graph is already queued."""
        m, cache = self.m, self.m.cache
        ev = torch.cuda.Event()
        ev.record(torch.cuda.current_stream(self.device))
        self.graph_event = ev
        budget = None
        c = m.counters
        if m.options.miss_policy == "hybrid":  # copies that fit in one step's time, best score first
            budget = max(1, int(step_seconds * self.h2d_gbps * 1e9 / self.host.row_bytes))
        for r, layer in enumerate(self.layers):
            st = c.layer(layer)
            st.tokens += idx.shape[1]
            sel = idx[r]
            sub_only = m.count_substitutions(st, sel, None if substituted is None else substituted[r], True)
            misses = []
            n_hit = n_wait = 0
            for e in dict.fromkeys(sel.reshape(-1).tolist()):  # noqa: B007
                key = (layer, e)
                cache.lookup(key)  # the policy sees the access
                if table[r][e] >= 0:  # the replay read it from VRAM
                    n_hit += e not in sub_only
                elif cache.resident(key):  # its copy was still landing: computed in place from the host row
                    n_wait += 1
                else:
                    misses.append(e)
            m.account(st, c.decode, n_hit, len(misses), n_wait)
            if scores is not None:
                cache.policy.observe_scores(layer, scores[r])
            if m.options.miss_policy == "direct" or not misses:
                c.misses_direct += len(misses)
                continue
            if budget is not None and scores is not None:
                row = scores[r].tolist()
                misses.sort(key=lambda e: -row[e])
            for e in misses:
                if (budget is not None and budget <= 0) or self.load((layer, e), background=True) is None:
                    c.misses_direct += 1
                    continue
                c.misses_loaded += 1
                self.graph_misses_loaded += 1
                if budget is not None:
                    budget -= 1
