"""Preloading predicted experts before each request's prefill (eMoE §2.4).

Contract:
  - `Preloader(engine, mode, ...)`: before each request, makes the predicted experts resident (`engine.preload`):
    mode "none" | "every" (eMoE-E: predictor every prompt) | "periodic" (every `period` prompts, the set reused in
    between) | "task" (task classifier + per-task predictions refreshed every `period` prompts + the load rule).
    The plan takes `fill` of the slots (per layer with cache_scope "layer", else over all layers). `keep=True`
    (default) pins the plan across requests until the plan changes (eMoE's resident set; the other slots serve
    misses as an ordinary cache); `keep=False` pins it only until its layer's prefill routing is seen (`shield`).
    Misses are handled by the engine as usual (exact); `reroute=True` installs `sensitivity.reroute_to_resident`
    (lossy). It times its own work (classifier, predictor calls, planning, routing observer) apart from the expert
    reads; `generate()` adds per-request stats (see its docstring), from the engine's counters (prefill and
    decode apart: moelite.core.counters). Residency is shaped only through the expert manager's public methods
    (`preload`, `touch`, `slot`, `pin`, `unpin`).
  - `make_resident(engine, keys)`: make (layer, expert) keys resident, best first.
"""

from __future__ import annotations

import time

import numpy as np
import torch

from moelite.emoe.classifier import TaskClassifier
from moelite.emoe.load_rule import load_scores, plan_preload
from moelite.emoe.predictors import APredictor, RequestRouting
from moelite.emoe.sensitivity import reroute_to_resident, routing_override

MODES = ("none", "every", "periodic", "task")


def make_resident(engine, keys: list) -> int:
    """Make (layer, expert) keys resident, best first; returns the reads done. Planned experts already resident
    are touched first (best last), so that the policy evicts experts outside the plan to make room for the rest."""
    m = engine.manager
    for key in reversed(keys):
        if m.slot(key) is not None:
            m.touch(key)  # a policy access, not counted as a hit
    missing = [k for k in keys if m.slot(k) is None]
    return engine.preload(missing) if missing else 0


class Preloader:
    """Makes predicted experts resident before each request's prefill (see the module contract)."""

    def __init__(self, engine, mode: str = "task", predictor: APredictor | None = None, period: int = 40,
                 classifier: TaskClassifier | None = None, sensitivity: dict | None = None,
                 out_tokens: dict | None = None, fill: float = 0.6, reroute: bool = False, shield: bool = True,
                 keep: bool = True, account: bool = True):
        if mode not in MODES:
            raise ValueError(f"mode: {mode!r} is not one of {', '.join(MODES)}")
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"period: {period!r} must be an int >= 1")
        if not 0 < fill <= 1:
            raise ValueError(f"fill: {fill!r} must be in (0, 1]")
        if keep and fill > 0.9:
            raise ValueError(f"fill: {fill!r} with keep=True leaves no slots for misses; use at most 0.9")
        if mode != "none" and predictor is None:
            raise ValueError(f"predictor: mode {mode!r} needs a fitted APredictor")
        if mode == "task" and not predictor.uses_task:
            raise ValueError(f"predictor: mode 'task' needs a task-aware predictor, {predictor.name!r} is not")
        self.engine, self.mode, self.predictor = engine, mode, predictor
        self.period = 1 if mode == "every" else period
        self.classifier = classifier or TaskClassifier()
        self.sensitivity, self.out_tokens, self.reroute = sensitivity, out_tokens or {}, reroute
        # shield: a preloaded expert stays pinned until its layer's prefill routing is seen, so that (global cache)
        # the prefill misses of shallower layers cannot evict what deeper layers were given
        self.shield = shield
        # keep: the plan stays pinned across requests (eMoE's resident set, swapped when the plan changes); the
        # other (1 - fill) of the slots serve misses as an ordinary cache
        self.keep = keep
        self._kept: dict = {}  # key -> slot pinned by the standing plan
        # account: measure residency as routed (stats["routed"]); a measurement, timed apart in account_s
        self._pinned: dict[int, list[int]] = {}
        self.layers, self.n_exp, self.scope = list(engine.layout.layers), engine.num_experts, engine.config.cache_scope
        n_slots = engine.pool.n_slots
        self.slots = int((n_slots // len(self.layers) if self.scope == "layer" else n_slots) * fill)
        self.history: list[RequestRouting] = []
        self.freq: dict = {}  # task (or None) -> predicted [L, E], reused until the next invocation
        self.last_call, self.requests, self.calls = -10**9, 0, 0
        self.t = {"classify_s": 0.0, "predict_s": 0.0, "plan_s": 0.0, "preload_s": 0.0, "observe_s": 0.0,
                  "account_s": 0.0}
        self._pos = {layer: i for i, layer in enumerate(self.layers)}
        self.account = account
        self._cur: RequestRouting | None = None
        self._hits = {"prefill": [0, 0, 0, 0], "decode": [0, 0, 0, 0]}
        engine.manager.add_observer(self._observe)

    def _observe(self, layer, routing, phase: str) -> None:
        if self._cur is None:
            return
        t0 = time.perf_counter()
        m = self.engine.manager
        for slot in self._pinned.pop(layer, ()):  # this layer runs now: its preloaded experts may be evicted again
            m.unpin(slot)
        is_decode = phase == "decode"
        self._seen.append((self._pos[layer], is_decode, routing.idx))  # counted once, in after()
        t1 = time.perf_counter()
        self.t["observe_s"] += t1 - t0
        if self.account:  # measurement only: residency as the router asked (before any rerouting)
            n: dict = {}
            for e in routing.idx.reshape(-1).tolist():
                n[e] = n.get(e, 0) + 1
            h = self._hits[phase]
            for e, c in n.items():
                hit = m.slot((layer, e)) is not None  # resident: what the engine counts as an exact hit
                h[0 if hit else 1] += 1
                h[2 if hit else 3] += c
            self.t["account_s"] += time.perf_counter() - t1

    def _invoke(self, tasks: list) -> None:
        t0 = time.perf_counter()
        self.freq = {t: self.predictor.predict(self.history, t) for t in tasks}
        self.t["predict_s"] += time.perf_counter() - t0
        self.calls += 1
        self.last_call = self.requests

    def before(self, prompt: str, prompt_tokens: int, running: list[tuple[str, int]] = ()) -> dict:
        """Classify, predict (every `period` prompts), plan and preload for a request about to be prefilled;
        `running` lists (task, input tokens) of other requests running beside it."""
        info: dict = {"task": None, "predicted": False, "preloaded": 0}
        task = None
        if self.mode == "task" or self.reroute:
            t0 = time.perf_counter()
            task = self.classifier.classify(prompt)
            self.t["classify_s"] += time.perf_counter() - t0
            info["task"] = task
        if self.mode != "none":
            due = self.requests - self.last_call >= self.period
            if self.mode == "task":
                known = list(self.classifier.tasks)
                if due or any(t not in self.freq for t, _ in [*running, (task, 0)]):
                    self._invoke(sorted(set(known) | {t for t, _ in running} | {task}))
                    info["predicted"] = True
            elif due:
                self._invoke([None])
                info["predicted"] = True
            t0 = time.perf_counter()
            if self.mode == "task":
                sens = self.sensitivity if self.reroute else None  # an exact miss costs a read in any layer
                scores = load_scores([*running, (task, prompt_tokens)], self.freq, sens, self.out_tokens)
            else:
                scores = self.freq[None]
            plan = plan_preload(scores, self.slots, self.scope)
            keys = [(self.layers[p], e) for p, e in plan]
            m = self.engine.manager
            if self.keep:  # experts dropped from the plan become evictable before the new plan is read
                new = set(keys)
                for key in [k for k in self._kept if k not in new]:
                    m.unpin(self._kept.pop(key))
            self.t["plan_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            info["preloaded"] = make_resident(self.engine, keys)
            self.t["preload_s"] += time.perf_counter() - t0
            for key in keys:  # pin the plan: until its layer's prefill (shield) or until the plan changes (keep)
                if (self.keep and key in self._kept) or not (self.keep or self.shield):
                    continue
                slot = m.pin(key)
                if slot is None:
                    continue
                if self.keep:
                    self._kept[key] = slot
                else:
                    self._pinned.setdefault(key[0], []).append(slot)
        shape = (len(self.layers), self.n_exp)
        self._cur = RequestRouting(task or "default", prompt, np.zeros(shape, np.int64), np.zeros(shape, np.int64),
                                   [], prompt_tokens)
        self._seen: list = []  # (layer position, is_decode, idx [N, k]) of every MoE pass of this request
        return info

    def release(self) -> None:
        """Unpin every preloaded expert still shielded (a request that ended or failed before reaching a layer)."""
        for slots in self._pinned.values():
            for slot in slots:
                self.engine.manager.unpin(slot)
        self._pinned = {}

    def after(self) -> RequestRouting:
        self.release()
        r, self._cur = self._cur, None
        if r is not None:
            for pos in range(len(self.layers)):
                for dst, keep in ((r.counts, lambda d: True), (r.prefill, lambda d: not d)):
                    ids = [i.reshape(-1) for p, d, i in self._seen if p == pos and keep(d)]
                    if ids:
                        dst[pos] = torch.bincount(torch.cat(ids).cpu(), minlength=self.n_exp).numpy()
            self._seen = []
            self.history.append(r)
            del self.history[:-256]  # predictors look at recent prompts only
        self.requests += 1
        return r

    def generate(self, prompt: str, **kw):
        """before() + engine.generate() + after(); the Generation's stats gain: task, predicted, preloaded (reads),
        prediction_overhead_s, preload_s, prefill_/decode_hits/misses (the engine's counters of this request, by
        phase; a read still in flight when needed is not a hit), routed = {"prefill"|"decode": [distinct hits,
        distinct misses, selection hits, selection misses]} (residency as the router asked, before rerouting; with
        `account`), and `ttft_total_s` / `request_s` from
        arrival (tokenising, classifier, predictor, planning and expert reads included)."""
        e = self.engine
        t0 = time.perf_counter()
        ids = e.encode(prompt)
        before = (self.t["classify_s"] + self.t["predict_s"] + self.t["plan_s"], self.t["preload_s"])
        info = self.before(prompt, len(ids))
        overhead = self.t["classify_s"] + self.t["predict_s"] + self.t["plan_s"] - before[0]
        preload_s = self.t["preload_s"] - before[1]
        c0 = e.counters()
        self._hits = {"prefill": [0, 0, 0, 0], "decode": [0, 0, 0, 0]}
        pre_s = time.perf_counter() - t0  # arrival -> prefill starts: tokenise, classify, predict, plan, read
        try:
            if self.reroute:
                kw.setdefault("substitution_alpha", routing_override.ON)
                with routing_override(e, reroute_to_resident):
                    gen = e.generate(ids, **kw)
            else:
                gen = e.generate(ids, **kw)
        finally:
            self.after()
        spent = e.counters() - c0  # exact hits: substitutions are counted apart
        gen.stats.update(info, prediction_overhead_s=overhead, preload_s=preload_s,
                         prefill_hits=spent.prefill.hits, prefill_misses=spent.prefill.reads_waited,
                         decode_hits=spent.decode.hits, decode_misses=spent.decode.reads_waited,
                         routed={k: list(v) for k, v in self._hits.items()},
                         ttft_total_s=pre_s + gen.stats.get("ttft_s", 0.0), request_s=time.perf_counter() - t0)
        return gen

    def stats(self) -> dict:
        return dict(self.t, mode=self.mode, period=self.period, requests=self.requests, predictor_calls=self.calls,
                    slots=self.slots, scope=self.scope)

    def close(self) -> None:
        self.release()
        for slot in self._kept.values():
            self.engine.manager.unpin(slot)
        self._kept = {}
        self.engine.manager.remove_observer(self._observe)
