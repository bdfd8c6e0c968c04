"""Choose the substitution threshold alpha for a decode-latency target (SMoE Eq. 5), and report what it costs.

Contract:
  - `tune(path, config, target_tpot_ms=None | target_tok_s=None, alphas=..., prompts=..., ...)` measures the time per
    output token T(alpha) of greedy decoding on a calibration prompt set at each grid alpha (same budget and
    policies; by default one engine per alpha, all alive and alternated prompt by prompt so that every alpha sees
    the same background load; median per-prompt TPOT), fits a polynomial of degree <= `degree` to
    T(alpha) (SMoE: close to linear, decreasing), and picks the smallest alpha in [min grid, max grid] (step 0.005)
    whose fitted T meets the target. It then measures the quality cost of that alpha against the exact model (100%
    budget, alpha 0) on a quality text through the decode path: top-1 agreement, mean KL(exact || tuned), perplexity
    ratio. Returns a dict; `met` is False when no alpha in the grid reaches the target (the fastest measured alpha
    is then reported as `alpha`).
  - `moelite tune` prints a table of the measurements and ends with that dict as one JSON line; exit status 1 when
    the target is not met, 2 on bad input.
Targets are given either as time per output token (`--target-tpot-ms`) or as decode speed (`--target-tok-s`).
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
from pathlib import Path

import numpy as np

from moelite.eval.evaluate import (Reference, compare_text, default_data_dir, measure_decode, measure_interleaved,
                       parse_alphas)

DEFAULT_ALPHAS = "0,0.1,0.2,0.3,0.4,0.5"


def _target_ms(target_tpot_ms: float | None, target_tok_s: float | None) -> float:
    if (target_tpot_ms is None) == (target_tok_s is None):
        raise ValueError("target: give exactly one of target_tpot_ms (time per output token) or target_tok_s")
    if target_tpot_ms is not None:
        if not target_tpot_ms > 0:
            raise ValueError(f"target_tpot_ms: {target_tpot_ms!r} must be > 0")
        return float(target_tpot_ms)
    if not target_tok_s > 0:
        raise ValueError(f"target_tok_s: {target_tok_s!r} must be > 0")
    return 1000.0 / float(target_tok_s)


def fit_and_pick(alphas: list[float], tpot_ms: list[float], target_ms: float, degree: int = 1) -> dict:
    """Fit T(alpha) and return the smallest alpha on a 0.005 grid whose fitted T <= target (see the contract)."""
    if len(alphas) != len(tpot_ms) or not alphas:
        raise ValueError("alphas and tpot_ms must be equally long and non-empty")
    deg = max(0, min(degree, len(set(alphas)) - 1))
    coef = np.polyfit(alphas, tpot_ms, deg) if deg > 0 else np.array([float(np.mean(tpot_ms))])
    fitted = np.polyval(coef, alphas)
    ss_res = float(((np.array(tpot_ms) - fitted) ** 2).sum())
    ss_tot = float(((np.array(tpot_ms) - np.mean(tpot_ms)) ** 2).sum())
    lo, hi = min(alphas), max(alphas)
    grid = np.round(np.arange(lo, hi + 1e-9, 0.005), 4)
    pred = np.polyval(coef, grid)
    ok = np.nonzero(pred <= target_ms)[0]
    out = {"fit_degree": deg, "fit_coefficients": [float(c) for c in coef],
           "fit_r2": 1 - ss_res / ss_tot if ss_tot > 0 else 1.0}
    if len(ok):
        a = float(grid[ok[0]])
        out.update(met=True, alpha=a, predicted_tpot_ms=float(pred[ok[0]]))
    else:
        best = int(np.argmin(tpot_ms))
        out.update(met=False, alpha=float(alphas[best]), predicted_tpot_ms=float(np.polyval(coef, alphas[best])))
    return out


def calibration_prompts(engine, prompts_path: str | None = None, n: int = 6) -> list[list[int]]:
    """Token ids of `n` calibration prompts (the built-in three-domain set, or a prompts file), domains interleaved."""
    from moelite.eval.prompts import load_prompts

    items = load_prompts(prompts_path)
    by_domain: dict[str, list[str]] = {}
    for domain, text in items:
        by_domain.setdefault(domain, []).append(text)
    mixed = [t for group in zip(*by_domain.values()) for t in group] or [t for _, t in items]
    chosen = (mixed * (n // max(1, len(mixed)) + 1))[:n]
    return [engine.encode(t) for t in chosen]


def tune(path, config, target_tpot_ms: float | None = None, target_tok_s: float | None = None,
         alphas: list[float] | None = None, prompts_path: str | None = None, n_prompts: int = 6,
         max_tokens: int = 32, repeats: int = 1, degree: int = 1, quality_text: str | Path | None = None,
         quality_tokens: int = 384, log=None, interleave: bool = True) -> dict:
    from moelite.engine import Engine

    target = _target_ms(target_tpot_ms, target_tok_s)
    alphas = alphas or parse_alphas(DEFAULT_ALPHAS)
    if repeats < 1 or n_prompts < 2 or max_tokens < 2:
        raise ValueError("repeats >= 1, prompts >= 2 and max_tokens >= 2 are required")
    points = []
    keys = ("alpha", "tpot_ms", "decode_tok_s", "cpu_ms_per_token", "decode_exact_hit_rate", "decode_substituted_rate")
    if interleave:  # all grid engines alive, alternated prompt by prompt: the same background load for every alpha
        engines = {a: (Engine(path, config.replace(substitution_alpha=a), progress=False), a) for a in alphas}
        prompts = calibration_prompts(next(iter(engines.values()))[0], prompts_path, n_prompts + 1)
        res = measure_interleaved(engines, prompts, max_tokens, n_prompts * repeats)
        for a in alphas:
            points.append({k: res[a][k] for k in keys})
            engines[a][0].close()
        del engines
        gc.collect()
    for a in alphas if not interleave else ():
        runs = []
        for _ in range(repeats):
            eng = Engine(path, config.replace(substitution_alpha=a), progress=False)
            prompts = calibration_prompts(eng, prompts_path, n_prompts + 1)  # +1: the warm-up prompt
            runs.append(measure_decode(eng, prompts, max_tokens, a))
            eng.close()
            del eng
            gc.collect()  # free the slot pool before the next engine (an engine is a web of cycles)
        tp = statistics.median(r["tpot_ms"] for r in runs)
        mid = min(runs, key=lambda r: abs(r["tpot_ms"] - tp))
        points.append({**{k: mid[k] for k in keys}, "tpot_ms": tp, "decode_tok_s": 1000 / tp if tp else 0.0})
    for point in points if log else ():
        log(point)
    pick = fit_and_pick([p["alpha"] for p in points], [p["tpot_ms"] for p in points], target, degree)
    result = {"model": Path(path).name if path else "demo", "expert_budget": config.expert_budget,
              "cache_policy": config.cache_policy, "miss_policy": getattr(config, "miss_policy", None),
              "prefetch": config.prefetch, "substitution_mode": config.substitution_mode,
              "substitution_profile": list(config.substitution_profile) if config.substitution_profile else None,
              "target_tpot_ms": target, "target_tok_s": 1000 / target,
              "calibration_prompts": n_prompts, "tokens_per_prompt": max_tokens, "measured": points, **pick}
    if quality_text is not None:
        tuned = Engine(path, config.replace(substitution_alpha=pick["alpha"]), progress=False)
        exact = Engine(path, config.replace(expert_budget="100%", substitution_alpha=0.0), progress=False)
        text = Path(quality_text).read_text(encoding="utf-8", errors="replace")
        ids = tuned.tokenizer.encode(text[-max(20_000, quality_tokens * 16):], add_special_tokens=False,
                                     verbose=False)  # the tail of the file, scored in windows
        q = compare_text(tuned, ids, pick["alpha"], Reference(exact), window=256, stride=128, max_tokens=quality_tokens)
        result["quality"] = {"text": Path(quality_text).name, **{k: q[k] for k in (
            "tokens", "top1_agreement", "mean_kl", "perplexity", "perplexity_exact", "perplexity_ratio",
            "decode_exact_hit_rate", "decode_substituted_rate")}}
    return result


def cmd_tune(args) -> int:
    from moelite.cli import engine_config

    cfg = engine_config(args)
    quality = args.quality_text
    if quality is None and args.data_dir and (Path(args.data_dir) / "wikitext-2" / "valid.txt").is_file():
        quality = Path(args.data_dir) / "wikitext-2" / "valid.txt"
    if quality is not None and not Path(quality).is_file():
        raise ValueError(f"quality_text: {quality} does not exist")
    log = None if args.json else (lambda p: print(f"alpha {p['alpha']:<6g} TPOT {p['tpot_ms']:8.2f} ms  "
                                                  f"{p['decode_tok_s']:7.2f} tok/s  exact hit "
                                                  f"{p['decode_exact_hit_rate']:.1%}  substituted "
                                                  f"{p['decode_substituted_rate']:.1%}", file=sys.stderr))
    res = tune(args.model, cfg, args.target_tpot_ms, args.target_tok_s, parse_alphas(args.alphas), args.prompts,
               args.calibration_prompts, args.tokens, args.repeats, args.degree, quality, args.quality_tokens, log,
               args.interleave)
    if not args.json:
        verdict = "meets" if res["met"] else "cannot meet (fastest measured shown)"
        line = f"alpha = {res['alpha']:g} {verdict} the target {res['target_tpot_ms']:.2f} ms/token " \
               f"(fit: {res['predicted_tpot_ms']:.2f} ms, R^2 {res['fit_r2']:.2f})"
        if "quality" in res:
            q = res["quality"]
            line += f"; quality vs exact: top-1 {q['top1_agreement']:.2%}, KL {q['mean_kl']:.4f}, " \
                    f"perplexity x{q['perplexity_ratio']:.4f}"
        print(line, file=sys.stderr)
    print(json.dumps(res))
    return 0 if res["met"] else 1


def register_cli(sub) -> None:
    from moelite.cli import add_engine_flags

    data = default_data_dir()
    p = sub.add_parser("tune", help="pick the smallest substitution alpha that meets a decode-latency target")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded demo model)")
    t = p.add_mutually_exclusive_group(required=True)
    t.add_argument("--target-tpot-ms", type=float, default=None, help="time per output token to meet (ms)")
    t.add_argument("--target-tok-s", type=float, default=None, help="decode speed to meet (tokens/s)")
    p.add_argument("--alphas", default=DEFAULT_ALPHAS, help="grid of alphas to measure (default: %(default)s)")
    p.add_argument("--prompts", default=None, help="calibration prompts file (default: the built-in set)")
    p.add_argument("--calibration-prompts", type=int, default=6, help="prompts measured per alpha")
    p.add_argument("--tokens", type=int, default=32, help="tokens generated per prompt")
    p.add_argument("--repeats", type=int, default=1, help="passes over the calibration prompts per alpha")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=True,
                   help="keep one engine per grid alpha alive and alternate them prompt by prompt (fair on a busy "
                        "machine); off: a fresh engine per alpha and repeat, median (for slot pools too big to "
                        "hold several)")
    p.add_argument("--degree", type=int, default=1, help="degree of the T(alpha) polynomial fit")
    p.add_argument("--quality-text", default=None, help="text for the quality cost (default: WikiText-2 valid tail)")
    p.add_argument("--quality-tokens", type=int, default=384, help="scored tokens for the quality cost")
    p.add_argument("--data-dir", default=str(data) if data else None, help="shared data folder (default: %(default)s)")
    p.add_argument("--json", action="store_true", help="print only the JSON line")
    add_engine_flags(p)
    p.set_defaults(func=cmd_tune)
