"""SMoE's expert-cache router (Algorithm 1): substitute low-importance cache misses by resident near-cut-off experts.

Contract: `cache_router(ctx, layer, block, routing, alpha) -> Routing` is the engine's routing hook (a
`moe_layer.RoutingHook`), called by `OffloadedMoEBlock` once per MoE layer per forward pass in decode (and in prefill
only if the call's in_prefill is set), only when alpha > 0. `ctx` (`moe_layer.RouteContext`) gives the architecture
adapter, expert residency and the call's substitution settings. `alpha` is a float or a per-token tensor [N] in
[0, 1).

Per token n (vectorised over the N tokens of the pass; k = top-k, E = routed experts):
  score      the gate score `routing.probs[n]` of every expert (softmax over all experts; sigmoid for DeepSeek-V3):
             the quantity the combine weights come from, SMoE's "importance".
  S          S_{k+1}: the score of the expert the architecture's own ranking (`routing.choice`) puts at place k+1,
             i.e. the first one it would have picked next. For plain softmax top-k (Mixtral, Qwen, OLMoE, DeepSeek-V2
             greedy) this is exactly the (k+1)-th highest score. For group-limited or bias-corrected ranking
             (DeepSeek-V2 group_limited_greedy, V3) it is the best expert *still eligible* under that ranking.
  top-score  selected and score > (1+alpha)*S: always runs. Their union over the batch is U.
  low-score  selected, not top-score: runs if resident or in U; otherwise it is a miss to substitute.
  candidate  not selected by n, eligible under the architecture's ranking (inside the allowed groups),
             resident or in U, and (1-alpha)*S < score <= S.
  Misses are substituted lowest-score first by the candidates highest-score first (each candidate at most once per
  token); misses left without a candidate stay and are loaded (or handled by the manager's miss path). A substitute
  is weighted by its own gate score through `adapter.weigh`, which renormalises over the new set only where the
  architecture normalises top-k.
Mode (`ctx.substitution_mode`): "always" substitutes every miss it can (the paper). "stall" (beyond the paper)
counts what a substitution saves: a layer's misses are read `P = ctx.io_parallel` at a time, so it waits for
ceil(misses / P) rounds of reads, and a substitution that does not remove a round costs accuracy for nothing. It
substitutes the fewest low-score misses (lowest score first) that reach the fewest rounds possible, and none when
no round can be removed. Residency (not reads in flight) decides what is a miss.
Per-layer profile (beyond the paper): with `ctx.alpha_scale` = {layer: m} (EngineConfig.substitution_profile),
layer L runs at min(alpha * m, 0.95); a multiplier of 0 keeps that layer exact.
alpha = 0 returns the routing object unchanged (the candidate window ((1-0)S, S] is empty), so outputs are bit for
bit the exact model's.

`plan_batch(..., sync=False)` is the same plan with no host synchronisation (the CUDA graph path runs it on the
device).

Accounting: the returned Routing marks substituted entries (`Routing.substituted`); `ExpertManager.run` counts them
as substitutions and never as cache hits, so `expert_hits` keeps counting exact hits only (SMoE's code counted
substitutions as hits). For a batch of one token (decode): expert_hits + expert_misses + expert_reads_in_flight +
expert_substitutions = evaluations the exact model asked for (moelite.core.counters).
"""

from __future__ import annotations

import math

import torch

from moelite.core.arch.base import Routing
from moelite.config import alpha_positive, layer_alpha


def _eligible(probs: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """Experts the architecture's ranking may pick [N, E]: DeepSeek masks other groups with -inf (V3) or 0 (V2)."""
    masked_v2 = (choice == 0) & (probs != 0)  # choice is probs with other groups zeroed
    return torch.isfinite(choice) & ~masked_v2


def _alpha_column(alpha, n: int, device) -> torch.Tensor:
    """alpha (float or [N]) -> [N, 1] float32."""
    if isinstance(alpha, torch.Tensor):
        a = alpha.to(device=device, dtype=torch.float32).reshape(-1)
        if a.numel() == 1:
            a = a.expand(n)
        if a.numel() != n:
            raise ValueError(f"substitution_alpha: per-token tensor has {a.numel()} values for {n} tokens")
        return a[:, None]
    return torch.full((n, 1), float(alpha), dtype=torch.float32, device=device)


def resident_mask(ctx, layer: int, n_experts: int, device) -> torch.Tensor:
    """[E] bool: which experts of `layer` sit in the cache now (`ctx` a RouteContext)."""
    return torch.tensor(_resident_list(ctx, layer, n_experts), dtype=torch.bool, device=device)


def _resident_list(ctx, layer: int, n_experts: int) -> list[bool]:
    res = ctx.resident
    return [res((layer, e)) for e in range(n_experts)]


def plan(routing: Routing, k: int, alpha, resident: torch.Tensor):
    """The pure part of Algorithm 1 (no side effects): returns (new_idx [N,k], substituted [N,k] bool) or None when
    nothing is substituted. `resident` [E] bool. One token (decode at batch 1) takes a list-based path: a few dozen
    tiny tensor ops cost more than the Python on 64 numbers."""
    if routing.probs.shape[0] == 1:
        return _plan_one(routing, k, alpha, resident)
    return plan_batch(routing, k, alpha, resident)


def _plan_one(routing: Routing, k: int, alpha, resident, stall_parallel: int = 0):
    out = _plan_one_lists(routing, k, alpha, resident, stall_parallel)
    if out is None:
        return None
    dev = routing.idx.device
    return (torch.tensor([out[0]], dtype=routing.idx.dtype, device=dev),
            torch.tensor([out[1]], dtype=torch.bool, device=dev))


def _rounds(misses: int, parallel: int) -> int:
    return -(-misses // parallel)


def _stall_keep(n_missing: int, n_substitutable: int, parallel: int) -> int:
    """How many of `n_substitutable` misses (out of `n_missing` experts to read) to substitute in "stall" mode: the
    fewest that reach the fewest read rounds; 0 when substituting all of them would not remove a round."""
    best = _rounds(n_missing - n_substitutable, parallel)
    if best == _rounds(n_missing, parallel):
        return 0
    return max(0, n_missing - best * parallel)


def _plan_one_lists(routing: Routing, k: int, alpha, resident, stall_parallel: int = 0
                    ) -> tuple[list[int], list[bool]] | None:
    probs, choice, idx = routing.probs, routing.choice, routing.idx  # [1,E], [1,E], [1,k]
    e = probs.shape[1]
    if e <= k:
        return None
    a = float(alpha.reshape(-1)[0]) if isinstance(alpha, torch.Tensor) else float(alpha)
    p = probs[0].float().tolist()
    sel = idx[0].tolist()
    free = resident.tolist() if isinstance(resident, torch.Tensor) else resident
    same = choice is probs
    c = p if same else choice[0].float().tolist()
    s = p[sorted(range(e), key=c.__getitem__, reverse=True)[k]]  # S_{k+1}: score of the expert ranked k+1
    hi = (1 + a) * s
    misses = sorted((p[x], j) for j, x in enumerate(sel) if not p[x] > hi and not free[x])  # lowest score first
    if not misses:
        return None  # (a batch of one: the top-score union is this token's own top-score experts, never missing)
    chosen = set(sel)
    lo = (1 - a) * s
    cands = sorted(((p[x], x) for x in range(e) if free[x] and x not in chosen and lo < p[x] <= s
                    and (same or (math.isfinite(c[x]) and not (c[x] == 0 and p[x] != 0)))),  # as _eligible
                   key=lambda t: -t[0])  # highest score first (stable: lower id first on ties)
    if not cands:
        return None
    if stall_parallel:  # "stall" mode: only substitutions that remove a round of reads
        n_missing = sum(not free[x] for x in sel)  # top-score misses are read regardless
        n = _stall_keep(n_missing, min(len(misses), len(cands)), stall_parallel)
        if n == 0:
            return None
        misses = misses[:n]
    new = list(sel)
    subbed = [False] * k
    for (_, j), (_, x) in zip(misses, cands):
        new[j] = x
        subbed[j] = True
    return new, subbed


def plan_batch(routing: Routing, k: int, alpha, resident: torch.Tensor, sync: bool = True):
    """`plan` for N tokens as tensor operations. sync=False (inside a CUDA graph): no early exits that read device
    values; the plan may substitute nothing (new_idx == idx, substituted all False). `alpha` may then be an [N, 1]
    device tensor."""
    probs, choice, idx = routing.probs, routing.choice, routing.idx  # [N,E], [N,E], [N,k]
    n, e = probs.shape
    if e <= k:
        return None  # no (k+1)-th expert: nothing to substitute with
    a = alpha if isinstance(alpha, torch.Tensor) and alpha.dim() == 2 else _alpha_column(alpha, n, probs.device)
    kth = torch.topk(choice, k + 1, dim=-1).indices[:, k:]  # [N,1] the expert ranked k+1
    s = probs.gather(1, kth).float()  # [N,1] S_{k+1}
    sel_p = probs.gather(1, idx).float()  # [N,k]
    top = sel_p > (1 + a) * s  # [N,k] top-score experts
    union = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, idx, top).any(0)  # [E] top-score set of the batch
    free = resident | union  # [E] computing these costs no load
    miss = ~(top | free[idx])  # [N,k] low-score experts that would be loaded
    if sync and not bool(miss.any()):
        return None
    selected = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, idx, True)  # [N,E]
    p = probs.float()
    cand = (~selected & free[None, :] & _eligible(probs, choice)
            & (p > (1 - a) * s) & (p <= s))  # [N,E]
    if sync and not bool(cand.any()):
        return None
    c_score, c_idx = torch.sort(torch.where(cand, p, float("-inf")), dim=-1, descending=True)  # [N,E]
    m_order = torch.argsort(torch.where(miss, sel_p, float("inf")), dim=-1, stable=True)  # [N,k] misses, lowest first
    j = torch.arange(k, device=probs.device)[None, :]  # [1,k]
    usable = (j < miss.sum(-1, keepdim=True)) & torch.isfinite(c_score[:, :k])  # [N,k] j-th miss gets j-th candidate
    if sync and not bool(usable.any()):
        return None
    new_at = torch.where(usable, c_idx[:, :k], idx.gather(1, m_order))  # [N,k] in miss order
    new_idx = idx.clone().scatter_(1, m_order, new_at)  # [N,k]
    substituted = torch.zeros_like(miss).scatter_(1, m_order, usable)  # [N,k]
    return new_idx, substituted


def cache_router(ctx, layer: int, block, routing: Routing, alpha) -> Routing:
    """The engine's routing hook: SMoE Algorithm 1 for one MoE layer (see the module docstring)."""
    scale = ctx.alpha_scale
    if scale:  # calibrated per-layer profile: layers whose substitutions cost more accuracy get a smaller alpha
        alpha = layer_alpha(alpha, scale.get(layer, 1.0))
    if not alpha_positive(alpha):
        return routing
    k = routing.idx.shape[1]
    n, e = routing.probs.shape
    parallel = max(1, ctx.io_parallel) if ctx.substitution_mode == "stall" else 0
    if n == 1:  # decode at batch 1: lists all the way (see plan)
        out = _plan_one(routing, k, alpha, _resident_list(ctx, layer, e), parallel)
        if out is None:
            return routing
        new_idx, substituted = out
    else:
        resident = resident_mask(ctx, layer, e, routing.probs.device)
        out = plan(routing, k, alpha, resident)
        if out is None:
            return routing
        new_idx, substituted = out
        if parallel:  # a batch shares its reads: keep the plan only if it removes a round of them
            before = int((~resident[routing.idx.unique()]).sum())
            after = int((~resident[new_idx.unique()]).sum())
            if _rounds(after, parallel) == _rounds(before, parallel):
                return routing
    weights = ctx.adapter.weigh(block, routing.probs, new_idx)  # [N,k] substitutes weighted by their own scores
    return Routing(routing.probs, routing.choice, new_idx, weights.to(routing.weights.dtype), substituted)
