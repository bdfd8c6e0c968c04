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
    `EngineConfig.substitution_profile` takes; `moelite calibrate --out FILE` writes it as JSON and prints a table
    and one JSON line. Cost: (number of MoE layers + 1) teacher-forced passes over `max_tokens` tokens.
  - The engine's own profile and alpha are restored afterwards; outputs at alpha 0 are never affected.
Calibrate on text that is not used to report quality (the default is WikiText-2 *valid*; quality is reported on test).
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from moelite.eval.evaluate import Reference, compare_text, default_data_dir

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
    saved = dict(m.alpha_scale)
    ref = Reference(engine)
    rows = []
    try:
        m.alpha_scale = {}
        compare_text(engine, ids, 0.0, ref, window, stride, max_tokens)  # fills the reference (one exact pass)
        for layer in layers:
            m.alpha_scale = {x: (1.0 if x == layer else 0.0) for x in layers}
            before = m.layer_stats[layer].substitutions if layer in m.layer_stats else 0
            r = compare_text(engine, ids, probe_alpha, ref, window, stride, max_tokens)
            subs = (m.layer_stats[layer].substitutions if layer in m.layer_stats else 0) - before
            per_tok = subs / max(r["tokens"], 1)
            cost = r["mean_kl"] / per_tok if subs else None
            rows.append({"layer": layer, "substitutions_per_token": round(per_tok, 4), "mean_kl": r["mean_kl"],
                         "top1_agreement": r["top1_agreement"], "perplexity_ratio": r["perplexity_ratio"],
                         "kl_per_substitution": cost})
            if progress:
                progress(rows[-1])
    finally:
        m.alpha_scale = saved
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


def cmd_calibrate(args) -> int:
    from moelite.eval.evaluate import _load, _read_ids

    if args.text:
        path = Path(args.text)
    else:
        data = Path(args.data_dir) if args.data_dir else default_data_dir()
        path = data / "wikitext-2" / "valid.txt" if data else None
        if path is None or not path.is_file():
            raise ValueError("text: give --text FILE (no --data-dir with wikitext-2/valid.txt was found)")
    engine = _load(args, substitution_profile=None)
    try:
        ids = _read_ids(engine, path, args.max_tokens, args.window)
        res = calibrate(engine, ids, args.probe_alpha, args.gamma, args.max_tokens, args.window, args.stride,
                        progress=lambda row: print(f"layer {row['layer']}: {row['substitutions_per_token']:.3f} "
                                                   f"substitutions/token, KL {row['mean_kl']:.5f}",
                                                   file=sys.stderr))
    finally:
        engine.close()
    res["model"] = Path(args.model).name if args.model else "demo_model"
    res["text"] = path.name if path.parent.name in ("", ".") else f"{path.parent.name}/{path.name}"
    print(table(res))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
        print(f"wrote {args.out}: use it with --substitution-profile {args.out}", file=sys.stderr)
    print(json.dumps(res))
    return 0


def register_cli(sub) -> None:
    from moelite.cli import add_engine_flags

    p = sub.add_parser("calibrate", help="measure each MoE layer's accuracy cost of substitution and write a "
                                         "per-layer alpha profile (--substitution-profile)")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the demo model)")
    p.add_argument("--text", default=None, help="calibration text (default: DATA_DIR/wikitext-2/valid.txt)")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--probe-alpha", type=float, default=0.25, help="alpha each layer is probed at alone")
    p.add_argument("--gamma", type=float, default=2.0, help="how strongly multipliers follow the cost ratios")
    p.add_argument("--max-tokens", type=int, default=512, help="scored tokens per pass")
    p.add_argument("--window", type=int, default=256)
    p.add_argument("--stride", type=int, default=128)
    p.add_argument("--out", default=None, help="write the profile JSON here")
    add_engine_flags(p)
    p.set_defaults(func=cmd_calibrate)
