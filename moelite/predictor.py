"""Expert predictors trained on routing traces, and preloading predicted experts before prefill (eMoE §2.2-2.4).

Contract:
  - `requests_from_trace(trace)` -> [RequestRouting]: per request its task (the trace's `domain`), prompt, and
    per MoE layer the expert selection counts [L, E] (prefill + decode, and prefill alone) and every token's experts.
  - eMoE-A predictors (`APredictor`: `fit(reqs)`, `predict(history, task) -> [L, E]` relative frequencies for the
    next prompt, from the prompts before it): `PreviousPrompt`, `RecentMean`, `TaskFrequency` (needs the task),
    `GRUPredictor` (a small learned sequence model over the last prompts' routing, optionally told the task).
  - eMoE-L predictors (`LPredictor`: `fit(reqs)`, `predict(req, pos, prev) -> [E]` for MoE layer position `pos`
    from the same request's routing at `pos - 1`; `pos = 0` from the previous request's first layer):
    `LayerTransition` (token-level layer-to-layer transition counts), `MLPTransition` (learned, per token).
  - `compare_predictors(train, test, ...)` fits every predictor and scores it on held-out requests with
    `tasks.evaluate_a` / `evaluate_l` (top-k accuracy, precision, recall, coverage@L, each beside a random expert
    set of the same size); the winner of each variant is the best by top-k accuracy.
  - `Preloader(engine, mode, ...)`: before each request, makes the predicted experts resident (`engine.preload`):
    mode "none" | "every" (eMoE-E: predictor every prompt) | "periodic" (every `period` prompts, the set reused in
    between) | "task" (task classifier + per-task predictions refreshed every `period` prompts + the load rule).
    The plan takes `fill` of the slots (per layer with cache_scope "layer", else over all layers). `keep=True`
    (default) pins the plan across requests until the plan changes (eMoE's resident set; the other slots serve
    misses as an ordinary cache); `keep=False` pins it only until its layer's prefill routing is seen (`shield`).
    Misses are handled by the engine as usual (exact); `reroute=True` installs `tasks.reroute_to_resident`
    (lossy). It times its own work (classifier, predictor calls, planning, routing observer) apart from the expert
    reads; `generate()` adds per-request stats (see its docstring).
  - `moelite predict train|profile` (CLI) fits/evaluates predictors on traces and profiles task sensitivity.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .tasks import (TaskClassifier, evaluate_a, evaluate_l, load_scores, normalise, plan_preload,  # noqa: F401
                    reroute_to_resident, routing_override, score, table)
from .traces import Trace


@dataclass
class RequestRouting:
    task: str
    prompt: str
    counts: np.ndarray  # [L, E] selections over prefill and decode
    prefill: np.ndarray  # [L, E] selections during prefill
    tokens: list = field(default_factory=list)  # per layer position: [T, k] experts of each token (prefill, decode)
    prompt_tokens: int = 0

    @property
    def freq(self) -> np.ndarray:
        return normalise(self.counts)


def requests_from_trace(trace: Trace) -> list[RequestRouting]:
    layers, n_exp = trace.layers, int(trace.meta["num_experts"])
    metas = trace.meta.get("requests", [])
    out = []
    for r in range(int(trace.request.max()) + 1 if len(trace.request) else 0):
        sel = trace.request == r
        counts = np.zeros((len(layers), n_exp), np.int64)
        prefill = np.zeros_like(counts)
        toks = []
        for p, layer in enumerate(layers):
            m = sel & (trace.layer == layer)
            idx = trace.idx[m].astype(np.int64)  # [T, k] in execution order (same tokens at every layer)
            toks.append(idx)
            counts[p] = np.bincount(idx.reshape(-1), minlength=n_exp)
            pre = idx[trace.step[m] == 0]
            prefill[p] = np.bincount(pre.reshape(-1), minlength=n_exp)
        meta = metas[r] if r < len(metas) else {}
        n_pre = int(((trace.step == 0) & sel & (trace.layer == layers[0])).sum())
        out.append(RequestRouting(str(meta.get("domain", "default")), str(meta.get("prompt", "")), counts, prefill,
                                  toks, n_pre))
    return out


# ---- eMoE-A: all layers of the next prompt ---------------------------------------------------------------------
class APredictor:
    name, uses_task = "base", False

    def fit(self, reqs: list[RequestRouting]) -> "APredictor":
        if not reqs:
            raise ValueError("fit: no requests in the training trace")
        self.prior = np.mean([r.freq for r in reqs], axis=0)  # [L, E]
        self.task_prior = {t: np.mean([r.freq for r in reqs if r.task == t], axis=0) for t in {r.task for r in reqs}}
        self.task_n = {t: sum(r.task == t for r in reqs) for t in self.task_prior}
        return self

    def predict(self, history: list[RequestRouting], task: str | None = None) -> np.ndarray:
        raise NotImplementedError


class PreviousPrompt(APredictor):
    """Persistence: the next prompt routes like the previous one (eMoE's consecutive-prompt correlation)."""
    name = "previous-prompt"

    def predict(self, history, task=None):
        return history[-1].freq if history else self.prior


class RecentMean(APredictor):
    name = "recent-mean"

    def __init__(self, window: int = 8):
        self.window = window

    def predict(self, history, task=None):
        return np.mean([r.freq for r in history[-self.window:]], axis=0) if history else self.prior


class TaskFrequency(APredictor):
    """Per-task expert frequencies: the training mean of the task, updated with the task's recent prompts."""
    name, uses_task = "task-frequency", True

    def __init__(self, window: int = 32):
        self.window = window

    def predict(self, history, task=None):
        if task is None:
            return RecentMean.predict(self, history) if history else self.prior
        base = self.task_prior.get(task, self.prior)
        n0 = self.task_n.get(task, 0)
        own = [r.freq for r in history if r.task == task][-self.window:]
        return (base * n0 + np.sum(own, axis=0)) / (n0 + len(own)) if own else base


class GRUPredictor(APredictor):
    """A small learned sequence model: a GRU over the last `window` prompts' routing (frequencies [L*E] + task
    one-hot per prompt), plus the next prompt's task if `with_task`, -> per-layer log-frequencies [L, E]."""

    def __init__(self, with_task: bool = False, window: int = 8, hidden: int = 96, epochs: int = 150, seed: int = 0):
        self.with_task, self.window, self.hidden, self.epochs, self.seed = with_task, window, hidden, epochs, seed
        self.name = "gru" + ("+task" if with_task else "")
        self.uses_task = with_task

    def _x(self, history, task):  # -> [W, L*E + n_tasks], [n_tasks]
        n_t = len(self.tasks)
        rows = []
        for r in history[-self.window:]:
            oh = np.zeros(n_t)
            if r.task in self.tasks:
                oh[self.tasks.index(r.task)] = 1
            rows.append(np.concatenate([r.freq.reshape(-1) * r.freq.shape[1], oh]))  # scaled: uniform -> 1
        if not rows:
            rows.append(np.concatenate([self.prior.reshape(-1) * self.prior.shape[1], np.zeros(n_t)]))
        nxt = np.zeros(n_t)
        if self.with_task and task in self.tasks:
            nxt[self.tasks.index(task)] = 1
        return torch.tensor(np.stack(rows), dtype=torch.float32), torch.tensor(nxt, dtype=torch.float32)

    def fit(self, reqs):
        super().fit(reqs)
        torch.manual_seed(self.seed)
        self.tasks = sorted(self.task_prior)
        n_l, n_e = self.prior.shape
        d_in = n_l * n_e + len(self.tasks)
        self.gru = nn.GRU(d_in, self.hidden, batch_first=True)
        self.head = nn.Linear(self.hidden + len(self.tasks), n_l * n_e)
        self.log_prior = torch.tensor(np.log(self.prior + 1e-6), dtype=torch.float32)  # [L, E] residual base
        # with the next prompt's task known, the base is that task's training frequency: the net learns a correction
        self.log_task = torch.tensor(np.log(np.stack([self.task_prior[t] for t in self.tasks]) + 1e-6),
                                     dtype=torch.float32)  # [n_tasks, L, E]
        xs, nx, ys = [], [], []
        for t in range(1, len(reqs)):
            x, n = self._x(reqs[max(0, t - self.window): t], reqs[t].task)
            xs.append(x)
            nx.append(n)
            ys.append(torch.tensor(reqs[t].freq, dtype=torch.float32))
        if not xs:
            raise ValueError("fit: the GRU predictor needs at least two requests")
        lens = torch.tensor([len(x) for x in xs])
        xpad = nn.utils.rnn.pad_sequence(xs, batch_first=True)  # [B, W, D]
        nxt, y = torch.stack(nx), torch.stack(ys)  # [B, n_tasks], [B, L, E]
        params = list(self.gru.parameters()) + list(self.head.parameters())
        opt = torch.optim.Adam(params, lr=3e-3, weight_decay=1e-4)
        for _ in range(self.epochs):
            opt.zero_grad()
            loss = -(y * self._logp(xpad, lens, nxt)).sum(-1).mean()  # soft cross-entropy per layer
            loss.backward()
            opt.step()
        return self

    def _logp(self, xpad, lens, nxt):  # -> [B, L, E]
        out, _ = self.gru(xpad)  # [B, W, H]
        h = out[torch.arange(len(lens)), lens - 1]  # [B, H] state after the last real prompt
        base = self.log_prior.expand(len(lens), *self.log_prior.shape)  # [B, L, E]
        if self.with_task:
            known = nxt.sum(-1)[:, None, None] > 0  # [B, 1, 1]
            base = torch.where(known, torch.einsum("bt,tle->ble", nxt, self.log_task), base)
        logits = self.head(torch.cat([h, nxt], -1)).view(-1, *self.log_prior.shape) + base
        return torch.log_softmax(logits, -1)

    @torch.no_grad()
    def predict(self, history, task=None):
        x, n = self._x(history, task)
        return self._logp(x[None], torch.tensor([len(x)]), n[None])[0].exp().numpy()


# ---- eMoE-L: layer i from layer i-1 of the same prompt -----------------------------------------------------------
class LPredictor:
    name = "base"

    def fit(self, reqs: list[RequestRouting]) -> "LPredictor":
        if not reqs:
            raise ValueError("fit: no requests in the training trace")
        self.prior = np.mean([r.freq for r in reqs], axis=0)  # [L, E]
        return self

    def first(self, prev: RequestRouting | None) -> np.ndarray:
        return prev.freq[0] if prev is not None else self.prior[0]  # layer 0: the previous prompt's layer 0

    def predict(self, req: RequestRouting, pos: int, prev: RequestRouting | None) -> np.ndarray:
        raise NotImplementedError


class LayerTransition(LPredictor):
    """Token-level transition counts C[pos][a, b]: a token that used expert a at layer pos-1 used b at pos.
    Prediction for layer pos = (selection counts at pos-1) @ row-normalised C[pos]."""
    name = "layer-transition"

    def fit(self, reqs):
        super().fit(reqs)
        n_l, n_e = self.prior.shape
        self.trans = np.zeros((n_l, n_e, n_e))  # [L, E, E]; [0] unused
        for r in reqs:
            for pos in range(1, n_l):
                a, b = r.tokens[pos - 1], r.tokens[pos]  # [T, k] each: every (a_i, b_j) pair of a token counts
                np.add.at(self.trans[pos], (np.repeat(a, b.shape[1], 1), np.tile(b, (1, a.shape[1]))), 1)
        self.trans = normalise(self.trans + 0.1)  # add-0.1 smoothing
        return self

    def predict(self, req, pos, prev):
        if pos == 0:
            return self.first(prev)
        return normalise(req.counts[pos - 1] @ self.trans[pos])


class MLPTransition(LPredictor):
    """Learned per-token transition: multi-hot experts at layer pos-1 + layer one-hot -> expert distribution at
    pos (an MLP); a request's prediction is the mean over its tokens."""

    name = "mlp-transition"

    def __init__(self, hidden: int = 128, epochs: int = 4, seed: int = 0):
        self.hidden, self.epochs, self.seed = hidden, epochs, seed

    def _x(self, idx: np.ndarray, pos: int) -> torch.Tensor:  # [T, k] -> [T, E + L]
        n_l, n_e = self.prior.shape
        x = torch.zeros(len(idx), n_e + n_l)
        x[torch.arange(len(idx))[:, None], torch.from_numpy(idx)] = 1.0
        x[:, n_e + pos] = 1.0
        return x

    def fit(self, reqs):
        super().fit(reqs)
        torch.manual_seed(self.seed)
        n_l, n_e = self.prior.shape
        self.net = nn.Sequential(nn.Linear(n_e + n_l, self.hidden), nn.ReLU(), nn.Linear(self.hidden, n_e))
        xs, ys = [], []
        for r in reqs:
            for pos in range(1, n_l):
                xs.append(self._x(r.tokens[pos - 1], pos))
                y = torch.zeros(len(r.tokens[pos]), n_e)
                y[torch.arange(len(y))[:, None], torch.from_numpy(r.tokens[pos])] = 1.0 / r.tokens[pos].shape[1]
                ys.append(y)
        x, y = torch.cat(xs), torch.cat(ys)  # [N, E + L], [N, E]
        opt = torch.optim.Adam(self.net.parameters(), lr=2e-3)
        g = torch.Generator().manual_seed(self.seed)
        for _ in range(self.epochs):
            for b in torch.randperm(len(x), generator=g).split(256):
                opt.zero_grad()
                loss = -(y[b] * torch.log_softmax(self.net(x[b]), -1)).sum(-1).mean()
                loss.backward()
                opt.step()
        return self

    @torch.no_grad()
    def predict(self, req, pos, prev):
        if pos == 0:
            return self.first(prev)
        return torch.softmax(self.net(self._x(req.tokens[pos - 1], pos)), -1).mean(0).numpy()


# ---- evaluation ------------------------------------------------------------------------------------------------
def compare_predictors(train: list[RequestRouting], test: list[RequestRouting], k: int, cover: int,
                       classifier: TaskClassifier | None = None, seed: int = 0) -> dict:
    """Fit every predictor on `train`, score on `test`; the winner of each variant by top-k accuracy."""
    cls = classifier.classify if classifier is not None else None
    res: dict = {"A": {}, "L": {}, "k": k, "coverage_L": cover, "train_requests": len(train),
                 "test_requests": len(test)}
    for p in (PreviousPrompt(), RecentMean(), TaskFrequency(), GRUPredictor(False, seed=seed),
              GRUPredictor(True, seed=seed), LayerTransition(), MLPTransition(seed=seed)):
        t0 = time.perf_counter()
        p.fit(train)
        fit_s = time.perf_counter() - t0
        is_a = isinstance(p, APredictor)
        m = evaluate_a(p, test, k, cover, cls) if is_a else evaluate_l(p, test, k, cover)
        res["A" if is_a else "L"][p.name] = dict(m, fit_s=fit_s)
    for v in ("A", "L"):
        res[f"winner_{v}"] = max(res[v], key=lambda n: res[v][n]["topk_accuracy"])
    return res


# ---- engine wiring ---------------------------------------------------------------------------------------------
MODES = ("none", "every", "periodic", "task")


def make_resident(engine, keys: list) -> int:
    """Make (layer, expert) keys resident, best first; returns the reads done. Planned experts already resident
    are touched first (best last), so that the policy evicts experts outside the plan to make room for the rest."""
    cache = engine.manager.cache
    for key in reversed(keys):
        if cache.resident(key):
            cache.lookup(key, count=False)  # a policy access, not counted as a hit
    missing = [k for k in keys if not cache.resident(k)]
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
        self._prefill_end: tuple | None = None
        self._hits = {"prefill": [0, 0, 0, 0], "decode": [0, 0, 0, 0]}
        engine.manager.observers.append(self._observe)

    def _observe(self, layer, routing, is_decode) -> None:
        if self._cur is None:
            return
        t0 = time.perf_counter()
        m = self.engine.manager
        for slot in self._pinned.pop(layer, ()):  # this layer runs now: its preloaded experts may be evicted again
            m.cache.unpin(slot)
        if is_decode and self._prefill_end is None:  # first decode layer: the prefill's counters are final
            self._prefill_end = (m.cache.hits, m.cache.misses)
        self._seen.append((self._pos[layer], is_decode, routing.idx))  # counted once, in after()
        t1 = time.perf_counter()
        self.t["observe_s"] += t1 - t0
        if self.account:  # measurement only: residency as the router asked (before any rerouting)
            n: dict = {}
            for e in routing.idx.reshape(-1).tolist():
                n[e] = n.get(e, 0) + 1
            h = self._hits["decode" if is_decode else "prefill"]
            for e, c in n.items():
                hit = (layer, e) in m.cache.slot_of or (layer, e) in m.inflight
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
            cache = self.engine.manager.cache
            if self.keep:  # experts dropped from the plan become evictable before the new plan is read
                new = set(keys)
                for key in [k for k in self._kept if k not in new]:
                    cache.unpin(self._kept.pop(key))
            self.t["plan_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            info["preloaded"] = make_resident(self.engine, keys)
            self.t["preload_s"] += time.perf_counter() - t0
            for key in keys:  # pin the plan: until its layer's prefill (shield) or until the plan changes (keep)
                slot = cache.slot_of.get(key)
                if slot is None or (self.keep and key in self._kept) or not (self.keep or self.shield):
                    continue
                cache.pin(slot)
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
                self.engine.manager.cache.unpin(slot)
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
        prediction_overhead_s, preload_s, prefill_/decode_hits/misses (engine counters, split at the first decode
        layer), routed = {"prefill"|"decode": [distinct hits, distinct misses, selection hits, selection misses]}
        (residency as the router asked, before rerouting; with `account`), and `ttft_total_s` / `request_s` from
        arrival (tokenising, classifier, predictor, planning and expert reads included)."""
        e, m = self.engine, self.engine.manager
        t0 = time.perf_counter()
        ids = e.encode(prompt)
        before = (self.t["classify_s"] + self.t["predict_s"] + self.t["plan_s"], self.t["preload_s"])
        info = self.before(prompt, len(ids))
        overhead = self.t["classify_s"] + self.t["predict_s"] + self.t["plan_s"] - before[0]
        preload_s = self.t["preload_s"] - before[1]
        c0 = (m.cache.hits, m.cache.misses)
        self._prefill_end = None
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
        end = (m.cache.hits, m.cache.misses)
        mid = self._prefill_end or end  # exact hits/misses: substitution hooks keep cache.hits exact
        gen.stats.update(info, prediction_overhead_s=overhead, preload_s=preload_s,
                         prefill_hits=mid[0] - c0[0], prefill_misses=mid[1] - c0[1],
                         decode_hits=end[0] - mid[0], decode_misses=end[1] - mid[1],
                         routed={k: list(v) for k, v in self._hits.items()},
                         ttft_total_s=pre_s + gen.stats.get("ttft_s", 0.0), request_s=time.perf_counter() - t0)
        return gen

    def stats(self) -> dict:
        return dict(self.t, mode=self.mode, period=self.period, requests=self.requests, predictor_calls=self.calls,
                    slots=self.slots, scope=self.scope)

    def close(self) -> None:
        self.release()
        for slot in self._kept.values():
            self.engine.manager.cache.unpin(slot)
        self._kept = {}
        if self._observe in self.engine.manager.observers:
            self.engine.manager.observers.remove(self._observe)


# ---- persistence: the per-task table `moelite predict train --out` writes ----------------------------------------------
def save_task_table(pred: APredictor, path) -> None:
    obj = {"prior": pred.prior.tolist(), "task_prior": {t: v.tolist() for t, v in pred.task_prior.items()},
           "task_n": pred.task_n}
    with open(path, "w") as f:
        json.dump(obj, f)


def load_task_table(path) -> TaskFrequency:
    with open(path) as f:
        obj = json.load(f)
    p = TaskFrequency()
    p.prior, p.task_n = np.asarray(obj["prior"]), {t: int(v) for t, v in obj["task_n"].items()}
    p.task_prior = {t: np.asarray(v) for t, v in obj["task_prior"].items()}
    return p


# ---- CLI -------------------------------------------------------------------------------------------------------
def register_cli(sub) -> None:
    from .cli import add_engine_flags, engine_config
    from .tasks import register_profile_cli

    p = sub.add_parser("predict", help="eMoE expert predictors: fit/evaluate on traces, profile task sensitivity")
    ps = p.add_subparsers(dest="predict_cmd", required=True)
    t = ps.add_parser("train", help="fit every predictor on a trace, score on a held-out trace, save the tables")
    t.add_argument("--trace", required=True, help="training trace (.npz from `moelite trace`)")
    t.add_argument("--test-trace", default=None, help="held-out trace (default: the last 30%% of --trace)")
    t.add_argument("--cover", type=float, default=0.4, help="L for coverage@L as a fraction of the experts")
    t.add_argument("--out", default=None, help="write the per-task frequency table (JSON) here")
    t.add_argument("--seed", type=int, default=0)

    def run_train(args) -> int:
        tr = requests_from_trace(Trace.load(args.trace))
        if args.test_trace:
            te = requests_from_trace(Trace.load(args.test_trace))
        else:
            cut = int(len(tr) * 0.7)
            tr, te = tr[:cut], tr[cut:]
        if not tr or not te:
            raise ValueError("trace: need requests for both training and held-out scoring")
        meta = Trace.load(args.trace).meta
        if not 0 < args.cover <= 1:
            raise ValueError(f"cover: {args.cover!r} must be in (0, 1]")
        cover = max(1, round(args.cover * meta["num_experts"]))
        clf = TaskClassifier()
        res = compare_predictors(tr, te, int(meta["top_k"]), cover, clf, args.seed)
        print(table(res))
        if args.out:
            save_task_table(TaskFrequency().fit(tr), args.out)
            res["saved"] = args.out
        print(json.dumps(res))
        return 0

    t.set_defaults(func=run_train)

    register_profile_cli(ps, add_engine_flags, engine_config)
