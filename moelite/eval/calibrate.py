"""Per-layer substitution profile: what one substitution costs in accuracy, layer by layer (beyond SMoE).

SMoE uses one alpha for every layer. On the trained demo model one substitution in the first MoE layer costs about
four times the KL divergence of one in the last (measured: benchmarks/results/smoe/README.md), so a single alpha
spends accuracy where it buys least. This module measures each layer's cost and turns it into multipliers of alpha.

Contract:
  - `calibrate(engine, ids, probe_alpha, gamma, ...)` teacher-forces `ids` through the engine's decode path (its own
    budget and cache policy: residency decides what can be substituted), first exactly (the reference), then once
    per MoE layer L with substitution switched on in L alone at `probe_alpha`. Per layer it records substitutions
    in L per scored token, mean KL(exact || substituted) and top-1 agreement; the cost of one substitution in L is
    c_L = KL_L / substitutions_L. Multipliers: m_L = (g / c_L) ** gamma, g the geometric mean of the measured
    costs, the ratio g / c_L clipped to [1/8, 8], then scaled so that the mean multiplier is 1 (a given alpha keeps
    roughly its average window). A layer where nothing could be substituted keeps m = 1.
  - Returns a dict whose "profile" list (one multiplier per MoE layer, in layer order) is what
    `EngineConfig.substitution_profile` takes; `moelite calibrate --out FILE` (moelite/cli/calibrate.py) writes it
    as JSON and prints `table(result)` and one JSON line. Cost: (number of MoE layers + 1) teacher-forced passes
    over `max_tokens` scored tokens (the CLI's --score-tokens).
  - Each pass sets its profile for its own calls only (`engine.request(alpha_scale=...)`): the engine's own profile
    and alpha hold again after each, exceptions included; outputs at alpha 0 are never affected.
Calibrate on text that is not used to report quality (the default is WikiText-2 *valid*; quality is reported on test).
"""

from __future__ import annotations

import math

from moelite.eval.evaluate import Reference, compare_text

MAX_RATIO = 8.0


def _check_gamma(gamma) -> None:
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma) or gamma < 0:
        raise ValueError(f"gamma: {gamma!r} must be a finite number >= 0")


def profile_from_costs(costs: list[float | None], gamma: float) -> list[float]:
    """Multipliers from per-layer costs per substitution (None: not measured -> 1); see the module contract."""
    _check_gamma(gamma)
    known = [c for c in costs if c is not None]
    if not known:
        return [1.0] * len(costs)
    floor = max(known) * 1e-6 + 1e-12  # a layer whose substitutions changed nothing measurable
    g = math.exp(sum(math.log(max(c, floor)) for c in known) / len(known))
    raw = [None if c is None else min(MAX_RATIO, max(1 / MAX_RATIO, g / max(c, floor))) ** gamma for c in costs]
    mean = sum(r for r in raw if r is not None) / len(known)
    return [1.0 if r is None else round(r / mean, 4) for r in raw]


def calibrate(engine, ids: list[int], probe_alpha: float = 0.25, gamma: float = 2.0, max_tokens: int = 512,
              window: int = 256, stride: int = 128, progress=None) -> dict:
    if not 0 < probe_alpha < 1:
        raise ValueError(f"probe_alpha: {probe_alpha!r} must be in (0, 1)")
    _check_gamma(gamma)  # before any pass: a bad value must not cost hours of calibration first
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ValueError(f"max_tokens: {max_tokens!r} must be an int >= 1")
    if len(ids) < 2:
        raise ValueError("calibration text: fewer than 2 tokens")
    m = engine.manager
    layers = list(engine.layout.layers)
    ref = Reference(engine)
    rows = []
    with engine.request(alpha_scale={}):  # the reference pass: the same alpha (0) in every layer
        compare_text(engine, ids, 0.0, ref, window, stride, max_tokens)  # fills the reference (one exact pass)
    for layer in layers:
        stats = m.counters.layer(layer)
        before = stats.substitutions
        with engine.request(alpha_scale={x: (1.0 if x == layer else 0.0) for x in layers}):  # layer L alone
            r = compare_text(engine, ids, probe_alpha, ref, window, stride, max_tokens)
        subs = stats.substitutions - before
        per_tok = subs / max(r["tokens"], 1)
        cost = r["mean_kl"] / per_tok if subs else None
        rows.append({"layer": layer, "substitutions_per_token": round(per_tok, 4), "mean_kl": r["mean_kl"],
                     "top1_agreement": r["top1_agreement"], "perplexity_ratio": r["perplexity_ratio"],
                     "kl_per_substitution": cost})
        if progress:
            progress(rows[-1])
    if all(row["kl_per_substitution"] is None for row in rows):
        raise ValueError(f"calibration: no layer substituted anything at probe_alpha {probe_alpha:g} with expert "
                         f"budget {engine.config.expert_budget!r} (every needed expert was resident, or no candidate "
                         "was close enough); calibrate at the budget you will run, or raise --probe-alpha")
    profile = profile_from_costs([r["kl_per_substitution"] for r in rows], gamma)
    return {"profile": profile, "layers": layers, "num_experts": engine.num_experts, "probe_alpha": probe_alpha,
            "gamma": gamma,
            "tokens": r["tokens"] if rows else 0, "expert_budget": str(engine.config.expert_budget),
            "cache_policy": engine.config.cache_policy, "per_layer": rows}


def table(result: dict) -> str:
    lines = ["| layer | substitutions / token | mean KL | KL per substitution | top-1 | multiplier |",
             "|---:|---:|---:|---:|---:|---:|"]
    for row, mult in zip(result["per_layer"], result["profile"]):
        c = row["kl_per_substitution"]
        lines.append(f"| {row['layer']} | {row['substitutions_per_token']:.3f} | {row['mean_kl']:.5f} | "
                     f"{'-' if c is None else f'{c:.5f}'} | {row['top1_agreement']:.1%} | {mult:.3f} |")
    return "\n".join(lines)

