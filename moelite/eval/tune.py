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
  - `moelite tune` (moelite/cli/tune.py) prints a table of the measurements and ends with that dict as one JSON
    line; exit status 1 when the target is not met, 2 on bad input. `progress` (optional) is called with 1 after
    each measured round (interleaved) or run (one alpha).
Targets are given either as time per output token (`--target-tpot-ms`) or as decode speed (`--target-tok-s`).
"""

from __future__ import annotations

import gc
import statistics
from pathlib import Path

import numpy as np

from moelite.config import DEFAULT_ALPHAS, parse_alphas
from moelite.engine import Engine
from moelite.eval.evaluate import Reference, compare_text, measure_decode, measure_interleaved
from moelite.eval.prompts import load_prompts


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
         quality_tokens: int = 384, log=None, interleave: bool = True, progress=None) -> dict:
    target = _target_ms(target_tpot_ms, target_tok_s)
    alphas = alphas or parse_alphas(DEFAULT_ALPHAS)
    if repeats < 1 or n_prompts < 2 or max_tokens < 2:
        raise ValueError("repeats >= 1, prompts >= 2 and max_tokens >= 2 are required")
    points = []
    keys = ("alpha", "tpot_ms", "decode_tok_s", "cpu_ms_per_token", "decode_exact_hit_rate", "decode_substituted_rate")
    if interleave:  # all grid engines alive, alternated prompt by prompt: the same background load for every alpha
        engines = {a: (Engine(path, config.replace(substitution_alpha=a), progress=False), a) for a in alphas}
        prompts = calibration_prompts(next(iter(engines.values()))[0], prompts_path, n_prompts + 1)
        res = measure_interleaved(engines, prompts, max_tokens, n_prompts * repeats, progress=progress)
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
            if progress is not None:
                progress(1)
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

