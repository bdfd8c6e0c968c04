"""SMoE ablation in the paper's order, plus the best policy without substitution, at one expert budget.

Steps, each added to the previous one (SMoE §1.9): LRU baseline -> +score eviction -> +cache router (alpha) ->
+prefetch -> +hybrid miss handling (load vs compute-from-buffer split). A step whose switch does not exist in this
build of moelite gets a "not available" row. Separately, every cache policy x {plain, +prefetch, +prefetch+hybrid}
is measured with alpha = 0, and the full stack's decode speed is compared with the best of those.

Two ways to measure (the machine may be shared, so background load varies over time):
  --interleave (default without --replay): every engine is loaded and warmed once and kept alive; each of --rounds
      rounds runs one calibration prompt (the built-in three-domain set, rotating) on every configuration, in an
      order rotated per round. TPOT is the median over a configuration's prompts; CPU ms/token (process CPU time,
      all threads) is pooled. This is the fair comparison on a busy machine.
  --no-interleave (default with --replay): a fresh engine per configuration and round, one warm-up prompt, then
      --prompts prompts; median TPOT over rounds. Needed when one engine's slot pool is large (real-shape).
Writes ablation.md and ablation.json under --out and prints one JSON line.

  nice -n 10 python benchmarks/ablation.py --model moelite/demo_model --expert-budget 25% --alpha 0.25
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from moelite.eval.bench import hardware  # noqa: E402
from moelite.config import EngineConfig  # noqa: E402
from moelite.engine import Engine  # noqa: E402
from moelite.eval.evaluate import measure_decode, measure_interleaved  # noqa: E402
from moelite.eval.tune import calibration_prompts  # noqa: E402

FIELDS = {f.name for f in dataclasses.fields(EngineConfig)}
HAS_PREFETCH = "prefetch" in FIELDS
try:
    from moelite.config import MISS_POLICIES
except ImportError:
    MISS_POLICIES = ()
HAS_HYBRID = "miss_policy" in FIELDS and "hybrid" in MISS_POLICIES


def steps(alpha: float) -> list[tuple[str, dict | None]]:
    """(label, EngineConfig overrides or None when the switch is missing), cumulative."""
    cfg: dict = {"cache_policy": "lru", "substitution_alpha": 0.0}
    out = [("LRU baseline (exact)", dict(cfg))]
    cfg["cache_policy"] = "score"
    out.append(("+ score eviction", dict(cfg)))
    cfg["substitution_alpha"] = alpha
    out.append((f"+ cache router (alpha {alpha:g})", dict(cfg)))
    if HAS_PREFETCH:
        cfg["prefetch"] = True
        out.append(("+ prefetch", dict(cfg)))
    else:
        out.append(("+ prefetch", None))
    if HAS_HYBRID:
        cfg["miss_policy"] = "hybrid"
        out.append(("+ hybrid miss handling", dict(cfg)))
    else:
        out.append(("+ hybrid miss handling", None))
    return out


def exact_variants(policies=("lru", "lfu", "score", "fifo")) -> list[tuple[str, dict]]:
    out = []
    for pol in policies:
        out.append((f"{pol}", {"cache_policy": pol}))
        if HAS_PREFETCH:
            out.append((f"{pol} + prefetch", {"cache_policy": pol, "prefetch": True}))
        if HAS_PREFETCH and HAS_HYBRID:
            out.append((f"{pol} + prefetch + hybrid", {"cache_policy": pol, "prefetch": True, "miss_policy": "hybrid"}))
        if HAS_HYBRID:
            out.append((f"{pol} + hybrid", {"cache_policy": pol, "miss_policy": "hybrid"}))
    return [(label, {**over, "substitution_alpha": 0.0}) for label, over in out]


def _prompts(eng, n: int) -> list[list[int]]:
    """The built-in calibration prompts, or fixed token ids for a checkpoint without a tokenizer (real-shape)."""
    if eng.tokenizer is None:
        return [[3 + (7 * i + j) % 200 for j in range(16)] for i in range(n)]
    return calibration_prompts(eng, None, n)


def measure(model, base: EngineConfig, over: dict, n_prompts: int, tokens: int, replay: str | None = None) -> dict:
    eng = Engine(model, base.replace(**over), progress=False)
    try:
        if replay:  # real-shape checkpoint: decode routing follows a trained model's recorded trace
            from moelite.core.traces import Trace, TraceReplay

            eng.manager.set_replay(TraceReplay(Trace.load(replay), eng.layout.layers, decode_only=True))
        prompts = _prompts(eng, n_prompts + 1)
        r = measure_decode(eng, prompts, tokens, over.get("substitution_alpha", 0.0))
        s = eng.stats()
        r.update({k: s.get(k) for k in ("prefetch_precision", "prefetch_recall", "misses_loaded", "misses_direct")})
    finally:
        eng.close()
        del eng
        gc.collect()  # an engine is a web of cycles: free its slot pool now, not at the next full collection
    return r


def run(model, base: EngineConfig, configs: list[tuple[str, dict]], rounds: int, n_prompts: int, tokens: int,
        log, replay: str | None = None) -> dict[str, dict]:
    runs: dict[str, list[dict]] = {label: [] for label, _ in configs}
    for rnd in range(rounds):
        for label, over in configs:
            r = measure(model, base, over, n_prompts, tokens, replay)
            runs[label].append(r)
            log(f"round {rnd + 1}/{rounds} {label:<34} {r['tpot_ms']:8.2f} ms/token  exact hit "
                f"{r['decode_exact_hit_rate']:.1%}  substituted {r['decode_substituted_rate']:.1%}")
    out = {}
    for label, rs in runs.items():
        tp = statistics.median(r["tpot_ms"] for r in rs)
        mid = min(rs, key=lambda r: abs(r["tpot_ms"] - tp))
        out[label] = {**mid, "tpot_ms": tp, "decode_tok_s": 1000 / tp, "tpot_ms_all": [r["tpot_ms"] for r in rs]}
    return out


def run_interleaved(model, base: EngineConfig, configs: list[tuple[str, dict]], rounds: int, n_prompts: int,
                    tokens: int, log, replay: str | None = None) -> dict[str, dict]:
    """All engines alive at once, alternated prompt by prompt (`moelite.eval.evaluate.measure_interleaved`)."""
    engines, prompts = {}, None
    for label, over in configs:
        eng = Engine(model, base.replace(**over), progress=False)
        if replay:  # each engine replays the trace from its start
            from moelite.core.traces import Trace, TraceReplay

            eng.manager.set_replay(TraceReplay(Trace.load(replay), eng.layout.layers, decode_only=True))
        prompts = prompts or _prompts(eng, n_prompts + 1)
        engines[label] = (eng, over.get("substitution_alpha", 0.0))
    out = measure_interleaved(engines, prompts, tokens, rounds, log)
    for label, (eng, _) in engines.items():
        s = eng.stats()
        out[label].update({k: s.get(k) for k in ("prefetch_precision", "prefetch_recall", "misses_loaded",
                                                  "misses_direct")})
        eng.close()
    return out


def table(rows: list[dict]) -> str:
    head = ("| step | decode tok/s | TPOT ms | vs previous | CPU ms/token | exact hit (decode) | substituted "
            "| hit+sub | "
            "prefetch precision | misses loaded / direct |")
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    prev = None
    for r in rows:
        if r.get("not_available"):
            lines.append(f"| {r['step']} | not available in this build | | | | | | | | |")
            continue
        vs = f"{(r['tpot_ms'] / prev - 1) * 100:+.0f}% TPOT" if prev else "-"
        prev = r["tpot_ms"]
        cpu = f"{r['cpu_ms_per_token']:.2f}" if r.get("cpu_ms_per_token") else "-"
        lines.append(f"| {r['step']} | {r['decode_tok_s']:.2f} | {r['tpot_ms']:.2f} | {vs} | {cpu} | "
                     f"{r['decode_exact_hit_rate']:.1%} | {r['decode_substituted_rate']:.1%} | "
                     f"{r['decode_hit_or_substituted_rate']:.1%} | {r.get('prefetch_precision') or 0:.0%} | "
                     f"{r.get('misses_loaded')} / {r.get('misses_direct')} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default=str(ROOT / "moelite" / "demo_model"))
    p.add_argument("--expert-budget", default="25%")
    p.add_argument("--alpha", type=float, default=0.25)
    p.add_argument("--prompts", type=int, default=6)
    p.add_argument("--tokens", type=int, default=48)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--num-threads", type=int, default=1)
    p.add_argument("--exact-policies", default="lru,lfu,score,fifo", help="cache policies of the alpha-0 baselines")
    p.add_argument("--smoe-policies", default="lru,lfu,fifo",
                   help="cache policies also measured with the router on (besides the ablation steps)")
    p.add_argument("--replay", default=None, help="routing trace (.npz) to replay, for real-shape checkpoints")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=None,
                   help="keep every engine alive and alternate them prompt by prompt (--rounds = prompts per config); "
                        "off: a fresh engine per configuration and round (the default with --replay, where every "
                        "engine's slot pool may not fit in RAM at once)")
    p.add_argument("--ceiling", action=argparse.BooleanOptionalAction, default=True,
                   help="also measure every expert resident (100%% budget, warm): the bound on any miss handling")
    p.add_argument("--device", default="cpu", help="cpu or cuda (slots in GPU memory, misses read through host RAM)")
    p.add_argument("--io-threads", type=int, default=2)
    p.add_argument("--drop-page-cache", action=argparse.BooleanOptionalAction, default=True,
                   help="drop file pages after each read (off: the OS page cache serves as a host-RAM tier, "
                        "the GPU setting where experts are staged from RAM)")
    p.add_argument("--substitution-mode", default="always", choices=["always", "stall"],
                   help="which substitutable misses the router substitutes (see moelite.core.substitution)")
    p.add_argument("--substitution-profile", default=None,
                   help="per-layer alpha multipliers for every substitution row (a `moelite calibrate` JSON file)")
    p.add_argument("--uniform-alpha", type=float, default=None,
                   help="with --substitution-profile: also measure score eviction + router at this alpha with one "
                        "alpha for every layer (no profile)")
    p.add_argument("--tag", default=None, help="output name (default: ablation_<budget>)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "smoe"))
    args = p.parse_args(argv)
    base = EngineConfig(expert_budget=args.expert_budget, num_threads=args.num_threads, device=args.device,
                        io_threads=args.io_threads, drop_page_cache=args.drop_page_cache,
                        substitution_mode=args.substitution_mode,
                        substitution_profile=args.substitution_profile).validate()
    torch.set_num_threads(args.num_threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)  # noqa: E731
    t0 = time.time()
    abl = steps(args.alpha)
    configs = [(label, over) for label, over in abl if over is not None]
    full_label = configs[-1][0]
    configs += [(f"exact: {label}", over) for label, over in exact_variants(args.exact_policies.split(","))]
    smoe = [(f"substitution: {label} + router (alpha {args.alpha:g})", {**over, "substitution_alpha": args.alpha})
            for label, over in exact_variants(args.smoe_policies.split(",") if args.smoe_policies else ())
            if "hybrid" not in label or "prefetch" in label]
    configs += smoe
    if args.uniform_alpha is not None and not args.substitution_profile:
        raise SystemExit("--uniform-alpha compares against --substitution-profile; give both")
    if args.uniform_alpha is not None:
        uniform = f"substitution: score + router, one alpha {args.uniform_alpha:g} (no profile)"
        smoe.append((uniform, None))  # listed with the substitution rows; measured through `configs`
        configs.append((uniform, {"cache_policy": "score", "substitution_alpha": args.uniform_alpha,
                                  "substitution_profile": None}))
    if args.interleave is None:
        args.interleave = not args.replay
    ceiling = "ceiling: all experts resident (100% budget, warm)"
    if args.ceiling:
        configs.append((ceiling, {"expert_budget": "100%", "warm_start": True, "substitution_alpha": 0.0}))
    if args.interleave:
        res = run_interleaved(args.model, base, configs, args.rounds, args.prompts, args.tokens, log, args.replay)
    else:
        res = run(args.model, base, configs, args.rounds, args.prompts, args.tokens, log, args.replay)
    rows = [{"step": label, "not_available": True} if over is None else {"step": label, "config": over, **res[label]}
            for label, over in abl]
    exact = [{"config_label": label[7:], **r} for label, r in res.items() if label.startswith("exact: ")]
    # the ablation's own alpha-0 steps (LRU baseline, + score eviction) compete for "best exact" too
    exact_steps = [{**r, "config_label": "ablation " + r["step"]} for r in rows[:2]]
    best = min(exact + exact_steps, key=lambda r: r["tpot_ms"])
    subst = [{"config_label": label[14:], **res[label]} for label, _ in smoe]
    subst += [{**r, "config_label": "ablation " + r["step"]} for r in rows[2:] if not r.get("not_available")]
    best_sub = min(subst, key=lambda r: r["tpot_ms"])
    full = res[full_label]
    router_only = res[abl[2][0]]
    summary = {
        "model": Path(args.model).name, "expert_budget": args.expert_budget, "alpha": args.alpha,
        "device": args.device, "io_threads": args.io_threads, "drop_page_cache": args.drop_page_cache,
        "substitution_mode": args.substitution_mode,
        "substitution_profile": list(base.substitution_profile) if base.substitution_profile else None,
        "hardware": hardware(args.device), "torch_threads": args.num_threads, "prompts": args.prompts, "tokens": args.tokens,
        "rounds": args.rounds, "interleaved": bool(args.interleave),
        "replay": Path(args.replay).name if args.replay else None,
        "prefetch_available": HAS_PREFETCH, "hybrid_available": HAS_HYBRID,
        "best_exact": {"config": best["config_label"], "tpot_ms": best["tpot_ms"], "decode_tok_s": best["decode_tok_s"],
                       "decode_exact_hit_rate": best["decode_exact_hit_rate"]},
        "full_stack": {"step": full_label, "tpot_ms": full["tpot_ms"], "decode_tok_s": full["decode_tok_s"],
                       "decode_hit_or_substituted_rate": full["decode_hit_or_substituted_rate"]},
        "ceiling_all_resident": {"tpot_ms": res[ceiling]["tpot_ms"], "decode_tok_s": res[ceiling]["decode_tok_s"]}
        if args.ceiling else None,
        "max_possible_speedup_vs_best_exact": best["tpot_ms"] / res[ceiling]["tpot_ms"] if args.ceiling else None,
        "best_with_substitution": {"config": best_sub["config_label"], "tpot_ms": best_sub["tpot_ms"],
                                   "decode_tok_s": best_sub["decode_tok_s"],
                                   "decode_exact_hit_rate": best_sub["decode_exact_hit_rate"],
                                   "decode_hit_or_substituted_rate": best_sub["decode_hit_or_substituted_rate"]},
        "speedup_best_substitution_vs_best_exact": best["tpot_ms"] / best_sub["tpot_ms"],
        "speedup_full_vs_best_exact": best["tpot_ms"] / full["tpot_ms"],
        "speedup_router_step_vs_best_exact": best["tpot_ms"] / router_only["tpot_ms"],
        "seconds": round(time.time() - t0, 1), "rows": rows, "exact_variants": exact,
    }
    cmd = "nice -n 10 python benchmarks/ablation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    md = [f"# SMoE ablation: {summary['model']}, expert budget {args.expert_budget}, alpha {args.alpha:g}\n",
          f"Command: `{cmd.strip()}`  ",
          f"Hardware: {summary['hardware']}; torch threads {args.num_threads}; "
          + (f"interleaved: {args.rounds} prompts of {args.tokens} tokens per configuration, one prompt per "
             f"configuration per round, median TPOT" if args.interleave else
             f"{args.prompts} prompts x {args.tokens} tokens after one warm-up prompt, median of {args.rounds} "
             "round-robin rounds")
          + (f"; decode routing replayed from {Path(args.replay).name}" if args.replay else "")
          + f"; substitution mode {args.substitution_mode}"
          + (f"; per-layer alpha multipliers {list(base.substitution_profile)}" if base.substitution_profile else "")
          + ".\n",
          "Steps are cumulative, in the paper's order. Hit rates are over decode steps; exact hits and substitutions "
          "are counted apart.\n", table(rows),
          "\nWithout substitution (alpha 0), every cache policy and switch:\n",
          table([{"step": r["config_label"], **r} for r in exact]).replace("| vs previous ", "| vs row above "),
          "\nWith substitution (alpha %g), other policies and switches:\n" % args.alpha,
          table([{**r, "step": r["config_label"]} for r in subst]).replace("| vs previous ", "| vs row above "),
          f"\nBest without substitution: **{best['config_label']}**, {best['decode_tok_s']:.2f} tok/s. "
          f"Full stack ({full_label}): {full['decode_tok_s']:.2f} tok/s, "
          f"**{summary['speedup_full_vs_best_exact']:.2f}x**; cache router step alone "
          f"{summary['speedup_router_step_vs_best_exact']:.2f}x. Best with substitution: "
          f"**{best_sub['config_label']}**, {best_sub['decode_tok_s']:.2f} tok/s, "
          f"**{summary['speedup_best_substitution_vs_best_exact']:.2f}x**, decode hit+substituted "
          f"{best_sub['decode_hit_or_substituted_rate']:.1%}."
          + (f" Ceiling with every expert resident (100% budget, warm): {res[ceiling]['decode_tok_s']:.2f} tok/s, "
             "so no miss handling at this budget can be more than "
             f"{summary['max_possible_speedup_vs_best_exact']:.2f}x "
             "faster than the best exact policy." if args.ceiling else "") + "\n"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tag = args.tag or f"ablation_{str(args.expert_budget).replace('%', 'pct')}"
    (out / f"{tag}.md").write_text("\n".join(md))
    (out / f"{tag}.json").write_text(json.dumps(summary, indent=1))
    print("\n".join(md), file=sys.stderr)
    print(json.dumps({k: v for k, v in summary.items() if k not in ("rows", "exact_variants")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
