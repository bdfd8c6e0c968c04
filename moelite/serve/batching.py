"""The one decode loop: every generated token, served or not, comes out of `Batcher.step`.

Contract:
  - `Batcher(engine, scheduler=None, max_queue=64, max_batch=8, runner=None)`: `submit(seq)` queues a `Sequence`
    (serve/sequence.py; raises `Rejected` 429 when the queue is full, 503 while draining, ValueError for a bad
    alpha or an empty prompt). `step()` is one round: drop cancelled / timed-out sequences, let the scheduler admit
    (or refuse) waiting ones, prefill the newly admitted ones (first token), then ONE decode step for all running
    sequences. Returns the number still running.
  - Who uses it: the server runs `step()` in a background thread (`start()`, `drain()`, `stop()`; the engine's
    lock is held per step, so direct engine calls interleave between steps). `Engine.generate` / `stream` are a
    batch of one and `Engine.generate_batch` a lock-step batch, stepped in the caller's thread;
    `Engine.teacher_force` (eval) runs a forced sequence; `batch_generate` runs a list of prompts.
  - The model work is the runner's (serve/runner.py): `DynamicRunner` (default: per-sequence KV caches,
    sequences join and leave between steps) or `StaticRunner` (lock step over a static cache, CUDA graphs).
  - Per token (`_accept`): the token is sampled from the sequence's own generator (seeded by `params.seed`), or
    taken from `seq.forced`; its text goes through the sequence's `StreamingDetokenizer` (serve/detokenizer.py);
    the sequence finishes on eos ("eos", the token not kept), a stop string ("stop"), `max_tokens` ("length") or
    its timeout ("timeout"). Greedy output is token-for-token `engine.generate(..., temperature=0)`
    (tests/test_batching.py). Each step's model work runs in `engine.request(alpha=...)` (the engine's lock, the
    step's alpha, restored after): per-sequence alphas reach the MoE layers as a [B] tensor when they differ.
  - A failed prefill fails only its sequences (event "error" 500, exception in `seq.error`). A decode step of
    several sequences that fails on an expert read (`ExpertReadError`) is rolled back (`runner.rollback`) and run
    again one sequence at a time, so only the sequences that need the unreadable expert fail; any other failed
    decode step raises out of `step()` (the background loop then fails what was running). An expert that cannot be read or
    fails its checksum (`ExpertReadError`, `ExpertIntegrityError`) is named in the error event's message (file
    names only, never a path); other failures say "internal error".
  - Non-finite logits: after each prefill and decode step one isfinite reduction over the logits rows; a sequence
    whose row holds NaN or inf ends at once with `NonFiniteOutputError` (event "error" 500 with the message,
    `seq.error`), never with garbage or an empty text; the other sequences go on.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from contextlib import contextmanager

import torch

from moelite.config import check_alpha
from moelite.core.expert_store import ExpertReadError
from moelite.core.integrity import NonFiniteOutputError
from moelite.core.sampling import sample
from moelite.serve.detokenizer import StreamingDetokenizer
from moelite.serve.runner import DynamicRunner
from moelite.serve.scheduler import Scheduler, SchedulerConfig
from moelite.serve.sequence import Generation, Sequence

log = logging.getLogger("moelite.serve.batching")

__all__ = ["Batcher", "Rejected", "Sequence", "batch_generate"]


class Rejected(Exception):
    """A request the batcher will not take now: `status` 429 (queue full / overloaded) or 503 (draining)."""

    def __init__(self, status: int, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.status, self.message, self.retry_after = status, message, retry_after


class Batcher:
    def __init__(self, engine, scheduler=None, max_queue: int = 64, max_batch: int = 8, runner=None):
        if max_queue < 1 or max_batch < 1:
            raise ValueError(f"max_queue / max_batch: must be >= 1, got {max_queue} / {max_batch}")
        self.engine = engine
        self.scheduler = scheduler or Scheduler(SchedulerConfig(mode="fcfs", max_batch=max_batch),
                                                max_context=engine.max_context)
        self.runner = runner or DynamicRunner(engine)
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

    # ---- submission (any thread) ----------------------------------------------------------------------------
    def submit(self, seq: Sequence) -> Sequence:
        check_alpha(seq.alpha)
        if not seq.prompt_ids and not seq.forced:
            raise ValueError("prompt_ids: empty; give at least one prompt token")
        if seq.forced is not None and len(seq.forced) != seq.params.max_tokens:
            raise ValueError(f"forced: {len(seq.forced)} tokens but max_tokens is {seq.params.max_tokens}; "
                             "a teacher-forced sequence outputs exactly its forced tokens")
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

    # ---- background thread (the server) ---------------------------------------------------------------------
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
            except Exception as exc:  # never let one bad step kill the server: fail what was running, go on
                if isinstance(exc, ExpertReadError):
                    log.error("batcher step failed: %s", exc)
                else:
                    log.exception("batcher step failed")
                for s in self.running:
                    self.runner.release(s)
                    _emit(s, ("error", 500, _public(exc, "internal error while decoding"), None))
                self.running.clear()
            if self.waiting and not self.running:
                time.sleep(0.005)  # nothing admissible yet: do not spin

    # ---- the step -------------------------------------------------------------------------------------------
    def step(self) -> int:
        """One round (see the module contract). Returns the number of running sequences after it."""
        now = time.monotonic()
        with self._cv:
            self.busy = True
            while self._inbox:
                self.waiting.append(self._inbox.popleft())
        try:
            if self.waiting:
                self.waiting = [s for s in self.waiting if not self._drop_if_done(s, now, queued=True)]
            self.running = [s for s in self.running if not self._drop_if_done(s, now, queued=False)]
            if self.waiting:
                admit, refuse = self.scheduler.schedule(list(self.waiting), list(self.running), now)
                for s, status, msg, retry in refuse:
                    self.waiting.remove(s)
                    _emit(s, ("error", status, msg, retry))
                for s in admit:
                    self.waiting.remove(s)
                groups = [admit] if self.runner.lock_step else [[s] for s in admit]
                for group in groups:
                    if group:
                        self._prefill(group)
            if self.running:
                self._decode()
        finally:
            self.busy = False
        return len(self.running)

    def _drop_if_done(self, s: Sequence, now: float, queued: bool) -> bool:
        if s.cancelled:
            self.runner.release(s)
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

    # ---- model work (through the runner) --------------------------------------------------------------------
    @contextmanager
    def _request(self, seqs: list[Sequence]):
        """The step's call state, under the engine's lock: `engine.request` with the sequences' alpha (a float when
        they agree, else a [B] tensor, one decode token per sequence), or nothing more when the call running
        already has that alpha (a batch of one inside `Engine.stream`)."""
        eng, alphas = self.engine, [s.alpha for s in seqs]
        same = all(a == alphas[0] for a in alphas)
        with eng.lock:
            current = eng.manager.alpha
            if same and not isinstance(current, torch.Tensor) and current == alphas[0]:
                yield
                return
            alpha = alphas[0] if same else torch.tensor(alphas, dtype=torch.float32, device=eng.device)  # [B]
            with eng.request(alpha=alpha):
                yield

    def _prefill(self, group: list[Sequence]) -> None:
        eng = self.engine
        for s in group:
            s.t_admit = time.monotonic()
            if s.params.seed is not None:
                s.generator = torch.Generator().manual_seed(s.params.seed)
            if s.forced is None:
                s.detok = StreamingDetokenizer(eng.decode, s.params.stop)
        before, t0 = eng.counters(), time.perf_counter()
        try:
            with self._request(group):
                logits = self.runner.prefill(group)  # [B, V]
        except Exception as exc:
            if isinstance(exc, ExpertReadError):  # a named fault: its message says it all
                log.error("prefill failed: %s", exc)
            else:
                log.exception("prefill failed")
            for s in group:
                s.error = exc
                self.runner.release(s)
                _emit(s, ("error", 500, _public(exc, "internal error during prefill"), None))
            return
        spent = eng.counters() - before
        self.scheduler.observe_prefill(sum(len(s.prompt_ids) for s in group), time.perf_counter() - t0,
                                       spent.total.misses, spent.io_seconds)
        self.running.extend(group)
        bad = _nonfinite_rows(logits)
        for i, s in enumerate(group):
            if i in bad:
                self._fail_nonfinite(s, "the prompt's prefill")
            else:
                self._accept(s, logits[i])

    def _decode(self) -> None:
        seqs = list(self.running)
        t0 = time.perf_counter()
        mark = self.runner.mark(seqs) if len(seqs) > 1 and hasattr(self.runner, "rollback") else None
        try:
            with self._request(seqs):
                logits = self.runner.decode(seqs)  # [B, V]
        except ExpertReadError as exc:
            if mark is None or not self.runner.rollback(seqs, mark):
                raise
            log.error("decode step failed (%s); stepping its %d sequences one by one", exc, len(seqs))
            seqs, logits = self._decode_one_by_one(seqs)
            if not seqs:
                return
        else:
            self.scheduler.observe_step(len(seqs), time.perf_counter() - t0)
        self.steps += 1
        bad = _nonfinite_rows(logits)
        for i, s in enumerate(seqs):
            if i in bad:
                self._fail_nonfinite(s, f"decode step {len(s.out_ids)} (output token {len(s.out_ids) + 1})")
            else:
                self._accept(s, logits[i])

    def _decode_one_by_one(self, seqs: list[Sequence]) -> tuple[list[Sequence], torch.Tensor]:
        """The sequences of a failed (and rolled back) decode step, each alone: those whose own step cannot read an
        expert fail with its error; the others' logits come back [B', V]."""
        ok, rows = [], []
        for s in seqs:
            try:
                with self._request([s]):
                    rows.append(self.runner.decode([s]))
                ok.append(s)
            except ExpertReadError as exc:
                s.error = exc
                self.running.remove(s)
                self.runner.release(s)
                _emit(s, ("error", 500, _public(exc, "internal error while decoding"), None))
        return ok, (torch.cat(rows) if rows else torch.empty(0))

    def _fail_nonfinite(self, s: Sequence, where: str) -> None:
        """End `s` with a NonFiniteOutputError (its logits hold NaN or inf): an error, never garbage text."""
        log.error("non-finite logits at %s of a request; the request is ended", where)
        s.error = NonFiniteOutputError(
            f"the model produced non-finite logits (NaN or inf) at {where} of this request, so its output would "
            "be meaningless and the request was ended; the usual cause is damaged weights: run `moelite verify` "
            f"on the model folder ({self.engine.path.name!r}) and restore what it reports")
        if s in self.running:
            self.running.remove(s)
        self.runner.release(s)
        _emit(s, ("error", 500, str(s.error), None))

    # ---- per token ------------------------------------------------------------------------------------------
    def _accept(self, s: Sequence, logits: torch.Tensor) -> None:
        if s.forced is not None:
            s.logits.append(logits)
            tok = s.forced[len(s.out_ids)]
        else:
            tok = sample(logits, s.params, s.generator)
        now = time.monotonic()
        if s.t_first is None:
            s.t_first = now
        s.t_last = now
        if s.expected_tokens > 1:
            s.expected_tokens -= 1
        elif s.expected_initial:  # eMoE: reset to 5% of the initial estimate when it runs out
            s.expected_tokens = max(1, round(0.05 * s.expected_initial))
        self.tokens_generated += 1
        s.last_token = tok
        if s.forced is None and tok in self.engine.eos_ids:
            return self._finish(s, "eos")
        s.out_ids.append(tok)
        if s.detok is not None:
            piece = s.detok.add(tok)
            if piece:
                _emit(s, ("text", piece))
            if s.detok.stopped:
                return self._finish(s, "stop")
        if len(s.out_ids) >= s.params.max_tokens:
            return self._finish(s, "length")

    def _finish(self, s: Sequence, reason: str) -> None:
        if s.detok is not None:
            rest = s.detok.finish()
            if rest:
                _emit(s, ("text", rest))
        s.finish = reason
        if s in self.running:
            self.running.remove(s)
        self.runner.release(s)  # free the KV cache now, not when the client lets go of the object
        self.finished += 1
        if s.forced is None:  # scoring (teacher forcing) is not a request
            self.engine.requests += 1
        n = len(s.out_ids) + (reason == "eos")
        ttft = (s.t_first - s.arrival) if s.t_first is not None else None
        tpot = (s.t_last - s.t_first) / (n - 1) if n > 1 and s.t_first is not None else None
        self.scheduler.observe_finish(s)
        _emit(s, ("done", {"text": s.text, "token_ids": list(s.out_ids), "finish_reason": reason,
                           "prompt_tokens": len(s.prompt_ids), "completion_tokens": n, "ttft_s": ttft,
                           "tpot_s": tpot, "queue_s": (s.t_admit or s.arrival) - s.arrival, "alpha": s.alpha,
                           "degraded": s.degraded}))


def _nonfinite_rows(logits: torch.Tensor) -> set[int]:
    """Rows of logits [B, V] holding NaN or inf (one reduction; a set only when there are any)."""
    ok = torch.isfinite(logits).all(dim=-1)
    return set() if bool(ok.all()) else set((~ok).nonzero().flatten().tolist())


def _public(exc: BaseException, fallback: str) -> str:
    """What a client is told about a failed step: an expert read or integrity failure's own message (it names the
    expert, tensors and shard files, never a path), else `fallback`."""
    return str(exc) if isinstance(exc, (ExpertReadError, NonFiniteOutputError)) else fallback


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
    results: dict[int, tuple] = {}
    seqs = []
    params = engine.sampling_params(max_tokens, temperature, top_p, top_k, stop, seed)
    for i, (p, a) in enumerate(zip(prompts, alphas)):
        ids = engine.encode(p)
        engine.check_prompt(ids, params.max_tokens, f"prompts[{i}]")
        alpha = check_alpha(engine.config.substitution_alpha if a is None else a)

        def emit(ev, i=i):
            if ev[0] in ("done", "error"):
                results[i] = ev
        seqs.append(Sequence(ids, params, emit, alpha=alpha))
    for s in seqs:
        b.submit(s)
    while len(results) < len(seqs):
        b.step()
    out = []
    for i, s in enumerate(seqs):
        ev = results[i]
        if ev[0] == "error":
            if s.error is not None:
                raise s.error
            raise RuntimeError(f"prompt {i}: {ev[2]}")
        r = ev[1]
        out.append(Generation(r["text"], r["token_ids"], r["prompt_tokens"], r["finish_reason"],
                              {k: r[k] for k in ("completion_tokens", "ttft_s", "tpot_s", "alpha")}))
    return out
