"""The offloaded MoE layer: transformers' router and shared experts, moelite's routed experts.

Contract:
  - `ExpertManager` is three parts. `options` (`call_state.ManagerOptions`, frozen from EngineConfig at load): miss
    policy, prefetch, substitution mode and the engine's default alpha and per-layer profile. Runtime state: the
    slot pool, the cache, the reader, the background loader, reads in flight, the MoE blocks, the CUDA path.
    `counters` (`moelite.core.counters.Counters`, shared with the reader): every count and time, read through
    snapshots.
  - Per-call state (`call_state.CallState`: substitution alpha, routing hook, whether the hook runs in prefill,
    per-layer alpha multipliers) belongs to a call: `with manager.request(alpha=..., hook=...)` sets the parts it
    names for the calls inside and restores the enclosing state on exit, exceptions included. Outside every
    request the state is the engine's own (options.alpha, the installed hook, options.substitute_in_prefill,
    options.alpha_scale).
    No code outside this module writes a manager field; trace replay, the CUDA path and graph capture have their
    own methods (`set_replay`, `use_cuda`, `capturing`).
  - Hooks are typed. A routing hook is fn(ctx: RouteContext, layer, block, routing, alpha) -> Routing, called once
    per MoE layer per forward pass while the call's alpha > 0 (in decode; in prefill too with in_prefill); `ctx`
    carries the architecture adapter, expert residency and the call's substitution settings. An observer is
    fn(layer, routing, phase) with phase "prefill" or "decode" (`add_observer` / `remove_observer`); a forward is
    prefill inside `prefilling()` (a prompt, whatever its length) or when it holds more than one position.
  - `run(layer, x, idx, w, scores, decode)` computes sum_j w[n, j] * expert_{idx[n, j]}(x[n]) for every token, each
    expert once for all tokens routed to it, in named phases: group tokens by expert; settle reads that landed;
    classify the experts (resident ones pinned: the protection shield) and count them; start the misses' reads;
    compute the resident experts while they run (for one token and small experts all of them in one grouped pair
    of batched matrix-vector products, `grouped_forward`); compute "direct" misses from a read buffer; compute each
    loaded miss as its bytes land; release the shield. A miss either goes into the cache ("load") or is computed
    from a read buffer without caching ("direct"; on CUDA on the CPU, so the expert never crosses PCIe); with
    miss_policy="hybrid" the misses are split between the two paths by score and by their measured running costs.
  - Counting (one definition, moelite.core.counters): an expert whose bytes are resident is an exact hit; one whose
    read this layer starts is a miss; one whose earlier read (prefetch, preload) has not landed is a read in
    flight (waited on), never a hit; an expert present only as a substitute is a substitution.
  - Prefetch (decode only): after routing layer L, the next MoE layer's gate is applied to layer L's input;
    predicted top experts that are not resident are read in the background; predictions the next layer does not
    use are cancelled if not yet started. Precision and recall are counted.
  - Preloading is public: `preload(keys)` reads experts ahead of use (neither hits nor misses); `touch`, `slot`,
    `pin` and `unpin` let the eMoE preloader shape residency without the cache's internals.
  - `OffloadedMoEBlock` replaces a transformers MoE block (`layer.mlp`), keeping its `gate` and shared-expert
    modules; forward([B, T, H]) -> [B, T, H] equals the original block's forward (the exactness tests check it).
  - Output never depends on cache policy, prefetch, loader or miss path beyond float rounding (they change the
    order in which expert outputs are summed); only substitution (alpha > 0) changes it. Without prefetch and the
    hybrid split (both depend on I/O timing), the same configuration on the same inputs gives bit-identical outputs.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future
from contextlib import contextmanager

import torch
from torch import nn

from moelite.config import alpha_positive
from moelite.core.arch.base import ArchAdapter, Routing
from moelite.core.call_state import (DECODE, KEEP, PREFILL, CallState, ManagerOptions, Observer, RouteContext,
                                     RoutingHook, derive)
from moelite.core.counters import Counters, LayerStats, PhaseCounts
from moelite.core.cpu_kernels import ResidentKernel, expert_forward
from moelite.core.expert_cache import ExpertCache
from moelite.core.expert_store import ExpertReader, SlotPool
from moelite.core.loader import Loader, timed_read

Key = tuple[int, int]
#: largest total slot bytes that `ExpertManager.grouped_forward` gathers (a copy); above it, experts run one by one
GROUPED_MAX_BYTES = 8 << 20
#: largest slot (bytes) whose loaded misses `_compute_landed` computes in one call once they all landed
BATCH_LANDED_BYTES = 1 << 20
#: most tokens a layer pass may hold to take the all-resident lane (`ExpertManager._run_resident`): decode sizes
RESIDENT_LANE_TOKENS = 8
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


class _LayerPass:
    """One layer's tokens grouped by expert: (token, choice) pairs sorted by expert, and where each expert's run
    of pairs starts and ends; `out` accumulates the routed-expert output [N, H]."""

    __slots__ = ("x", "tok", "wts", "groups", "out", "host")

    def __init__(self, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor):
        k = idx.shape[1]
        flat = idx.reshape(-1)
        order = torch.argsort(flat, stable=True)  # [N*k] (token, choice) pairs grouped by expert
        experts, counts = torch.unique_consecutive(flat[order], return_counts=True)
        self.x = x
        self.tok = order // k
        self.wts = w.reshape(-1)[order].to(x.dtype)
        self.out = torch.zeros_like(x)
        self.groups: dict[int, tuple[int, int]] = {}
        start = 0
        for e, c in zip(experts.tolist(), counts.tolist()):
            self.groups[e] = (start, start + c)
            start += c
        self.host = None  # (x, tok, wts) on the CPU for direct misses of a CUDA layer


class ExpertManager:
    """Routed experts of every MoE layer under a fixed slot budget (see the module contract)."""

    def __init__(self, pool: SlotPool, cache: ExpertCache, reader: ExpertReader,
                 options: ManagerOptions | None = None, loader: Loader | None = None, hook: RoutingHook | None = None):
        self.options = options = options or ManagerOptions()
        self.counters: Counters = reader.counters
        # ---- runtime state
        self.pool, self.cache, self.reader, self.loader = pool, cache, reader, loader
        self.act_fn: nn.Module | None = None
        self.kernel: ResidentKernel | None = None  # CPU slots: the resident-expert kernel (set by `attach`)
        self.adapter: ArchAdapter | None = None
        self.blocks: dict[int, OffloadedMoEBlock] = {}  # layer -> block
        self.next_layer: dict[int, int] = {}  # layer -> next MoE layer
        self.inflight: dict[Key, tuple[int, Future, bool]] = {}  # key -> (slot, read, is_prefetch)
        self.prefetched_unused: set[Key] = set()
        self.cost_load, self.cost_direct = RunningCost(), RunningCost()
        #: the CUDA path (cuda_experts.CudaExperts) when the slots are in VRAM over a pinned host tier (`use_cuda`)
        self.cuda = None
        #: set while the CUDA-graph decoder captures (`capturing`): graph_decode.GraphBuffers
        self.graph_buffers = None
        #: routing source that replaces the router (trace replay on real-shape checkpoints); None = the model's gate
        self.replay = None
        self.last_x: torch.Tensor | None = None  # input [N, H] of the MoE layer now running (observers read it)
        self.prefill = False  # inside `prefilling()`
        self._observers: list[Observer] = []
        self._scratch_buf: torch.Tensor | None = None
        # ---- per-call state: the engine's own outside every request
        self.call = CallState(options.alpha, hook, options.substitute_in_prefill, options.alpha_scale)
        self.route_ctx = self._context(self.call)

    # ---- set-up ----------------------------------------------------------------------------------------------
    def attach(self, adapter: ArchAdapter, act_fn: nn.Module, blocks: dict[int, "OffloadedMoEBlock"]) -> None:
        """The model's MoE blocks (layer -> block), its architecture adapter and the experts' activation."""
        self.adapter, self.act_fn = adapter, act_fn
        if self.pool.device.type == "cpu":  # all resident experts of a layer in one call (cpu_kernels.py)
            kind = self.options.expert_kernel
            if kind in ("triton", "torch"):
                raise ValueError(f"expert_kernel: {kind!r} is a CUDA kernel; on the CPU use auto, native, compiled "
                                 "or eager")
            self.kernel = ResidentKernel(act_fn, kind)
            self.kernel.warm(self.pool.gate_up_all, self.pool.down_all)
        self.blocks = dict(sorted(blocks.items()))
        order = list(self.blocks)
        self.next_layer = dict(zip(order, order[1:]))
        self.route_ctx = self._context(self.call)

    def use_cuda(self, cuda) -> None:
        """Route `run` through the CUDA path (cuda_experts.CudaExperts built over this manager)."""
        self.cuda = cuda

    def set_replay(self, replay) -> None:
        """Follow a recorded routing (traces.TraceReplay) instead of the model's gates; None = the gates again."""
        self.replay = replay

    @contextmanager
    def capturing(self, buffers):
        """MoE layers take the device-only graph path (`OffloadedMoEBlock.graph_forward`) inside."""
        self.graph_buffers = buffers
        try:
            yield
        finally:
            self.graph_buffers = None

    def add_observer(self, fn: Observer) -> None:
        self._observers.append(fn)

    def remove_observer(self, fn: Observer) -> None:
        if fn in self._observers:
            self._observers.remove(fn)

    @property
    def observers(self) -> tuple:
        return tuple(self._observers)

    # ---- per-call state --------------------------------------------------------------------------------------
    def _context(self, call: CallState) -> RouteContext:
        return RouteContext(self.adapter, self.cache.resident, call.alpha_scale, self.options.substitution_mode,
                            self.options.io_parallel)

    @contextmanager
    def request(self, alpha=KEEP, hook=KEEP, in_prefill=KEEP, alpha_scale=KEEP):
        """Per-call state for the forward passes inside: `alpha` (a float in [0, 1), or a [N] tensor per token),
        routing `hook` (None = exact routing), `in_prefill` (the hook also runs in prefill), `alpha_scale`
        ({layer: multiplier}). Parts not named keep the enclosing call's; all are restored on exit."""
        saved = self.call, self.route_ctx
        self.call = derive(self.call, alpha, hook, in_prefill, alpha_scale)
        if alpha_scale is not KEEP:
            self.route_ctx = self._context(self.call)
        try:
            yield self.call
        finally:
            self.call, self.route_ctx = saved

    @property
    def alpha(self):
        """The substitution alpha of the call now running (a float or a [N] tensor)."""
        return self.call.alpha

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
        """One expert on tokens xs [n, H] -> [n, H] in xs's dtype (SwiGLU: down(act(gate x) * up x)); gate_up [2I, H],
        down [H, I], upcast to xs's dtype when stored narrower (bf16 slots under float32 activations on CPU)."""
        return expert_forward(gate_up, down, xs, self.act_fn)

    def grouped_forward(self, slots: list[int], x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """One token through several resident experts at once: x [1, H], w [m] -> sum_j w[j] * expert_j(x) [1, H].

        Two batched matrix-vector products over the gathered slots replace m Python-level expert calls (the
        per-expert overhead, ~50 us on CPU, is most of a small model's MoE time). Gathering copies the slots, so
        `run` uses it only while they are small (GROUPED_MAX_BYTES)."""
        idx = torch.tensor(slots, device=self.pool.device)
        gate_up = self.pool.gate_up_all.index_select(0, idx)  # [m, 2I, H]
        down = self.pool.down_all.index_select(0, idx)  # [m, H, I]
        if gate_up.dtype != x.dtype and x.device.type == "cpu":  # 16-bit slots: compute in float32 (exact, and
            gate_up, down = gate_up.to(x.dtype), down.to(x.dtype)  # fast on CPUs without AVX-512-BF16)
        h = torch.matmul(gate_up, x[0].to(gate_up.dtype))  # [m, 2I]
        g, u = h.chunk(2, dim=-1)  # [m, I] each
        y = torch.matmul(down, (self.act_fn(g) * u).unsqueeze(-1)).squeeze(-1).to(x.dtype)  # [m, H]
        return (w.to(x.dtype) @ y).unsqueeze(0)  # [1, H], summed in the activation dtype as the per-expert path

    def direct_weights(self, key: Key) -> tuple[torch.Tensor, torch.Tensor]:
        """Read `key` into this thread's staging buffer and return gate_up [2I, H] / down [H, I] views of it (no
        cache insertion), valid until this thread's next read. On CPU the views are in the slot dtype; on CUDA
        they are float32 *host* tensors: a direct miss is computed on the CPU (SMoE Algorithm 2, Fiddler), so its
        bytes never cross PCIe."""
        stage = self.reader.staging()
        self.reader.read_bytes(key, stage)
        if self.pool.quantized:  # packed bytes, computed as they are (CPU only)
            return self.pool.views(stage)
        lay = self.pool.layout
        h, i = lay.hidden, lay.intermediate
        want = self.pool.dtype if self.pool.device.type == "cpu" else torch.float32
        if stage.dtype != want:
            buf = self._scratch_buf
            if buf is None or buf.dtype != want:
                buf = self._scratch_buf = torch.empty(self.pool.slot_numel, dtype=want)  # host memory, once
            buf.copy_(stage)  # into a preallocated buffer: no allocation per miss
            stage = buf
        return stage[: 2 * i * h].view(2 * i, h), stage[2 * i * h:].view(h, i)

    # ---- reads -----------------------------------------------------------------------------------------------
    def start_read(self, key: Key, prefetch: bool = False) -> bool:
        """Acquire a slot for `key` (evicting per policy), pin it and start its read (on the loader's threads, or
        here with io_threads=0); False when every slot of its partition is shielded."""
        if not self.cache.can_acquire(key[0]):
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
            self.note_eviction(evicted)
        if self.loader is None:
            fut: Future = Future()
            try:
                fut.set_result(timed_read(self.reader, key, slot))
            except BaseException as exc:  # surfaced by wait_read
                fut.set_exception(exc)
        else:
            fut = self.loader.submit(key, slot)
        self.inflight[key] = (slot, fut, prefetch)
        return True

    def wait_read(self, key: Key) -> int:
        """Wait for the read of `key` (in flight), commit it to the cache; returns its slot, still pinned."""
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
        c = self.counters
        c.stall_seconds += time.perf_counter() - t0
        c.layer(key[0]).bytes_read += self.pool.layout.disk_bytes
        # a load's cost to the layer: its read time shared by the readers working in parallel (not its time in the
        # queue, which grows with the number of loads and would bias the hybrid split towards direct)
        self.cost_load.add(read_seconds / (self.options.io_parallel if self.loader is not None else 1))
        self.cache.commit(key, slot)
        return slot

    def note_eviction(self, key: Key) -> None:
        """Count the eviction of `key`; a prefetched expert evicted before any use was a wasted prefetch."""
        c = self.counters
        c.evictions += 1
        c.layer(key[0]).evictions += 1
        if key in self.prefetched_unused:
            self.prefetched_unused.discard(key)
            c.prefetch_wasted += 1

    def _settle(self, layer: int, needed) -> None:
        """Commit finished reads; cancel this layer's prefetches that routing did not ask for."""
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
                self.cache.unpin(self.wait_read(key))

    def _drop_prefetch(self, key: Key, slot: int) -> None:
        del self.inflight[key]
        self.cache.unpin(slot)
        self.cache.release(slot)
        self.prefetched_unused.discard(key)
        self.counters.prefetch_wasted += 1

    def _fill(self, layer: int, queue: deque, waiting: list) -> None:
        while queue and self.start_read((layer, queue[0])):
            waiting.append(queue.popleft())

    def _drain_one(self) -> None:
        if not self.inflight:
            raise RuntimeError("expert cache: no slot can be freed; the budget is below what one layer needs")
        key = next(iter(self.inflight))
        self.cache.unpin(self.wait_read(key))

    def prefetch_next(self, layer: int, x: torch.Tensor) -> None:
        """Predict the next MoE layer's experts from x [N, H] through its gate and read the top ones early."""
        nxt = self.next_layer.get(layer)
        if nxt is None or self.cache.resident_count(nxt) == self.pool.layout.num_experts:
            return  # no next layer, or every expert of it resident: nothing to predict
        if self.replay is not None:  # replayed routing: the recorded model's own next-layer prediction
            pred = self.replay.predicted(layer, nxt)
            if pred is None:
                return
        else:
            block = self.blocks[nxt]
            pred = block.adapter.route(block.block, x, block.top_k).idx  # [N, k], best first
        # only the most confident predictions: a wrong prefetch costs a read and may evict a useful expert
        m = self.options.prefetch_experts or max(1, pred.shape[1] // 2)
        for e in pred[:, :m].unique().tolist():
            key = (nxt, e)
            if self.cache.resident(key) or key in self.inflight:
                continue
            # on CUDA with a host tier the read is a copy from pinned RAM, issued at once
            started = self.start_read(key, prefetch=True) if self.cuda is None else self.cuda.load(key) is not None
            if not started:
                break
            self.counters.prefetch_issued += 1
            self.prefetched_unused.add(key)

    # ---- preloading (eMoE, warm start) -----------------------------------------------------------------------
    def preload(self, keys, wait: bool = True) -> int:
        """Read (layer, expert) keys into the cache ahead of use, in the order given, stopping when no slot can be
        freed; returns how many reads were started. Preloads count as neither hits nor misses. With wait=False the
        reads land in the background (a layer needing one before then waits on it: a read in flight)."""
        started = 0
        for key in keys:
            if self.cache.resident(key) or key in self.inflight:
                continue
            ok = self.cuda.load(key) is not None if self.cuda is not None else self.start_read(key)
            if not ok:
                break
            started += 1
        if wait:
            for key in list(self.inflight):
                self.cache.unpin(self.wait_read(key))
        return started

    def warm_start(self) -> int:
        """Fill free slots with experts in layer order, lowest index first (SMoE's warm start); returns how many."""
        n_experts, n = self.pool.layout.num_experts, 0
        for layer in self.blocks or self.pool.layout.layers:
            for e in range(n_experts):
                if not self.cache.free[layer]:
                    break
                if not self.cache.resident((layer, e)):
                    slot = self.cache.acquire((layer, e))
                    try:
                        self.reader.read_into((layer, e), slot)
                    except BaseException:
                        self.cache.release(slot)  # a failed read (an integrity error) keeps no slot
                        raise
                    self.cache.commit((layer, e), slot)
                    n += 1
        return n

    def touch(self, key: Key) -> None:
        """A policy access to a resident expert (recency, frequency) that counts as neither hit nor miss."""
        self.cache.lookup(key)

    def slot(self, key: Key) -> int | None:
        """The slot of a resident expert, else None."""
        return self.cache.slot(key)

    def pin(self, key: Key) -> int | None:
        """Shield a resident expert from eviction until `unpin(slot)`; returns its slot (None: not resident)."""
        slot = self.cache.slot(key)
        if slot is not None:
            self.cache.pin(slot)
        return slot

    def unpin(self, slot: int) -> None:
        self.cache.unpin(slot)

    # ---- the layer ---------------------------------------------------------------------------------------------
    def run(self, layer: int, x: torch.Tensor, idx: torch.Tensor, w: torch.Tensor, probs: torch.Tensor | None = None,
            decode: bool = False, substituted: torch.Tensor | None = None) -> torch.Tensor:
        """x [N, H], idx [N, k], w [N, k], probs [N, E] or None, substituted [N, k] bool or None -> out [N, H]."""
        if self.cuda is not None:
            return self.cuda.run(layer, x, idx, w, probs, decode, substituted)
        pins, inflight = self.cache.pins_snapshot(), set(self.inflight)
        try:
            return self._run(layer, x, idx, w, probs, decode, substituted)
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
                self.cache.commit(key, slot)
            else:
                self.cache.release(slot)
        self.cache.restore_pins(pins)

    def _run(self, layer, x, idx, w, probs, decode, substituted) -> torch.Tensor:
        if not self.inflight and self.kernel is not None and idx.shape[0] <= RESIDENT_LANE_TOKENS:
            out = self._run_resident(layer, x, idx, w, decode, substituted)
            if out is not None:
                return out
        lp = _LayerPass(x, idx, w)  # group tokens by expert
        stats = self.counters.layer(layer)
        stats.tokens += idx.shape[0]
        stall_at_start = self.counters.stall_seconds
        self._settle(layer, lp.groups)
        resident, waiting, missing = self._classify(layer, lp, idx, substituted, decode, stats)
        to_load, direct = self.split_misses(layer, missing, probs)
        if direct and x.device.type != "cpu":  # copied before any expert kernel is queued, so it waits for none
            lp.host = (x.detach().to("cpu", torch.float32), lp.tok.cpu(), lp.wts.to("cpu", torch.float32))
        queue = deque(to_load)
        self._fill(layer, queue, waiting)  # start the misses' reads before computing the resident experts
        done = self._compute_resident(lp, resident)
        self._fill(layer, queue, waiting)
        if decode and self.options.prefetch and not queue:
            self.prefetch_next(layer, x)  # reads for layer L+1 queue behind this layer's misses
        self._compute_direct(layer, lp, direct, stats)
        self._compute_landed(layer, lp, waiting, queue, done)
        for slot in done:  # release the shield
            self.cache.unpin(slot)
        c = self.counters
        stats.stall_seconds += c.stall_seconds - stall_at_start
        c.misses_loaded += len(to_load)
        c.misses_direct += len(direct)
        return lp.out

    def _run_resident(self, layer, x, idx, w, decode, substituted) -> torch.Tensor | None:
        """The steady state of decode: no read in flight and every selected expert resident. Then nothing can evict
        while the layer computes (evictions happen only when a read starts), so the layer needs no grouping pass and
        no shield: its lookups and counts, then one kernel call over the (token, expert) pairs in the order the full
        path uses (grouped by expert, stable), so the result is the same. None (nothing done, nothing counted)
        when an expert is not resident: the full path runs."""
        cache, k = self.cache, idx.shape[1]
        flat = idx.reshape(-1).tolist()  # [N*k]
        slots = [cache.slot((layer, e)) for e in flat]
        if None in slots:
            return None
        stats = self.counters.layer(layer)
        stats.tokens += idx.shape[0]
        sub_only = self.count_substitutions(stats, idx, substituted, decode)
        experts = sorted(set(flat))
        for e in experts:  # the policy's accesses and the prefetch accounting, as `_classify` makes them
            self.note_prefetch_use((layer, e), stats)
            cache.lookup((layer, e))
        self.account(stats, self.counters.phase(decode), sum(e not in sub_only for e in experts), 0, 0)
        t0 = time.perf_counter()
        order = sorted(range(len(flat)), key=flat.__getitem__)  # pairs grouped by expert, stable
        out = self.kernel.run(self.pool.gate_up_all, self.pool.down_all, x,
                              torch.tensor([slots[j] for j in order]), torch.tensor([j // k for j in order]),
                              w.reshape(-1)[torch.tensor(order)].to(x.dtype))
        self.counters.compute_seconds += time.perf_counter() - t0
        if decode and self.options.prefetch:
            self.prefetch_next(layer, x)
        return out

    def _classify(self, layer: int, lp: _LayerPass, idx, substituted, decode: bool, stats: LayerStats):
        """Resident experts (pinned), experts whose read is in flight, and missing ones; counts all three."""
        sub_only = self.count_substitutions(stats, idx, substituted, decode)
        resident, waiting, missing = [], [], []
        cache = self.cache
        for e in lp.groups:
            key = (layer, e)
            self.note_prefetch_use(key, stats)
            slot = cache.lookup(key)
            if slot is not None:
                cache.pin(slot)  # shield: not evictable until computed
                resident.append((e, slot))
            elif key in self.inflight:
                waiting.append(e)
                cache.policy.on_access(key)
            else:
                missing.append(e)
        n_hit = sum(e not in sub_only for e, _ in resident)
        n_wait = sum(e not in sub_only for e in waiting)
        self.account(stats, self.counters.phase(decode), n_hit, len(missing), n_wait)
        return resident, waiting, missing

    def _compute(self, lp: _LayerPass, gate_up: torch.Tensor, down: torch.Tensor, e: int) -> None:
        t0 = time.perf_counter()
        s, t = lp.groups[e]
        ti = lp.tok[s:t]
        lp.out.index_add_(0, ti, self.expert_forward(gate_up, down, lp.x[ti]) * lp.wts[s:t, None])
        self.counters.compute_seconds += time.perf_counter() - t0

    def _compute_on_host(self, lp: _LayerPass, gate_up: torch.Tensor, down: torch.Tensor, e: int) -> None:
        hx, htok, hw = lp.host
        s, t = lp.groups[e]
        y = self.expert_forward(gate_up, down, hx[htok[s:t]]) * hw[s:t, None]  # [n, H] on the CPU
        lp.out.index_add_(0, lp.tok[s:t], y.to(lp.out.device, lp.out.dtype))

    def _compute_resident(self, lp: _LayerPass, resident: list) -> deque:
        """The resident experts, while the misses' reads run; returns their slots (still shielded)."""
        done: deque[int] = deque()
        if lp.x.shape[0] == 1 and len(resident) > 1 and len(resident) * self.pool.slot_bytes <= GROUPED_MAX_BYTES \
                and not self.pool.quantized and (self.kernel is None or self.kernel.kind != "native"):
            t0 = time.perf_counter()
            slots = [slot for _, slot in resident]
            if len(resident) == len(lp.groups) == lp.wts.shape[0]:  # all resident, each expert once: the sorted
                w_res = lp.wts  # weights are already one per expert, in the same order
            else:  # [m] (an expert listed twice: its weights add up, the token being the same)
                w_res = torch.stack([lp.wts[slice(*lp.groups[e])].sum() for e, _ in resident])
            lp.out += self.grouped_forward(slots, lp.x, w_res)
            done.extend(slots)
            self.counters.compute_seconds += time.perf_counter() - t0
        elif self.kernel is not None and resident:  # CPU, larger experts: every resident (token, expert) pair in one call
            t0 = time.perf_counter()
            runs = [(slot, *lp.groups[e]) for e, slot in resident]  # (slot, first pair, end) per expert
            pick = torch.cat([torch.arange(s, t) for _, s, t in runs])  # [P] its pairs in the sorted order
            slots = torch.tensor([slot for slot, s, t in runs for _ in range(t - s)])  # [P]
            lp.out += self.kernel.run(self.pool.gate_up_all, self.pool.down_all, lp.x, slots, lp.tok[pick],
                                      lp.wts[pick])
            done.extend(slot for _, slot in resident)
            self.counters.compute_seconds += time.perf_counter() - t0
        else:
            for e, slot in resident:
                self._compute(lp, self.pool.gate_up(slot), self.pool.down(slot), e)
                done.append(slot)
        return done

    def _compute_direct(self, layer: int, lp: _LayerPass, direct: list, stats: LayerStats) -> None:
        """Direct misses: read into this thread's buffer and computed here while the loader fills slots."""
        c = self.counters
        for e in direct:
            t0 = time.perf_counter()
            gate_up, down = self.direct_weights((layer, e))
            c.stall_seconds += time.perf_counter() - t0
            stats.bytes_read += self.pool.layout.disk_bytes
            (self._compute if lp.host is None else self._compute_on_host)(lp, gate_up, down, e)
            self.cost_direct.add(time.perf_counter() - t0)

    def _compute_landed(self, layer: int, lp: _LayerPass, waiting: list, queue: deque, done: deque) -> None:
        """Loaded misses (and reads in flight); reads still queued start as slots free. Large experts are computed
        each as its bytes land (the next reads run meanwhile). Small ones (slots of at most BATCH_LANDED_BYTES,
        with the one-call kernel, decode-sized passes) are computed together in one call once they landed: their
        reads take less than a call of their own. Either way the grouping depends on the configuration only, never on I/O timing."""
        batch = self.kernel is not None and self.pool.slot_bytes <= BATCH_LANDED_BYTES \
            and lp.x.shape[0] <= RESIDENT_LANE_TOKENS
        landed: list[tuple[int, int]] = []  # (expert, slot) read, not computed yet

        def compute_landed():
            landed.sort()  # in the layer's expert order, as the resident ones
            done.extend(self._compute_resident(lp, landed))
            landed.clear()

        while waiting or queue:
            if not waiting:  # no slot free: lift the shield of a computed expert, else let a read land
                if landed:
                    compute_landed()
                if done:
                    self.cache.unpin(done.popleft())
                else:
                    self._drain_one()
                self._fill(layer, queue, waiting)
                continue
            e = waiting.pop(0)
            slot = self.wait_read((layer, e))
            if batch:
                landed.append((e, slot))
            else:
                self._compute(lp, self.pool.gate_up(slot), self.pool.down(slot), e)
                done.append(slot)
            self._fill(layer, queue, waiting)
        if landed:
            compute_landed()

    # ---- counting (shared with the CUDA path) ----------------------------------------------------------------
    @staticmethod
    def account(stats: LayerStats, phase: PhaseCounts, hits: int, misses: int, in_flight: int) -> None:
        """Count a layer pass's exact hits, misses and reads in flight in its layer and phase."""
        stats.hits += hits
        stats.misses += misses
        stats.in_flight += in_flight
        phase.hits += hits
        phase.misses += misses
        phase.in_flight += in_flight

    def count_substitutions(self, stats: LayerStats, idx: torch.Tensor, substituted: torch.Tensor | None,
                            decode: bool) -> set[int]:
        """Count a layer's substituted evaluations (idx [N, k], substituted [N, k] bool or None, same device).
        Returns the experts present only as substitutes: resident by construction, so their lookups are
        substitutions, not hits."""
        if substituted is None:
            return set()
        n_sub = int(substituted.sum())
        if not n_sub:
            return set()
        self.counters.phase(decode).substitutions += n_sub
        stats.substitutions += n_sub
        return set(idx[substituted].tolist()) - set(idx[~substituted].tolist())

    def note_prefetch_use(self, key: Key, stats: LayerStats) -> None:
        """A layer asked for `key`: if a prefetch brought it, that prefetch was used."""
        if key in self.prefetched_unused:
            self.prefetched_unused.discard(key)
            self.counters.prefetch_used += 1
            stats.prefetch_hits += 1

    def split_misses(self, layer: int, missing: list[int], probs: torch.Tensor | None) -> tuple[list[int], list[int]]:
        """(to load into the cache, to compute directly) per miss_policy; "hybrid": the highest-scoring misses go
        to the cache (likely reused), the low end is computed directly, balancing n_load * C_load against
        n_direct * C_direct (SMoE Algorithm 2) with the measured running costs. On the CPU a miss that a free slot
        can take is always loaded: there a direct miss reads the same bytes from the same disk, so it saves
        nothing, and its expert would be read again at its next use (on CUDA it runs on another resource, the
        CPU, and spares a copy over PCIe)."""
        policy = self.options.miss_policy
        if not missing or policy == "load":
            return missing, []
        if policy == "direct":
            return [], missing
        if probs is not None:
            score = probs.float().mean(0)
            missing = sorted(missing, key=lambda e: -float(score[e]))
        c_load = self.cost_load.value(1.0)
        c_direct = self.cost_direct.value(1.0)
        free = len(self.cache.free[layer]) if self.pool.device.type == "cpu" else 0
        lo, hi = min(free, len(missing)), len(missing)
        t_load, t_direct = lo * c_load, 0.0
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
    # path, `graph_forward`, on its own; the eager path has host-side cache bookkeeping)
    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        if self.manager.graph_buffers is not None:  # being captured into a CUDA graph: device-only path
            bsz, seq, hid = hidden_states.shape
            return self.graph_forward(hidden_states.reshape(-1, hid)).reshape(bsz, seq, hid)
        return self.eager_forward(hidden_states)

    def eager_forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """[B, T, H] -> [B, T, H] with host-side cache bookkeeping (lean decode calls it directly)."""
        bsz, seq, hid = hidden_states.shape
        x = hidden_states.reshape(-1, hid)  # [N, H]
        m = self.manager
        m.last_x = x  # observers (trace recorder) may predict the next layer from it
        if m.replay is not None:
            idx, probs = m.replay.route(self.layer, x.shape[0], self.top_k, x.device)  # idx [N, k], probs [N, E]
            routing = Routing(probs, probs, idx, self.adapter.weigh(self.block, probs, idx))
        else:
            routing = self.adapter.route(self.block, x, self.top_k)  # idx [N, k]
        decode = seq == 1 and not m.prefill
        if m._observers:
            phase = DECODE if decode else PREFILL
            for obs in m._observers:
                obs(self.layer, routing, phase)
        call = m.call
        if call.hook is not None and (decode or call.in_prefill) and alpha_positive(call.alpha):
            routing = call.hook(m.route_ctx, self.layer, self.block, routing, call.alpha)
        out = m.run(self.layer, x, routing.idx, routing.weights, routing.probs, decode, routing.substituted)
        shared = self.adapter.shared(self.block, x)
        if shared is not None:
            out = out + shared
        return out.reshape(bsz, seq, hid)

    def graph_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The capture-safe path (x [N, H] -> [N, H]): routing and the routed experts on the device, no host sync."""
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

    def compile_graph_forward(self) -> None:
        """torch.compile the capture-safe path (graph_decode.compile_decode, once per engine)."""
        self.graph_forward = torch.compile(self.graph_forward, dynamic=False)
