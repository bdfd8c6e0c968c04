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
  - `evaluate(...)` scores predictors on held-out requests: top-k accuracy (share of the k most used experts among
    the k predicted), precision/recall of the "hot" set (experts above a uniform share, predicted vs actual),
    coverage@L (share of the request's expert selections inside the top-L predicted, the hit rate a preloaded
    cache of L per layer would see), each beside the expectation for a random expert set of the same size.
  - `Preloader(engine, mode, ...)`: before each request, makes the predicted experts resident (`engine.preload`):
    mode "none" | "every" (eMoE-E: predictor every prompt) | "periodic" (every `period` prompts, the set reused in
    between) | "task" (task classifier + per-task predictions refreshed every `period` prompts + the load rule).
    Misses are handled by the engine as usual (exact); `reroute=True` installs `tasks.reroute_to_resident`
    (lossy). It times its own work (classifier, predictor calls, planning) apart from the expert reads.
  - `moelite predict train|profile` (CLI) fits/evaluates predictors on traces and profiles task sensitivity.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from .tasks import TaskClassifier, load_scores, plan_preload, reroute_to_resident, routing_override
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


def normalise(c: np.ndarray) -> np.ndarray:
    """Rows to relative frequencies; all-zero rows become uniform."""
    c = np.asarray(c, dtype=np.float64)
    s = c.sum(-1, keepdims=True)
    return np.where(s > 0, c / np.where(s > 0, s, 1), 1.0 / c.shape[-1])


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
        logits = self.head(torch.cat([h, nxt], -1)).view(-1, *self.log_prior.shape) + self.log_prior
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
                a, b = r.tokens[pos - 1], r.tokens[pos]  # [T, k] each
                oh_a = np.zeros((len(a), n_e))
                oh_a[np.arange(len(a))[:, None], a] = 1
                oh_b = np.zeros((len(b), n_e))
                oh_b[np.arange(len(b))[:, None], b] = 1
                self.trans[pos] += oh_a.T @ oh_b
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
def score(pred: np.ndarray, counts: np.ndarray, k: int, cover: int) -> dict:
    """Metrics of one layer's prediction [E] against actual selection counts [E], and their random expectations."""
    n_e = len(pred)
    top_pred = np.argsort(-pred, kind="stable")
    actual_top = set(np.argsort(-counts, kind="stable")[:k].tolist())
    hot_p = set(np.nonzero(pred > 1.0 / n_e)[0].tolist())
    hot_a = set(np.nonzero(normalise(counts) > 1.0 / n_e)[0].tolist())
    inter = len(hot_p & hot_a)
    total = counts.sum()
    return {
        "topk_accuracy": len(actual_top & set(top_pred[:k].tolist())) / k, "random_topk_accuracy": k / n_e,
        "precision": inter / len(hot_p) if hot_p else 0.0, "random_precision": len(hot_a) / n_e,
        "recall": inter / len(hot_a) if hot_a else 0.0, "random_recall": len(hot_p) / n_e,
        "coverage": counts[top_pred[:cover]].sum() / total if total else 0.0, "random_coverage": cover / n_e,
    }


def _mean(rows: list[dict]) -> dict:
    out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    for m in ("topk_accuracy", "precision", "recall", "coverage"):
        out[f"{m}_vs_random"] = out[m] / out[f"random_{m}"] if out[f"random_{m}"] else 0.0
    return out


def evaluate_a(pred: APredictor, test: list[RequestRouting], k: int, cover: int, classify=None,
               history: list[RequestRouting] = ()) -> dict:
    """Each test request predicted from the requests before it (the held-out stream in order)."""
    hist, rows = list(history), []
    for r in test:
        task = (classify(r.prompt) if classify else r.task) if pred.uses_task else None
        p = pred.predict(hist, task)
        rows += [score(p[i], r.counts[i], k, cover) for i in range(len(p))]
        hist.append(r)
    return _mean(rows)


def evaluate_l(pred: LPredictor, test: list[RequestRouting], k: int, cover: int) -> dict:
    rows = []
    for j, r in enumerate(test):
        prev = test[j - 1] if j else None
        rows += [score(pred.predict(r, pos, prev), r.counts[pos], k, cover) for pos in range(len(r.counts))]
    return _mean(rows)


def compare_predictors(train: list[RequestRouting], test: list[RequestRouting], k: int, cover: int,
                       classifier: TaskClassifier | None = None, seed: int = 0) -> dict:
    """Fit every predictor on `train`, score on `test`; the winner of each variant by top-k accuracy."""
    cls = classifier.classify if classifier is not None else None
    res: dict = {"A": {}, "L": {}, "k": k, "coverage_L": cover, "train_requests": len(train),
                 "test_requests": len(test)}
    for p in (PreviousPrompt(), RecentMean(), TaskFrequency(), GRUPredictor(False, seed=seed),
              GRUPredictor(True, seed=seed)):
        t0 = time.perf_counter()
        p.fit(train)
        fit_s = time.perf_counter() - t0
        res["A"][p.name] = dict(evaluate_a(p, test, k, cover, cls), fit_s=fit_s)
    for p in (LayerTransition(), MLPTransition(seed=seed)):
        t0 = time.perf_counter()
        p.fit(train)
        fit_s = time.perf_counter() - t0
        res["L"][p.name] = dict(evaluate_l(p, test, k, cover), fit_s=fit_s)
    for v in ("A", "L"):
        res[f"winner_{v}"] = max(res[v], key=lambda n: res[v][n]["topk_accuracy"])
    return res


def table(res: dict) -> str:
    head = "| variant | predictor | top-k acc | random | x | precision | random | recall | random | coverage@L | random |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for v in ("A", "L"):
        for name, m in res[v].items():
            star = " *" if res.get(f"winner_{v}") == name else ""
            lines.append(f"| eMoE-{v} | {name}{star} | {m['topk_accuracy']:.3f} | {m['random_topk_accuracy']:.3f} | "
                         f"{m['topk_accuracy_vs_random']:.2f} | {m['precision']:.3f} | {m['random_precision']:.3f} | "
                         f"{m['recall']:.3f} | {m['random_recall']:.3f} | {m['coverage']:.3f} | "
                         f"{m['random_coverage']:.3f} |")
    return "\n".join(lines) + "\n"


# ---- engine wiring ---------------------------------------------------------------------------------------------
MODES = ("none", "every", "periodic", "task")


class Preloader:
    """Makes predicted experts resident before each request's prefill (see the module contract)."""

    def __init__(self, engine, mode: str = "task", predictor: APredictor | None = None, period: int = 40,
                 classifier: TaskClassifier | None = None, sensitivity: dict | None = None,
                 out_tokens: dict | None = None, fill: float = 1.0, reroute: bool = False):
        if mode not in MODES:
            raise ValueError(f"mode: {mode!r} is not one of {', '.join(MODES)}")
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise ValueError(f"period: {period!r} must be an int >= 1")
        if not 0 < fill <= 1:
            raise ValueError(f"fill: {fill!r} must be in (0, 1]")
        if mode != "none" and predictor is None:
            raise ValueError(f"predictor: mode {mode!r} needs a fitted APredictor")
        if mode == "task" and not predictor.uses_task:
            raise ValueError(f"predictor: mode 'task' needs a task-aware predictor, {predictor.name!r} is not")
        self.engine, self.mode, self.predictor = engine, mode, predictor
        self.period = 1 if mode == "every" else period
        self.classifier = classifier or TaskClassifier()
        self.sensitivity, self.out_tokens, self.reroute = sensitivity, out_tokens or {}, reroute
        self.layers = list(engine.layout.layers)
        self.n_exp = engine.num_experts
        scope = engine.config.cache_scope
        n_slots = engine.pool.n_slots
        self.scope = scope
        self.slots = int((n_slots // len(self.layers) if scope == "layer" else n_slots) * fill)
        self.history: list[RequestRouting] = []
        self.freq: dict = {}  # task (or None) -> predicted [L, E], reused until the next invocation
        self.last_call = -10**9
        self.requests = 0
        self.calls = 0
        self.t = {"classify_s": 0.0, "predict_s": 0.0, "plan_s": 0.0, "preload_s": 0.0}
        self._cur: RequestRouting | None = None
        self._prefill_end: tuple | None = None
        self._hits = {"prefill": np.zeros(4, np.int64), "decode": np.zeros(4, np.int64)}
        engine.manager.observers.append(self._observe)

    def _observe(self, layer, routing, is_decode) -> None:
        r = self._cur
        if r is None:
            return
        if is_decode and self._prefill_end is None:  # first decode layer: the prefill's counters are final
            c = self.engine.manager.cache
            self._prefill_end = (c.hits, c.misses)
        pos = self.layers.index(layer)
        c = torch.bincount(routing.idx.reshape(-1).cpu(), minlength=self.n_exp).numpy()  # [E]
        r.counts[pos] += c
        if not is_decode:
            r.prefill[pos] += c
        # residency as the router asked (before any rerouting): distinct experts and token selections
        m = self.engine.manager
        used = np.nonzero(c)[0]
        res = np.array([m.cache.resident((layer, int(e))) or (layer, int(e)) in m.inflight for e in used], bool)
        h = self._hits["decode" if is_decode else "prefill"]
        h += (int(res.sum()), int((~res).sum()), int(c[used][res].sum()), int(c[used][~res].sum()))

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
            for key in reversed(keys):  # refresh the planned residents (best last) so the loads evict others
                if cache.resident(key):
                    cache.lookup(key, count=False)
            missing = [k for k in keys if not cache.resident(k)]
            self.t["plan_s"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            info["preloaded"] = self.engine.preload(missing) if missing else 0
            self.t["preload_s"] += time.perf_counter() - t0
        shape = (len(self.layers), self.n_exp)
        self._cur = RequestRouting(task or "default", prompt, np.zeros(shape, np.int64), np.zeros(shape, np.int64),
                                   [], prompt_tokens)
        return info

    def after(self) -> RequestRouting:
        r, self._cur = self._cur, None
        if r is not None:
            self.history.append(r)
            del self.history[:-256]  # predictors look at recent prompts only
        self.requests += 1
        return r

    def generate(self, prompt: str, **kw):
        """before() + engine.generate() + after(); the Generation's stats gain the preloading figures and the
        prefill/decode split of hits and misses; `request_s` / `ttft_total_s` include classifier, predictor,
        planning and expert reads."""
        e, m = self.engine, self.engine.manager
        t0 = time.perf_counter()
        ids = e.encode(prompt)
        before = (self.t["classify_s"] + self.t["predict_s"] + self.t["plan_s"], self.t["preload_s"])
        info = self.before(prompt, len(ids))
        overhead = self.t["classify_s"] + self.t["predict_s"] + self.t["plan_s"] - before[0]
        preload_s = self.t["preload_s"] - before[1]
        c0 = (m.cache.hits, m.cache.misses)
        self._prefill_end = None
        self._hits = {"prefill": np.zeros(4, np.int64), "decode": np.zeros(4, np.int64)}
        pre_s = time.perf_counter() - t0  # arrival -> prefill starts: tokenise, classify, predict, plan, read
        if self.reroute:
            kw.setdefault("substitution_alpha", routing_override.ON)
            with routing_override(e, reroute_to_resident):
                gen = e.generate(ids, **kw)
        else:
            gen = e.generate(ids, **kw)
        self.after()
        end = (m.cache.hits, m.cache.misses)
        mid = self._prefill_end or end  # exact hits/misses: substitution hooks keep cache.hits exact
        gen.stats.update(info, prediction_overhead_s=overhead, preload_s=preload_s,
                         prefill_hits=mid[0] - c0[0], prefill_misses=mid[1] - c0[1],
                         decode_hits=end[0] - mid[0], decode_misses=end[1] - mid[1],
                         routed=({k: v.tolist() for k, v in self._hits.items()}),
                         ttft_total_s=pre_s + gen.stats.get("ttft_s", 0.0), request_s=time.perf_counter() - t0)
        return gen

    def stats(self) -> dict:
        return dict(self.t, mode=self.mode, period=self.period, requests=self.requests, predictor_calls=self.calls,
                    slots=self.slots, scope=self.scope)

    def close(self) -> None:
        if self._observe in self.engine.manager.observers:
            self.engine.manager.observers.remove(self._observe)


# ---- persistence of per-task tables (what `moelite predict train` saves) -------------------------------------------
def save_task_table(pred: APredictor, path) -> None:
    """The fitted per-task and global frequency priors as JSON (enough to rebuild TaskFrequency)."""
    obj = {"prior": pred.prior.tolist(), "task_prior": {t: v.tolist() for t, v in pred.task_prior.items()},
           "task_n": pred.task_n}
    with open(path, "w") as f:
        json.dump(obj, f)


def load_task_table(path) -> TaskFrequency:
    with open(path) as f:
        obj = json.load(f)
    p = TaskFrequency()
    p.prior = np.asarray(obj["prior"])
    p.task_prior = {t: np.asarray(v) for t, v in obj["task_prior"].items()}
    p.task_n = {t: int(v) for t, v in obj["task_n"].items()}
    return p


# ---- CLI -------------------------------------------------------------------------------------------------------
def register_cli(sub) -> None:
    from .cli import add_engine_flags, engine_config

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

    f = ps.add_parser("profile", help="per-task layer sensitivity to randomised routing (offline)")
    f.add_argument("--model", default=None, help="checkpoint folder (default: the demo model)")
    f.add_argument("--prompts-per-task", type=int, default=4)
    f.add_argument("--max-tokens", type=int, default=16)
    f.add_argument("--threshold", type=float, default=0.85)
    f.add_argument("--builtin", action="store_true", help="use the built-in prompts, not ../shared/data corpora")
    f.add_argument("--out", default=None, help="write the profile JSON here")
    add_engine_flags(f)

    def run_profile(args) -> int:
        from .engine import Engine
        from .prompts import PROMPTS
        from .tasks import TASKS, corpus_prompts, profile_sensitivity

        if args.prompts_per_task < 1:
            raise ValueError("prompts_per_task: must be >= 1")
        engine = Engine(args.model, engine_config(args), progress=False)
        if args.builtin:
            by_task = {t: [p for d, p in PROMPTS if d == t][: args.prompts_per_task] for t in TASKS}
        else:
            by_task = {t: corpus_prompts(t, args.prompts_per_task, "test", seed=7) for t in TASKS}
        prof = profile_sensitivity(engine, by_task, args.max_tokens, args.threshold)
        if args.out:
            with open(args.out, "w") as fh:
                json.dump(prof, fh, indent=1)
        print(json.dumps(prof))
        return 0

    f.set_defaults(func=run_profile)
