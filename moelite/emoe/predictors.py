"""Expert predictors trained on routing traces (eMoE §2.2-2.3).

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
    `scoring.evaluate_a` / `evaluate_l`; the winner of each variant is the best by top-k accuracy.
  - `save_task_table` / `load_task_table`: the per-task frequency table `moelite predict train --out` writes.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from moelite.core.traces import Trace
from moelite.emoe.classifier import TaskClassifier
from moelite.emoe.scoring import evaluate_a, evaluate_l, normalise

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
