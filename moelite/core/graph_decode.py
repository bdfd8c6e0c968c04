"""Lock-step decode of B sequences over a static KV cache; on CUDA each decode step is a replayed CUDA graph.

Contract:
  - `StaticDecoder(engine, batch, max_len)`; `prefill(prompts)` -> float32 logits [B, V] (CPU) of each prompt's
    last token; `step(tokens)` -> logits [B, V] after feeding one token per sequence. Prompts of different lengths
    are left-padded: a 4D boolean mask hides the padding and the cache positions not yet written, and position
    ids count from each prompt's first real token, so each row decodes as it would alone.
  - Graphs (CUDA, the fused expert path on, `cuda_graphs`): the decode step is captured once per decoder, that is
    per (batch size, cache length) (`Engine._decoder` keeps them). The captured MoE layers route on the device and
    look their experts up in the device slot table. After a replay one small copy brings back the logits, the
    per-layer miss flags and the selected experts. No miss: the cache policy sees the accesses and the step is
    done. A miss: the step is redone eagerly (misses copied from the host tier or computed on the CPU), which
    rewrites the same KV position. After a failed replay the next attempts back off (1, 2, 4 ... 16 steps).
    The graph runs SMoE's cache router on the device (the call's alpha and profile); a call with another routing
    hook active decodes eagerly.
  - The KV cache is transformers' `StaticCache`; its write position is reset before every forward, so a redone
    step overwrites rather than appends.
"""

from __future__ import annotations

import inspect
import time
import warnings
import weakref
from dataclasses import dataclass

import torch
from transformers import StaticCache

from moelite.config import alpha_positive
from moelite.core.substitution import cache_router


@dataclass
class GraphBuffers:
    flags: torch.Tensor  # [L] bool: a selected expert was not resident
    idx: torch.Tensor  # [L, B, k] int64 selected experts
    scores: torch.Tensor | None  # [L, E] mean gate scores (score-window policy), or None
    substituted: torch.Tensor | None = None  # [L, B, k] bool: entries the device cache router substituted
    alpha: torch.Tensor | None = None  # [L] per-layer alpha of the cache router; None = no router in this graph
    replay_idx: torch.Tensor | None = None  # [L, B, k] routing to replay (trace replay), staged before each replay
    replay_probs: torch.Tensor | None = None  # [L, B, E]


def _static_cache(hf_config, batch: int, max_len: int, device, dtype) -> StaticCache:
    params = inspect.signature(StaticCache.__init__).parameters
    kw = dict(config=hf_config, max_cache_len=max_len)
    if "max_batch_size" in params:
        kw["max_batch_size"] = batch
    if "device" in params:
        kw["device"] = device
    if "dtype" in params:
        kw["dtype"] = dtype
    return StaticCache(**kw)


class StaticDecoder:
    def __init__(self, engine, batch: int, max_len: int):
        self.eng, self.batch, self.max_len = engine, batch, max_len
        dev = engine.device
        self.cache = _static_cache(engine.hf_config, batch, max_len, dev, engine.dtype)
        #: sliding-window layers keep their own position counter and mask; the engine decodes such models with a
        #: DynamicCache, and generate_batch only within the window
        self.sliding = any(getattr(layer, "is_sliding", False) or "Sliding" in type(layer).__name__
                           for layer in getattr(self.cache, "layers", []))
        self.valid = torch.zeros((batch, max_len), dtype=torch.bool, device=dev)
        self.ids = torch.zeros((batch, 1), dtype=torch.long, device=dev)
        self.pos = torch.zeros((batch, 1), dtype=torch.long, device=dev)
        self.cache_pos = torch.zeros((1,), dtype=torch.long, device=dev)
        self.cur = 0
        m = engine.manager
        self.use_graph = dev.type == "cuda" and m.cuda is not None and engine.config.cuda_graphs and not self.sliding
        self.graphs: dict[bool, tuple] = {}  # with cache router? -> (CUDAGraph, logits buffer)
        self.backoff = 0
        self.skip = 0
        self.graph_steps = 0
        self.eager_steps = 0
        self.graph_misses = 0
        if self.use_graph:
            n_layers, k = len(m.cuda.layers), engine.top_k
            self.buffers = GraphBuffers(
                flags=torch.zeros(n_layers, dtype=torch.bool, device=dev),
                idx=torch.zeros((n_layers, batch, k), dtype=torch.long, device=dev),
                scores=torch.zeros((n_layers, engine.num_experts), device=dev)
                if hasattr(m.cache.policy, "mean_scores") else None,  # only the score-window policy reads them
                substituted=torch.zeros((n_layers, batch, k), dtype=torch.bool, device=dev))
            self.alpha_buf = torch.zeros(n_layers, device=dev)
            b = self.buffers  # pinned host copies, filled asynchronously after each replay
            self.h_flags = torch.zeros(n_layers, dtype=torch.bool).pin_memory()
            self.h_idx = torch.zeros(b.idx.shape, dtype=torch.long).pin_memory()
            self.h_sub = torch.zeros(b.substituted.shape, dtype=torch.bool).pin_memory()
            self.h_scores = torch.zeros(b.scores.shape).pin_memory() if b.scores is not None else None
            self.h_logits = None
            self.done_event = torch.cuda.Event()
            self.cursor = torch.zeros(1, dtype=torch.long, device=dev)  # step within the staged replay chunk
            self.replay_left = 0
            self.replay_all = None  # ([C, L, B, k], [C, L, B, E]) staged trace-replay routing
        self._deferred = None  # bookkeeping of the last replayed step, done while the next one runs

    # ---- KV position ---------------------------------------------------------------------------------------
    def _set_write_position(self) -> None:
        for layer in getattr(self.cache, "layers", []):
            cl = getattr(layer, "cumulative_length", None)
            if isinstance(cl, torch.Tensor) and cl.device == self.cache_pos.device:
                cl.copy_(self.cache_pos.view_as(cl))
            elif cl is not None and not isinstance(cl, torch.Tensor):
                layer.cumulative_length = self.cur

    def _forward(self, ids, pos, mask) -> torch.Tensor:
        b = self.eng.manager.graph_buffers
        if b is not None and self.replay_all is not None:  # captured: this step's row of the staged chunk
            b.replay_idx = self.replay_all[0].index_select(0, self.cursor)[0]
            b.replay_probs = self.replay_all[1].index_select(0, self.cursor)[0]
        self._set_write_position()
        cache_position = self.cache_pos + torch.arange(ids.shape[1], device=ids.device)
        out = self.eng.model(input_ids=ids, position_ids=pos, cache_position=cache_position, attention_mask=mask,
                             past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]  # [B, V]

    # ---- prefill -------------------------------------------------------------------------------------------
    def reset(self) -> None:
        self.valid.zero_()
        self.cur = 0
        self.cache_pos.zero_()

    @torch.inference_mode()
    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        self.flush()
        if len(prompts) != self.batch:
            raise ValueError(f"prompts: {len(prompts)} given to a decoder of batch {self.batch}")
        self.reset()
        dev = self.eng.device
        t = max(len(p) for p in prompts)
        pads = [t - len(p) for p in prompts]
        ids = torch.tensor([[0] * d + list(p) for d, p in zip(pads, prompts)], dtype=torch.long, device=dev)
        pad = torch.tensor(pads, device=dev)
        ar = torch.arange(t, device=dev)
        real = ar[None, :] >= pad[:, None]  # [B, T]
        self.valid[:, :t] = real
        causal = ar[None, :] <= ar[:, None]  # [T(q), T(kv)]
        mask = torch.zeros((self.batch, 1, t, self.max_len), dtype=torch.bool, device=dev)
        mask[:, 0, :, :t] = causal[None] & real[:, None, :]
        mask[:, 0, ar, ar] = True  # a padding row attends to itself (no empty softmax row, no NaN in the cache)
        self.pos_offset = pad.view(-1, 1)
        pos = (ar[None, :] - self.pos_offset).clamp_min(0)
        with self.eng.manager.prefilling():
            logits = self._forward(ids, pos, mask)
        self.cur = t
        self.cache_pos.fill_(t)
        self.pos.copy_(t - self.pos_offset)
        return logits.float().cpu()

    # ---- decode --------------------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self, tokens: list[int]) -> torch.Tensor:
        if self.cur >= self.max_len:
            raise ValueError(f"decoder: the static cache of {self.max_len} positions is full")
        self.ids.copy_(torch.tensor(tokens, dtype=torch.long).view(-1, 1), non_blocking=False)
        self.valid[:, self.cur] = True
        logits = None
        if self.use_graph and self.skip == 0:
            logits = self._graph_step()
        elif self.skip:
            self.skip -= 1
        if logits is None:
            mask = self.valid[:, None, None, :]
            logits = self._forward(self.ids, self.pos, mask).float().cpu()
            self.eager_steps += 1
        self.cur += 1
        self.cache_pos.add_(1)
        self.pos.add_(1)
        return logits

    CHUNK = 64  # decode steps of trace-replay routing staged on the device at once

    def _stage_replay(self, m) -> None:
        """Trace replay: the next CHUNK steps' recorded routing, in one copy, into the buffers the graph reads
        (row `cursor`). Consumes the replay's rows as CHUNK steps of `batch` tokens would."""
        if m.replay is None or self.replay_left > 0:
            return
        k, c, bsz = self.eng.top_k, self.CHUNK, self.batch
        idx, probs = [], []
        for layer in m.cuda.layers:
            i, p = m.replay.route(layer, bsz * c, k, "cpu")
            idx.append(i.view(c, bsz, k))
            probs.append(p.view(c, bsz, -1))
        idx, probs = torch.stack(idx, 1), torch.stack(probs, 1)  # [C, L, B, k], [C, L, B, E]
        if self.replay_all is None:
            self.replay_all = (torch.empty(idx.shape, dtype=torch.long, device=self.eng.device),
                               torch.empty(probs.shape, device=self.eng.device))
        self.replay_all[0].copy_(idx)
        self.replay_all[1].copy_(probs)
        self.cursor.zero_()
        self.replay_left = c

    def _graph_step(self) -> torch.Tensor | None:
        m = self.eng.manager
        cuda, b, call = m.cuda, self.buffers, m.call
        alpha = float(call.alpha.max()) if isinstance(call.alpha, torch.Tensor) else float(call.alpha)
        sub = call.hook is not None and alpha_positive(alpha)
        if sub and call.hook is not cache_router:  # the graph plans SMoE's router on the device, no other hook
            return None
        self._stage_replay(m)
        if sub:
            self.alpha_buf.copy_(torch.tensor(cuda.alphas(alpha)))
        if sub not in self.graphs:
            try:
                self._capture(sub)
            except RuntimeError as exc:  # an op of this architecture cannot be captured: decode eagerly
                warnings.warn(f"CUDA graph capture failed ({str(exc).splitlines()[0][:200]}); this decoder "
                              "runs eagerly", stacklevel=2)
                self.use_graph = False
                torch.cuda.synchronize(self.eng.device)
                return None
        graph, logits_out = self.graphs[sub]
        table = cuda.sync_table()
        b.flags.zero_()
        if sub:
            b.substituted.zero_()
        t0 = time.perf_counter()
        graph.replay()
        self.flush()  # the previous step's bookkeeping (and its background copies) while this one runs
        if self.h_logits is None or self.h_logits.shape != logits_out.shape:
            self.h_logits = torch.empty(logits_out.shape, dtype=logits_out.dtype).pin_memory()
        for host, dev in ((self.h_flags, b.flags), (self.h_logits, logits_out), (self.h_idx, b.idx),
                          (self.h_sub, b.substituted), (self.h_scores, b.scores)):
            if host is not None:
                host.copy_(dev, non_blocking=True)
        self.done_event.record()
        self.done_event.synchronize()
        step_s = time.perf_counter() - t0
        if m.replay is not None:
            self.cursor.add_(1)
            self.replay_left -= 1
        if bool(self.h_flags.any()):  # an expert only on SSD was selected: redo the step eagerly (it reads it)
            self.graph_misses += 1
            self.backoff = min(16, max(1, self.backoff * 2))
            self.skip = self.backoff - 1
            return None
        self.backoff = 0
        self.graph_steps += 1
        self._deferred = (self.h_idx.clone(), self.h_sub.clone() if sub else None,
                          self.h_scores.clone() if self.h_scores is not None else None, step_s, table)
        return self.h_logits.to(torch.float32, copy=True)  # the pinned buffer is reused by the next step

    def flush(self) -> None:
        """Run the bookkeeping of the last replayed step now (the policy's accesses, hit counters, copies)."""
        if self._deferred is not None:
            deferred, self._deferred = self._deferred, None
            self.eng.manager.cuda.after_graph_step(*deferred)

    def _capture(self, sub: bool) -> None:
        m = self.eng.manager
        dev = self.eng.device
        if self.eng.config.compile_decode:
            compile_decode(self.eng)
        mask = self.valid[:, None, None, :]
        self.buffers.alpha = self.alpha_buf if sub else None
        try:
            with m.capturing(self.buffers):
                side = torch.cuda.Stream(dev)
                side.wait_stream(torch.cuda.current_stream(dev))
                with torch.cuda.stream(side):
                    for _ in range(2):  # compiles the kernels, initialises the cache; outputs are discarded
                        self._forward(self.ids, self.pos, mask)
                torch.cuda.current_stream(dev).wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    logits = self._forward(self.ids, self.pos, mask)
                self.graphs[sub] = (graph, logits)
        finally:
            self.buffers.alpha = None
        # the graph reads the buffers' tensors by address; the Python object is needed only while capturing


_COMPILED: weakref.WeakSet = weakref.WeakSet()  # engines whose decode path compile_decode compiled


def compile_decode(engine) -> None:
    """torch.compile the decoder layers (for decode steps: while a graph is being captured) and each MoE block's
    graph path, once per engine. The layers' eager path (prefill, redone steps) stays uncompiled, so prompt
    lengths cause no recompilation; each batch size compiles once."""
    if engine in _COMPILED:
        return
    import torch._dynamo as dynamo

    for name in ("recompile_limit", "cache_size_limit"):  # one specialisation per layer and batch size
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(getattr(dynamo.config, name), 8 * len(engine.model.model.layers)))
    m = engine.manager
    for layer in engine.model.model.layers:
        eager, fast = layer.forward, torch.compile(layer.forward, dynamic=False)
        layer.forward = lambda *a, _e=eager, _f=fast, **kw: (_f if m.graph_buffers is not None else _e)(*a, **kw)
    for block in m.blocks.values():
        block.compile_graph_forward()
    _COMPILED.add(engine)


def bucket(n: int, step: int = 256) -> int:
    """Cache length for n positions, rounded up so that few decoders (and graphs) serve many requests."""
    return -(-n // step) * step
