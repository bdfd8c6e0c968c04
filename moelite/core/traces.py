"""Routing traces: record, save, load and replay which experts each token used.

Contract:
  - `TraceRecorder(engine)` hooks the engine's MoE layers; while `recording(meta)` is active it stores, per
    request, step (0 = prefill, then one per decode step), layer and token: the selected experts [k] and the full
    gate-score vector [E] (float16). `save(path)` writes an .npz that numpy opens without moelite, with a JSON
    `meta` entry (model, architecture, top-k, experts, per-request prompts).
  - `Trace.load(path)` reads it back; `Trace.accesses()` yields, per (request, step, layer), the set of experts
    needed: what cache simulation and Belady replay.
  - `TraceReplay(trace, layers)` makes a model's routing follow a recorded trace (layer l takes recorded layer
    l mod n): used to run real-shape random checkpoints with the routing locality of a trained model.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from moelite.core.arch.base import Routing


class TraceRecorder:
    def __init__(self, engine, include_prefill: bool = True):
        self.engine = engine
        self.include_prefill = include_prefill
        self.active = False
        self.request = -1
        self.requests: list[dict] = []
        self._step_of_layer: dict[int, int] = {}
        self.rows: dict[str, list] = {"request": [], "step": [], "layer": [], "token": [], "idx": [], "probs": [],
                                      "pred": []}
        engine.manager.add_observer(self._observe)

    @contextmanager
    def recording(self, **meta):
        self.request += 1
        self.requests.append(meta)
        self._step_of_layer = {}
        self.active = True
        try:
            yield self
        finally:
            self.active = False

    def _observe(self, layer: int, routing: Routing, phase: str) -> None:
        if not self.active or (phase != "decode" and not self.include_prefill):
            return
        step = self._step_of_layer.get(layer, -1) + 1  # each layer runs once per forward
        self._step_of_layer[layer] = step
        n = routing.idx.shape[0]
        self.rows["request"].append(np.full(n, self.request, np.int32))
        self.rows["step"].append(np.full(n, step, np.int32))
        self.rows["layer"].append(np.full(n, layer, np.int16))
        self.rows["token"].append(np.arange(n, dtype=np.int32))
        self.rows["idx"].append(routing.idx.detach().cpu().numpy().astype(np.int16))
        self.rows["probs"].append(routing.probs.detach().float().cpu().numpy().astype(np.float16))
        # the next MoE layer's experts as predicted from this layer's input (what prefetch would read)
        m = self.engine.manager
        nxt = m.next_layer.get(layer)
        if nxt is not None and m.last_x is not None and m.last_x.shape[0] == n:
            blk = m.blocks[nxt]
            pred = blk.adapter.route(blk.block, m.last_x, blk.top_k).idx.cpu().numpy().astype(np.int16)
        else:
            pred = np.full(routing.idx.shape, -1, np.int16)
        self.rows["pred"].append(pred)

    def close(self) -> None:
        self.engine.manager.remove_observer(self._observe)

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        e = self.engine
        meta = {"format": "moelite-trace-1", "model": e.path.name, "model_type": e.checkpoint.model_type,
                "top_k": e.top_k, "num_experts": e.num_experts, "moe_layers": e.layout.layers,
                "requests": self.requests}
        arrays = {k: (np.concatenate(v) if v else np.zeros((0,), np.int32)) for k, v in self.rows.items()}
        np.savez_compressed(path, meta=np.array(json.dumps(meta)), **arrays)
        return path


@dataclass
class Trace:
    meta: dict
    request: np.ndarray  # [M]
    step: np.ndarray  # [M]
    layer: np.ndarray  # [M]
    token: np.ndarray  # [M]
    idx: np.ndarray  # [M, k]
    probs: np.ndarray  # [M, E] float16
    pred: np.ndarray | None = None  # [M, k] next layer's experts predicted from this layer's input (-1: none)

    @classmethod
    def load(cls, path: str | Path) -> "Trace":
        path = Path(path)
        if not path.is_file():
            raise ValueError(f"trace: file {path.name!r} does not exist; record one with `moelite trace`")
        try:
            z = np.load(path, allow_pickle=False)
            meta = json.loads(str(z["meta"]))
            pred = z["pred"] if "pred" in z.files else None
            return cls(meta, z["request"], z["step"], z["layer"], z["token"], z["idx"], z["probs"], pred)
        except (KeyError, ValueError, OSError) as exc:
            raise ValueError(f"trace: {path.name!r} is not a moelite trace (.npz with meta, idx, probs): {exc}") from exc

    @property
    def layers(self) -> list[int]:
        return sorted(int(x) for x in np.unique(self.layer))

    def accesses(self, decode_only: bool = False):
        """Yield (request, step, layer, experts[set], mean_probs[E]) in execution order."""
        if len(self.layer) == 0:
            return
        key = np.stack([self.request, self.step, self.layer]).T
        change = np.nonzero(np.any(key[1:] != key[:-1], axis=1))[0] + 1
        bounds = np.concatenate([[0], change, [len(key)]])
        for a, b in zip(bounds[:-1], bounds[1:]):
            r, s, l_ = (int(v) for v in key[a])
            if decode_only and s == 0:
                continue
            yield r, s, l_, set(np.unique(self.idx[a:b]).tolist()), self.probs[a:b].astype(np.float32).mean(0)


class TraceReplay:
    """Routing source that follows a recorded trace, token by token, per layer (cycling when exhausted)."""

    def __init__(self, trace: Trace, model_layers: list[int], decode_only: bool = True):
        rec_layers = trace.layers
        sel = np.ones(len(trace.layer), bool) if not decode_only else trace.step > 0
        self.rows = {l_: np.nonzero(sel & (trace.layer == l_))[0] for l_ in rec_layers}
        self.map = {ml: rec_layers[i % len(rec_layers)] for i, ml in enumerate(model_layers)}
        self.trace = trace
        self.pos = {ml: 0 for ml in model_layers}
        self.last: dict[int, np.ndarray] = {}
        self.rec_next = {r: (rec_layers[i + 1] if i + 1 < len(rec_layers) else None) for i, r in enumerate(rec_layers)}

    def predicted(self, layer: int, next_layer: int) -> torch.Tensor | None:
        """The recorded model's prediction, for the rows just replayed at `layer`, of the next layer's experts;
        None where the model's next layer does not map to the recorded next layer (wrap-around) or none was kept."""
        take = self.last.get(layer)
        if take is None or self.trace.pred is None or self.rec_next[self.map[layer]] != self.map[next_layer]:
            return None
        pred = self.trace.pred[take]
        if (pred < 0).any():
            return None
        return torch.from_numpy(pred.astype(np.int64))

    def route(self, layer: int, n_tokens: int, k: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.rows[self.map[layer]]
        take = rows[(self.pos[layer] + np.arange(n_tokens)) % len(rows)]
        self.last[layer] = take
        self.pos[layer] += n_tokens
        idx = torch.from_numpy(self.trace.idx[take][:, :k].astype(np.int64)).to(device)
        probs = torch.from_numpy(self.trace.probs[take].astype(np.float32)).to(device)
        return idx, probs


def record(engine, prompts: list[tuple[str, str]], max_tokens: int, out: str | Path, seed: int = 0,
           progress: bool = False) -> Path:
    """Generate for each (domain, prompt) with the engine, recording routing; save to `out` (`progress`: a bar on
    stderr)."""
    rec = TraceRecorder(engine)
    try:
        for i, (domain, prompt) in enumerate(tqdm(prompts, desc="trace", unit="prompt", disable=not progress)):
            with rec.recording(domain=domain, prompt=prompt):
                engine.generate(prompt, max_tokens=max_tokens, temperature=0.8, top_p=0.95, seed=seed + i)
    finally:
        rec.close()
    return rec.save(out)

