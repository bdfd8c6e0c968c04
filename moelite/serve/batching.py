"""Continuous batching: concurrent requests share one decode loop.

Contract:
  - A `Sequence` is one generation (one prompt, one set of sampling parameters, one substitution alpha, optional
    TTFT / TPOT targets). Events go to `seq.emit(event)`, called from the loop thread:
        ("text", piece)                         a decoded text piece (one or more tokens)
        ("done", result_dict)                   finished: text, token_ids, finish_reason, usage and timings
        ("error", status, message, retry_after) refused (429/503), timed out in the queue (429) or failed (500)
    `seq.cancel()` (thread-safe) drops it at the next step boundary, freeing its KV cache.
  - `Batcher(engine, scheduler, max_queue, max_batch)`: `submit(seq)` queues it (raises `Rejected` 429 when the
    queue is full, 503 while draining). `step()` is one round: drop cancelled / timed-out sequences, let the
    scheduler admit (or refuse) waiting ones, prefill each newly admitted sequence with the normal full forward
    (first token), then ONE decode step for all running sequences. `start()` runs `step()` in a background thread
    that owns the engine (the engine's lock is held per step, so direct engine calls interleave between steps);
    `drain()` refuses new work; `stop()` ends the thread.
  - A decode step walks the decoder layers: attention per sequence (its own DynamicCache, positions, rotary
    embedding and mask), then a single `post_attention_layernorm` + `mlp` call on all sequences' tokens [B, 1, H],
    so each routed expert is computed once per step for all tokens routed to it. Greedy output is token-for-token
    the output of `engine.generate(..., temperature=0)` (tests/test_batching.py). Per-sequence alphas reach the
    MoE layers as a [B] tensor when they differ.
  - `batch_generate(engine, prompts, ...)` runs a list of prompts through one batcher synchronously.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from moelite.config import check_alpha
from moelite.engine import Generation
from moelite.core.sampling import SamplingParams, sample
from moelite.serve.scheduler import Scheduler, SchedulerConfig

log = logging.getLogger("moelite.serve.batching")


class Rejected(Exception):
    """A request the batcher will not take now: `status` 429 (queue full / overloaded) or 503 (draining)."""

    def __init__(self, status: int, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[tuple], None] = lambda ev: None
    alpha: float = 0.0
    task: str = "default"
    ttft_slo: float | None = None  # seconds; None = no target
    tpot_slo: float | None = None
    timeout: float | None = None  # seconds from arrival
    arrival: float = field(default_factory=time.monotonic)
    # ---- loop-thread state ----
    expected_tokens: int = 0  # G_i of eMoE: remaining-token estimate, set by the scheduler
    expected_initial: int = 0
    degraded: bool = False
    cache: object = None
    generator: torch.Generator | None = None
    out_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: str = ""
    finish: str | None = None
    t_admit: float | None = None
    t_first: float | None = None
    t_last: float | None = None
    last_token: int = -1
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def kv_tokens(self) -> int:
        """Token budget this sequence may occupy: prompt + max_tokens."""
        return len(self.prompt_ids) + self.params.max_tokens

    @property
    def ttft_deadline(self) -> float:
        return self.arrival + (self.ttft_slo if self.ttft_slo is not None else 1e9)


class Batcher:
    def __init__(self, engine, scheduler=None, max_queue: int = 64, max_batch: int = 8):
        if max_queue < 1 or max_batch < 1:
            raise ValueError(f"max_queue / max_batch: must be >= 1, got {max_queue} / {max_batch}")
        self.engine = engine
        self.scheduler = scheduler or Scheduler(SchedulerConfig(mode="fcfs", max_batch=max_batch),
                                                max_context=engine.max_context)
        self.max_queue, self.max_batch = max_queue, self.scheduler.max_batch
        self.waiting: list[Sequence] = []
        self.running: list[Sequence] = []
        self._inbox: collections.deque[Sequence] = collections.deque()
        self._cv = threading.Condition()
        self._thread: threading.Thread | None = None
        self._stop = False
        self.draining = False
        self.tokens_generated = 0
        self.steps = 0
        self.finished = 0
        self.busy = False  # a step is in progress (for idle())
        cfg = engine.hf_config
        n = len(engine.model.model.layers)
        types = getattr(cfg, "layer_types", None)
        if types:
            self._sliding = [t == "sliding_attention" for t in types[:n]]
        else:  # Mixtral / Qwen3-MoE style: one mask kind for all layers, chosen by config.sliding_window
            self._sliding = [getattr(cfg, "sliding_window", None) is not None] * n

    # ---- submission (any thread) ----------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> Sequence:
        check_alpha(seq.alpha)
        with self._cv:
            if self.draining or self._stop:
                raise Rejected(503, "server is shutting down; retry on another instance", 5.0)
            if self.queue_depth() >= self.max_queue:
                raise Rejected(429, f"queue full ({self.max_queue} waiting requests); retry later", 1.0)
            seq.arrival = time.monotonic()
            self._inbox.append(seq)
            self._cv.notify_all()
        return seq

    def queue_depth(self) -> int:
        return len(self._inbox) + len(self.waiting)

    def idle(self) -> bool:
        with self._cv:
            return not self._inbox and not self.waiting and not self.running and not self.busy

    def drain(self) -> None:
        with self._cv:
            self.draining = True
            self._cv.notify_all()

    # ---- loop thread --------------------------------------------------------------------------------------
    def start(self) -> "Batcher":
        self._thread = threading.Thread(target=self._loop, name="moelite-batcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 10.0) -> None:
        with self._cv:
            self._stop = True
            self._cv.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
        for s in list(self._inbox) + self.waiting + self.running:  # whatever is left: tell its client
            _emit(s, ("error", 503, "server stopped", 5.0))
        self._inbox.clear(), self.waiting.clear(), self.running.clear()

    def _loop(self) -> None:
        while True:
            with self._cv:
                while not self._stop and not self._inbox and not self.waiting and not self.running:
                    self._cv.wait(1.0)
                if self._stop:
                    return
            try:
                self.step()
            except Exception:  # never let one bad step kill the server: fail what was running, go on
                log.exception("batcher step failed")
                for s in self.running:
                    _emit(s, ("error", 500, "internal error while decoding", None))
                self.running.clear()
                self.busy = False
            if self.waiting and not self.running:
                time.sleep(0.005)  # nothing admissible yet: do not spin

    def step(self) -> int:
        """One round (see the module contract). Returns the number of running sequences after it."""
        now = time.monotonic()
        with self._cv:
            self.busy = True
            while self._inbox:
                self.waiting.append(self._inbox.popleft())
        self.waiting = [s for s in self.waiting if not self._drop_if_done(s, now, queued=True)]
        self.running = [s for s in self.running if not self._drop_if_done(s, now, queued=False)]
        if self.waiting:
            admit, refuse = self.scheduler.schedule(list(self.waiting), list(self.running), now)
            for s, status, msg, retry in refuse:
                self.waiting.remove(s)
                _emit(s, ("error", status, msg, retry))
            for s in admit:
                self.waiting.remove(s)
                self._prefill(s)
        if self.running:
            self._decode_step()
        self.busy = False
        return len(self.running)

    def _drop_if_done(self, s: Sequence, now: float, queued: bool) -> bool:
        if s.cancelled:
            s.cache = None
            if not queued:
                self.finished += 1
            return True
        if s.timeout is not None and now - s.arrival > s.timeout:
            if queued:
                _emit(s, ("error", 429, f"timed out after {s.timeout:g} s waiting in the queue; retry later", 1.0))
            else:
                self._finish(s, "timeout")
            return True
        return False

    # ---- model work -----------------------------------------------------------------------------------------
    def _set_alpha(self, alphas: list[float]) -> None:
        m = self.engine.manager
        if all(a == alphas[0] for a in alphas):
            m.alpha = alphas[0]
        else:  # per-token thresholds: one decode token per sequence
            m.alpha = torch.tensor(alphas, dtype=torch.float32, device=self.engine.device)  # [B]

    @torch.inference_mode()
    def _prefill(self, s: Sequence) -> None:
        eng = self.engine
        s.t_admit = time.monotonic()
        if s.params.seed is not None:
            s.generator = torch.Generator().manual_seed(s.params.seed)
        s.cache = DynamicCache(config=eng.hf_config)
        ids = torch.tensor([s.prompt_ids], dtype=torch.long, device=eng.device)  # [1, T]
        c = eng.manager.cache
        m0, io0, t0 = c.misses, eng.reader.io_seconds, time.perf_counter()
        try:
            with eng.lock:
                self._set_alpha([s.alpha])
                with eng.manager.prefilling():
                    logits = eng.model(input_ids=ids, past_key_values=s.cache, use_cache=True,
                                       logits_to_keep=1).logits
        except Exception:
            log.exception("prefill failed")
            s.cache = None
            _emit(s, ("error", 500, "internal error during prefill", None))
            return
        self.scheduler.observe_prefill(len(s.prompt_ids), time.perf_counter() - t0, c.misses - m0,
                                       eng.reader.io_seconds - io0)
        self.running.append(s)
        self._accept(s, sample(logits[0, -1].float().cpu(), s.params, s.generator))

    @torch.inference_mode()
    def _decode_step(self) -> None:
        eng, seqs = self.engine, self.running
        core = eng.model.model
        t0 = time.perf_counter()
        with eng.lock:
            self._set_alpha([s.alpha for s in seqs])
            toks = torch.tensor([[s.last_token] for s in seqs], dtype=torch.long, device=eng.device)  # [B, 1]
            h = core.embed_tokens(toks)  # [B, 1, H]
            per_seq = []  # (position ids [1, 1], rotary embedding, mask per layer)
            for i, s in enumerate(seqs):
                past = s.cache.get_seq_length()
                pos = torch.tensor([[past]], dtype=torch.long, device=eng.device)  # [1, 1]
                hi = h[i:i + 1]
                kw = dict(config=eng.hf_config, inputs_embeds=hi, attention_mask=None, past_key_values=s.cache,
                          position_ids=pos)
                full = create_causal_mask(**kw)
                slide = create_sliding_window_causal_mask(**kw) if any(self._sliding) else None
                masks = [slide if sl else full for sl in self._sliding]
                per_seq.append((pos, core.rotary_emb(hi, pos), masks))
            for li, layer in enumerate(core.layers):
                outs = []
                for i, s in enumerate(seqs):
                    pos, rope, masks = per_seq[i]
                    x = h[i:i + 1]  # [1, 1, H]
                    a, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), attention_mask=masks[li],
                                           position_ids=pos, past_key_values=s.cache, position_embeddings=rope)
                    outs.append(x + a)
                h = torch.cat(outs, 0)  # [B, 1, H]
                # one MLP call for the whole batch: each routed expert runs once for all tokens routed to it
                h = h + layer.mlp(layer.post_attention_layernorm(h))
            logits = eng.model.lm_head(core.norm(h))[:, -1].float().cpu()  # [B, V]
        self.steps += 1
        self.scheduler.observe_step(len(seqs), time.perf_counter() - t0)
        for i, s in enumerate(list(seqs)):
            self._accept(s, sample(logits[i], s.params, s.generator))

    # ---- per-token bookkeeping (the same text rules as Engine.stream) -----------------------------------------
    def _accept(self, s: Sequence, tok: int) -> None:
        now = time.monotonic()
        if s.t_first is None:
            s.t_first = now
        s.t_last = now
        if s.expected_tokens > 1:
            s.expected_tokens -= 1
        elif s.expected_initial:  # eMoE: reset to 5% of the initial estimate when it runs out
            s.expected_tokens = max(1, round(0.05 * s.expected_initial))
        self.tokens_generated += 1
        eng = self.engine
        if tok in eng.eos_ids:
            return self._finish(s, "eos")
        s.out_ids.append(tok)
        s.last_token = tok
        text = eng.decode(s.out_ids)
        hit = [text.find(x) for x in s.params.stop if x in text]
        if hit:
            text = text[: min(hit)]
            s.finish = "stop"
        s.text = text
        if not (text.endswith("\ufffd") and s.finish != "stop"):  # incomplete UTF-8: wait for the next token
            if len(text) > len(s.emitted) and text.startswith(s.emitted):
                piece, s.emitted = text[len(s.emitted):], text
                _emit(s, ("text", piece))
        if s.finish == "stop":
            return self._finish(s, "stop")
        if len(s.out_ids) >= s.params.max_tokens:
            return self._finish(s, "length")

    def _finish(self, s: Sequence, reason: str) -> None:
        if reason != "stop":  # stop strings keep the truncated text; otherwise the full decode
            s.text = self.engine.decode(s.out_ids)
        if len(s.text) > len(s.emitted) and s.text.startswith(s.emitted):
            _emit(s, ("text", s.text[len(s.emitted):]))
            s.emitted = s.text
        s.finish = reason
        if s in self.running:
            self.running.remove(s)
        s.cache = None  # free the KV cache now, not when the client lets go of the object
        self.finished += 1
        self.engine.requests += 1
        n = len(s.out_ids) + (reason == "eos")
        ttft = (s.t_first - s.arrival) if s.t_first is not None else None
        tpot = (s.t_last - s.t_first) / (n - 1) if n > 1 and s.t_first is not None else None
        self.scheduler.observe_finish(s)
        _emit(s, ("done", {"text": s.text, "token_ids": list(s.out_ids), "finish_reason": reason,
                           "prompt_tokens": len(s.prompt_ids), "completion_tokens": n, "ttft_s": ttft,
                           "tpot_s": tpot, "queue_s": (s.t_admit or s.arrival) - s.arrival, "alpha": s.alpha,
                           "degraded": s.degraded}))


def _emit(s: Sequence, ev: tuple) -> None:
    try:
        s.emit(ev)
    except Exception:  # a client that went away must not stop the loop
        s.cancel()


def batch_generate(engine, prompts: list, max_tokens: int = 64, temperature: float = 0.8, top_p: float = 0.95,
                   top_k: int = 0, stop=(), seed: int | None = None, substitution_alpha=None,
                   max_batch: int | None = None) -> list[Generation]:
    """Generate continuations of several prompts in one continuous batch (synchronously, in this thread).

    `substitution_alpha` may be one value or one per prompt."""
    alphas = substitution_alpha if isinstance(substitution_alpha, (list, tuple)) \
        else [substitution_alpha] * len(prompts)
    if len(alphas) != len(prompts):
        raise ValueError(f"substitution_alpha: {len(alphas)} values for {len(prompts)} prompts")
    b = Batcher(engine, max_queue=max(1, len(prompts)), max_batch=max_batch or max(1, len(prompts)))
    results: dict[int, dict] = {}
    seqs = []
    for i, (p, a) in enumerate(zip(prompts, alphas)):
        ids = engine.encode(p)
        params = engine._params(max_tokens, temperature, top_p, top_k, stop, seed)
        if len(ids) + params.max_tokens > engine.max_context:
            raise ValueError(f"max_tokens: prompt {i} ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the "
                             f"model context of {engine.max_context}")
        alpha = check_alpha(engine.config.substitution_alpha if a is None else a)

        def emit(ev, i=i):
            if ev[0] in ("done", "error"):
                results[i] = ev
        seqs.append(b.submit(Sequence(ids, params, emit, alpha=alpha)))
    while len(results) < len(seqs):
        b.step()
    out = []
    for i in range(len(seqs)):
        ev = results[i]
        if ev[0] == "error":
            raise RuntimeError(f"prompt {i}: {ev[2]}")
        r = ev[1]
        out.append(Generation(r["text"], r["token_ids"], r["prompt_tokens"], r["finish_reason"],
                              {k: r[k] for k in ("completion_tokens", "ttft_s", "tpot_s", "alpha")}))
    return out
