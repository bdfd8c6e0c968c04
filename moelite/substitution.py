"""SMoE's expert-cache router (Algorithm 1): substitute low-importance cache misses by resident near-cut-off experts.

Contract: `cache_router(manager, layer, block, routing, alpha) -> Routing` is installed as `ExpertManager.substitute`
and called by `OffloadedMoEBlock` once per MoE layer per forward pass in decode (and in prefill only if
`substitute_in_prefill`), only when alpha > 0. `alpha` is a float or a per-token tensor [N] in [0, 1).

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
alpha = 0 returns the routing object unchanged (the candidate window ((1-0)S, S] is empty), so outputs are bit for
bit the exact model's.

Accounting: `manager.substitutions` += substituted (token, expert) evaluations. A substitute the batch did not select
is resident, so `ExpertManager.run` would count it as a cache hit; those lookups are taken back out of the hit counters
here so `expert_hits` keeps counting exact hits only (SMoE's code counted substitutions as hits). For a batch of one
token (decode): expert_hits + expert_misses + expert_substitutions = evaluations the exact model asked for.
"""

from __future__ import annotations

import torch

from .arch.base import Routing
from .moe_layer import LayerStats


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


def resident_mask(manager, layer: int, n_experts: int, device) -> torch.Tensor:
    """[E] bool: which experts of `layer` sit in the cache now."""
    res = manager.cache.resident
    return torch.tensor([res((layer, e)) for e in range(n_experts)], dtype=torch.bool, device=device)


def plan(routing: Routing, k: int, alpha, resident: torch.Tensor):
    """The pure part of Algorithm 1 (no side effects): returns (new_idx [N,k], substituted [N,k] bool) or None when
    nothing is substituted. `resident` [E] bool."""
    probs, choice, idx = routing.probs, routing.choice, routing.idx  # [N,E], [N,E], [N,k]
    n, e = probs.shape
    if e <= k:
        return None  # no (k+1)-th expert: nothing to substitute with
    a = _alpha_column(alpha, n, probs.device)  # [N,1]
    kth = torch.topk(choice, k + 1, dim=-1).indices[:, k:]  # [N,1] the expert ranked k+1
    s = probs.gather(1, kth).float()  # [N,1] S_{k+1}
    sel_p = probs.gather(1, idx).float()  # [N,k]
    top = sel_p > (1 + a) * s  # [N,k] top-score experts
    union = torch.zeros(e, dtype=torch.bool, device=probs.device)
    union[idx[top]] = True  # [E] top-score set of the batch
    free = resident | union  # [E] computing these costs no load
    miss = ~(top | free[idx])  # [N,k] low-score experts that would be loaded
    if not bool(miss.any()):
        return None
    selected = torch.zeros_like(probs, dtype=torch.bool).scatter_(1, idx, True)  # [N,E]
    p = probs.float()
    cand = (~selected & free[None, :] & _eligible(probs, choice)
            & (p > (1 - a) * s) & (p <= s))  # [N,E]
    if not bool(cand.any()):
        return None
    c_score, c_idx = torch.sort(torch.where(cand, p, float("-inf")), dim=-1, descending=True)  # [N,E]
    m_order = torch.argsort(torch.where(miss, sel_p, float("inf")), dim=-1, stable=True)  # [N,k] misses, lowest first
    j = torch.arange(k, device=probs.device)[None, :]  # [1,k]
    usable = (j < miss.sum(-1, keepdim=True)) & torch.isfinite(c_score[:, :k])  # [N,k] j-th miss gets j-th candidate
    if not bool(usable.any()):
        return None
    new_at = torch.where(usable, c_idx[:, :k], idx.gather(1, m_order))  # [N,k] in miss order
    new_idx = idx.clone().scatter_(1, m_order, new_at)  # [N,k]
    substituted = torch.zeros_like(miss).scatter_(1, m_order, usable)  # [N,k]
    return new_idx, substituted


def cache_router(manager, layer: int, block, routing: Routing, alpha) -> Routing:
    """The `ExpertManager.substitute` hook: SMoE Algorithm 1 for one MoE layer (see the module docstring)."""
    if not _positive(alpha):
        return routing
    k = routing.idx.shape[1]
    resident = resident_mask(manager, layer, routing.probs.shape[1], routing.probs.device)
    out = plan(routing, k, alpha, resident)
    if out is None:
        return routing
    new_idx, substituted = out
    n_sub = int(substituted.sum())
    manager.substitutions += n_sub
    # substitutes the batch did not already select are resident: run() will count their lookups as hits; take them
    # back so expert_hits stays exact hits (a substitute another token selected is counted once, as before)
    before = set(routing.idx.reshape(-1).tolist())
    extra = set(new_idx[substituted].tolist()) - before - set(new_idx[~substituted].tolist())
    if extra:
        manager.cache.hits -= len(extra)
        manager.layer_stats.setdefault(layer, LayerStats()).hits -= len(extra)
    adapter = _adapter_of(manager, block)
    weights = adapter.weigh(block, routing.probs, new_idx)  # [N,k] substitutes weighted by their own scores
    return Routing(routing.probs, routing.choice, new_idx, weights.to(routing.weights.dtype))


def _positive(alpha) -> bool:
    return bool((alpha > 0).any()) if isinstance(alpha, torch.Tensor) else alpha > 0


_ADAPTERS: dict[type, object] = {}


def _adapter_of(manager, block):
    """The architecture adapter of `block` (the hook's signature carries none): `manager.adapter` if set, else the
    adapter of the transformers model type the block's class comes from (transformers.models.<type>.modeling_<type>)."""
    adapter = getattr(manager, "adapter", None)
    if adapter is not None:
        return adapter
    cls = type(block)
    if cls not in _ADAPTERS:
        from .arch import adapter_for

        parts = cls.__module__.split(".")
        if len(parts) < 3 or parts[-3] != "models":
            raise RuntimeError(f"cache_router: cannot tell the architecture of {cls.__module__}.{cls.__name__}; "
                               "set manager.adapter")
        _ADAPTERS[cls] = adapter_for(parts[-2])
    return _ADAPTERS[cls]
