"""One-shot GPU benchmark of moelite on a real-shape checkpoint: bounds, budgets x routings x batch sizes, SMoE
substitution vs the best exact policy, HF accelerate offloading at the same VRAM. `--device cpu --tiny`: smoke test.

Contract:
  - Every row is wrapped: a failing row records its error (and the traceback line) and the run goes on; a row that
    would start after --time-budget seconds is recorded as skipped. Progress lines (elapsed time per row) go to
    stdout, flushed; the LAST stdout line is one JSON object with every result (floats to 4 digits). Also writes
    <out>/gpu_bench.json (full precision) and <out>/gpu_bench.md (command, date, hardware, table); --out defaults
    to $OUT when set.
  - bounds: HBM = device-to-device copy of 2 GiB, median of 10 (cuda events), GB/s counting bytes read + written
    (its half is also recorded, as hbm_copy_GBps_read: not a read-only measurement); pinned host-to-device copy of 256 MiB, median of 10. null on CPU.
  - checkpoint: make_realshape(<work>/rs<layers>, --preset) unless there with the same shape. Active bytes/token =
    every non-routed-expert tensor but the embedding (lm_head included) + top_k x MoE layers x one expert, at the
    checkpoint dtype; HBM bound ms/token = active bytes / copy GB/s counting read + write (bytes moved per second).
  - moelite: per --budgets budget ONE engine (--cache-policy/--prefetch/--miss-policy, warm start at 100%;
    host_budget="auto" and, on CUDA, cuda_graphs=True when EngineConfig has them), reused for both routings (replay
    = decode routing follows --trace via TraceReplay; own = the checkpoint's random router), each routing with its
    own warm-up generation. Batch 1: --prompts greedy generations of --tokens tokens from random 32-token prompts
    (seed 0, EOS ignored) after one warm-up; decode tok/s = sum(tokens - 1) / sum(decode_s); counters are deltas
    over the measured generations; bound = HBM bound ms / TPOT ms. Batch B > 1 (--batch-sizes; 100% and 25% only):
    engine.generate_batch(B distinct prompts) after a short warm-up call, "not available" when absent.
  - smoe: fresh engines at 25%, replay, batch 1: exact lru+load / score+load / score+hybrid / score+direct, and
    score+load and score+hybrid with alpha 0.2 and the --profile multipliers mapped as TraceReplay maps layers (model MoE layer i
    -> recorded layer i mod n), as a plain list. speedup = substitution tok/s / best exact tok/s.
  - hf: transformers + accelerate, bf16, device_map="auto", max_memory={0: dense + budget bytes, "cpu": "100GiB"}
    at 25% (then 100% if time is left); greedy KV-cached loop on the same prompts, stopped (partial result kept)
    when its decode time passes --hf-timeout. On CPU: plain from_pretrained, no offload. llama.cpp: "not run".

  python3 benchmarks/gpu_bench.py                                   # H200, ~8 min
  python3 benchmarks/gpu_bench.py --device cpu --tiny --work /tmp/gbw --out /tmp/gbo --layers 2 --tokens 8 \
      --prompts 1 --budgets 100%,25% --hf-timeout 30                # CPU smoke test
"""

from __future__ import annotations

import argparse
import datetime
import gc
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import moelite  # noqa: E402
from moelite.core.checkpoint import Checkpoint  # noqa: E402
from moelite.core.traces import Trace, TraceReplay  # noqa: E402

FIELDS = set(moelite.EngineConfig.__dataclass_fields__)
TINY = dict(hidden_size=64, moe_intermediate_size=32, shared_expert_intermediate_size=32, intermediate_size=128,
            num_attention_heads=4, num_key_value_heads=2)
BATCH_BUDGETS = ("100%", "25%")
COUNTERS = ("expert_hits", "expert_misses", "misses_loaded", "misses_direct", "expert_substitutions",
            "expert_bytes_read", "graph_steps", "eager_steps")
BRIEF = ("decode_tok_s", "tpot_ms", "ttft_ms", "decode_exact_hit_rate", "bound_fraction", "load_s", "hbm_copy_GBps_rw",
         "h2d_pinned_GBps", "active_bytes_per_token")
T0 = time.time()


def log(msg: str) -> None:
    print(f"[{time.time() - T0:7.1f}s] {msg}", flush=True)


class Runner:
    """Runs rows, each wrapped: exceptions become the row's `error`; rows past the time budget are skipped."""

    def __init__(self, time_budget: float):
        self.rows, self.time_budget = [], time_budget

    def left(self) -> float:
        return self.time_budget - (time.time() - T0)

    def row(self, section: str, label: str, fn, **meta) -> dict:
        r = {"section": section, "label": label, **meta}
        if self.left() <= 0:
            r["skipped"] = "time budget (--time-budget) used up"
            log(f"{section} | {label}: skipped (time budget)")
        else:
            t = time.time()
            try:
                r.update(fn() or {})
            except Exception as exc:  # noqa: BLE001 - one failing row must not end the run
                tb = traceback.format_exc().strip().splitlines()
                r["error"] = f"{type(exc).__name__}: {exc}"[:500]
                r["where"] = tb[-3].strip() if len(tb) >= 3 else ""
            r["elapsed_s"] = round(time.time() - t, 2)
            brief = r.get("error") or r.get("skipped") or ", ".join(
                [f"{k} {r[k]:.4g}" for k in BRIEF if isinstance(r.get(k), (int, float))] + ([str(r["note"])] if r.get("note") else []))
            log(f"{section} | {label}: {brief} ({r['elapsed_s']:.1f}s)")
        self.rows.append(r)
        return r


# ---- hardware ---------------------------------------------------------------------------------------------------
def hardware(dev: torch.device) -> dict:
    import importlib.metadata as md

    info = dict(ln.split(":", 1) for ln in Path("/proc/cpuinfo").read_text().split("\n\n")[0].splitlines() if ":" in ln) \
        if Path("/proc/cpuinfo").is_file() else {}
    info = {k.strip(): v.strip() for k, v in info.items()}
    want = ("avx", "avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "avx512_fp16",
            "amx_tile", "amx_bf16", "amx_int8")
    hw = {"cpu": info.get("model name", platform.processor()), "cpu_cores": os.cpu_count(),
          "cpu_flags": [f for f in want if f in info.get("flags", "").split()],
          "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
          "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(), "gpu": None}
    for mod in ("transformers", "accelerate"):
        hw[mod] = md.version(mod) if importlib.util.find_spec(mod) else None
    if dev.type == "cuda":
        hw["gpu"] = f"{torch.cuda.get_device_name(dev)}, {torch.cuda.get_device_properties(dev).total_memory / 2**30:.0f} GiB"
    return hw


def bounds(dev: torch.device) -> dict:
    if dev.type != "cuda":
        return {"hbm_copy_GBps_rw": None, "hbm_copy_GBps_read": None, "h2d_pinned_GBps": None, "note": "not on CPU"}

    def timed(dst, src, n=10):
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize(dev)
        ts = []
        for _ in range(n):
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            dst.copy_(src, non_blocking=True)
            b.record()
            b.synchronize()
            ts.append(a.elapsed_time(b) / 1000)
        return statistics.median(ts)

    n, m = 2 << 30, 256 << 20
    t = timed(torch.empty(n, dtype=torch.uint8, device=dev), torch.empty(n, dtype=torch.uint8, device=dev))
    t_h2d = timed(torch.empty(m, dtype=torch.uint8, device=dev), torch.empty(m, dtype=torch.uint8, pin_memory=True))
    torch.cuda.empty_cache()
    return {"hbm_copy_GBps_rw": 2 * n / t / 1e9, "hbm_copy_GBps_read": n / t / 1e9, "h2d_pinned_GBps": m / t_h2d / 1e9}


# ---- checkpoint -------------------------------------------------------------------------------------------------
def checkpoint(args) -> tuple[Path, dict]:
    from moelite.eval.realshape import PRESETS, make_realshape

    rs = Path(args.work) / (f"rs{args.layers}" + ("_tiny" if args.tiny else ""))
    over = TINY if args.tiny else {}
    want = {"num_hidden_layers": args.layers, **{k: v for k, v in {**PRESETS[args.preset], **over}.items()
                                                   if k in ("hidden_size", "num_experts", "moe_intermediate_size")}}
    cfg_file = rs / "config.json"
    reused = cfg_file.is_file() and all(json.loads(cfg_file.read_text()).get(k) == v for k, v in want.items())
    if not reused:
        make_realshape(rs, preset=args.preset, layers=args.layers, progress=False, **over)
    cfg = json.loads(cfg_file.read_text())
    tensors = Checkpoint.open(rs).tensors
    experts = {n: t.nbytes for n, t in tensors.items() if ".mlp.experts." in n}
    dense_all = sum(t.nbytes for n, t in tensors.items() if n not in experts)
    embed = sum(t.nbytes for n, t in tensors.items() if n.endswith("embed_tokens.weight"))
    n_moe = len({n.split(".mlp.experts.")[0] for n in experts})
    one_expert = sum(experts.values()) / (n_moe * cfg["num_experts"])
    active = dense_all - embed + cfg["num_experts_per_tok"] * n_moe * one_expert
    return rs, {"path": str(rs), "reused": reused, "layers": cfg["num_hidden_layers"], "moe_layers": n_moe,
                **{k: cfg[k] for k in ("num_experts", "hidden_size", "vocab_size")}, "top_k": cfg["num_experts_per_tok"],
                "dense_bytes": dense_all, "dense_bytes_per_token": dense_all - embed,
                "expert_bytes": sum(experts.values()), "one_expert_bytes": one_expert, "active_bytes_per_token": active}


def prompts(vocab: int, n: int, seed: int, length: int = 32) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (length,), generator=g).tolist() for _ in range(n)]


# ---- moelite ------------------------------------------------------------------------------------------------------
def load_engine(args, rs: Path, budget: str, **cfg):
    extra = {k: v for k, v in (("host_budget", "auto"), ("cuda_graphs", True), ("compile_decode", args.compile))
             if k in FIELDS and (k == "host_budget" or args.device.startswith("cuda"))}
    free()  # the previous engine (a web of cycles, unreachable by now) releases its slots and pinned memory first
    t = time.time()
    eng = moelite.load(str(rs), device=args.device, expert_budget=budget, **extra, **cfg)
    eng.eos_ids = set()  # decode exactly --tokens tokens
    return eng, {"load_s": round(time.time() - t, 2), "extra_options": extra, "config": cfg}


def free(eng=None) -> None:
    if eng is not None:
        eng.close()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def set_routing(eng, routing: str, trace: Path) -> None:
    eng.manager.set_replay(TraceReplay(Trace.load(trace), eng.layout.layers, decode_only=True)
                           if routing == "replay" else None)


def counters(eng) -> tuple:
    """The engine's counters (a snapshot) and its CUDA-graph step counts, now."""
    s = eng.stats()
    return eng.counters(), {k: s[k] for k in ("graph_steps", "eager_steps") if k in s}


def delta(before: tuple, after: tuple) -> dict:
    """Counts and rates between two `counters` readings, as moelite.core.counters defines them."""
    d = (after[0] - before[0]).report()
    d.update({k: v - before[1].get(k, 0) for k, v in after[1].items()})
    return d


def batch1(eng, ps: list[list[int]], tokens: int, bound_ms: float | None) -> dict:
    eng.generate(ps[0], max_tokens=tokens, temperature=0)  # warm-up
    before, toks, dec_s, wall_dec, ttfts, per = counters(eng), 0, 0.0, 0.0, [], []
    for p in ps[1:]:
        t = time.perf_counter()
        g = eng.generate(p, max_tokens=tokens, temperature=0)
        wall = time.perf_counter() - t
        s = g.stats
        toks += s["completion_tokens"] - 1
        dec_s += s["decode_s"]
        wall_dec += wall - s["ttft_s"]
        ttfts.append(s["ttft_s"])
        per.append(s["decode_tok_s"])
    tpot = 1000 * dec_s / toks if toks else None
    st = eng.stats()
    return {"decode_tok_s": toks / dec_s if dec_s else None, "decode_tok_s_per_prompt": per,
            "decode_tok_s_wall": toks / wall_dec if wall_dec > 0 else None, "tpot_ms": tpot,
            "ttft_ms": 1000 * statistics.mean(ttfts), "decode_tokens": toks, **delta(before, counters(eng)),
            "bound_fraction": bound_ms / tpot if bound_ms and tpot else None,
            "cumulative": {k: st[k] for k in ("exact_hit_rate", "decode_exact_hit_rate", *COUNTERS[2:]) if k in st}}


def batchB(eng, vocab: int, b: int, tokens: int) -> dict:
    if not hasattr(eng, "generate_batch"):
        return {"note": "not available (this build's Engine has no generate_batch)", "status": "not available"}
    eng.generate_batch(prompts(vocab, b, seed=100 + b), max_tokens=min(tokens, 8), temperature=0)  # warm-up
    before = counters(eng)
    t = time.perf_counter()
    gens = eng.generate_batch(prompts(vocab, b, seed=200 + b), max_tokens=tokens, temperature=0)
    wall = time.perf_counter() - t
    s = gens[0].stats
    dec, steps = s.get("decode_s"), s.get("decode_steps", tokens - 1)
    agg = s.get("batch_decode_tok_s") or (b * (tokens - 1) / dec if dec else None)
    return {"decode_tok_s": agg, "decode_s": dec, "wall_s": wall, "tpot_ms": 1000 * dec / steps if dec and steps else None,
            "ttft_ms": 1000 * s["ttft_s"] if "ttft_s" in s else None, "completion_tokens": [len(g.token_ids) for g in gens],
            "wall_tok_s": b * tokens / wall, **delta(before, counters(eng))}


def moelite_rows(run: Runner, args, rs: Path, info: dict, bound_ms) -> None:
    cfg = {"cache_policy": args.cache_policy, "prefetch": args.prefetch, "miss_policy": args.miss_policy}
    ps = prompts(info["vocab_size"], args.prompts + 1, seed=0)
    for budget in args.budgets:
        box: dict = {}

        def load(budget=budget):
            box["eng"], meta = load_engine(args, rs, budget, warm_start=budget == "100%", **cfg)
            return meta

        r = run.row("moelite", f"load {budget}", load, budget=budget)
        eng = box.get("eng")
        try:
            for routing in ("replay", "own"):
                for b in [1] + [b for b in args.batch_sizes if b > 1 and budget in BATCH_BUDGETS]:
                    def one(routing=routing, b=b):
                        if eng is None:
                            return {"error": f"engine load failed: {r.get('error', r.get('skipped'))}"}
                        set_routing(eng, routing, args.trace)  # a fresh TraceReplay per row (trace from its start)
                        return batch1(eng, ps, args.tokens, bound_ms) if b == 1 else \
                            batchB(eng, info["vocab_size"], b, args.tokens)
                    run.row("moelite", f"{budget} {routing} batch {b}", one, budget=budget, routing=routing, batch=b)
        finally:
            box.clear()
            free(eng)
            del eng  # collected by the next load_engine's free()


def map_profile(args, n_moe: int) -> list[float]:
    """Model MoE layer i replays recorded layer rec[i % n] (TraceReplay), so it takes that layer's multiplier."""
    prof = json.loads(Path(args.profile).read_text())
    mult, prof_layers = prof["profile"], prof.get("layers") or list(range(len(prof["profile"])))
    rec = Trace.load(args.trace).layers
    return [float(mult[prof_layers.index(rec[i % len(rec)])]) if rec[i % len(rec)] in prof_layers
            else float(mult[i % len(mult)]) for i in range(n_moe)]


def smoe_rows(run: Runner, args, rs: Path, info: dict) -> dict:
    try:
        profile, perr = map_profile(args, info["moe_layers"]), None
    except Exception as exc:  # noqa: BLE001 - only the substitution row needs it
        profile, perr = None, f"--profile {args.profile}: {type(exc).__name__}: {exc}"
    configs = [("exact lru load", {"cache_policy": "lru", "miss_policy": "load"}),
               ("exact score load", {"cache_policy": "score", "miss_policy": "load"}),
               ("exact score hybrid", {"cache_policy": "score", "miss_policy": "hybrid"}),
               ("exact score direct", {"cache_policy": "score", "miss_policy": "direct"}),
               ("substitution score load alpha 0.2 profile",
                {"cache_policy": "score", "miss_policy": "load", "substitution_alpha": 0.2,
                 "substitution_profile": profile}),
               ("substitution score hybrid alpha 0.2 profile",
                {"cache_policy": "score", "miss_policy": "hybrid", "substitution_alpha": 0.2,
                 "substitution_profile": profile})]
    ps = prompts(info["vocab_size"], args.prompts + 1, seed=0)
    res = {}
    for label, cfg in configs:
        def one(cfg=cfg):
            if "substitution_profile" in cfg and profile is None:
                raise ValueError(perr)
            eng, meta = load_engine(args, rs, "25%", **cfg)
            try:
                set_routing(eng, "replay", args.trace)
                return {**meta, **batch1(eng, ps, args.tokens, None)}
            finally:
                free(eng)
        res[label] = run.row("smoe", label, one, budget="25%", routing="replay", batch=1)
    exact = [r for k, r in res.items() if k.startswith("exact") and r.get("decode_tok_s")]
    subs = [r for k, r in res.items() if k.startswith("substitution") and r.get("decode_tok_s")]
    sub = max(subs, key=lambda r: r["decode_tok_s"]) if subs else {}
    best = max(exact, key=lambda r: r["decode_tok_s"]) if exact else None
    return {"profile": profile, "best_exact": best and best["label"], "best_substitution": sub.get("label"),
            "best_exact_tok_s": best and best["decode_tok_s"], "substitution_tok_s": sub.get("decode_tok_s"),
            "speedup": sub["decode_tok_s"] / best["decode_tok_s"] if best and sub.get("decode_tok_s") else None,
            "substitution_decode_exact_hit_rate": sub.get("decode_exact_hit_rate"),
            "substitution_substituted_rate": sub.get("decode_substituted_rate")}


# ---- HF accelerate offload ---------------------------------------------------------------------------------------
def hf_row(args, rs: Path, info: dict, frac: float, limit: float) -> dict:
    from transformers import AutoModelForCausalLM, DynamicCache

    free()
    dev = torch.device(args.device)
    kw: dict = {"dtype": torch.bfloat16, "output_router_logits": False}
    note = None if dev.type == "cuda" else "CPU smoke test: plain from_pretrained on CPU, no device_map / offload"
    if dev.type == "cuda":
        kw.update(device_map="auto", max_memory={dev.index or 0: int(info["dense_bytes"] + frac * info["expert_bytes"]),
                                                 "cpu": "100GiB"})
    t = time.time()
    model = AutoModelForCausalLM.from_pretrained(str(rs), **kw).eval()
    load_s = time.time() - t
    where: dict = {}
    for v in (getattr(model, "hf_device_map", None) or {}).values():
        where[str(v)] = where.get(str(v), 0) + 1

    @torch.inference_mode()
    def gen(ids: list[int], n: int, deadline: float | None):
        cache = DynamicCache(config=model.config)
        x, t0, t_first, done = torch.tensor([ids], device=dev), time.perf_counter(), 0.0, 0
        while done < n and not (done and deadline and time.perf_counter() > deadline):
            out = model(input_ids=x, past_key_values=cache, use_cache=True, logits_to_keep=1)
            x = torch.tensor([[int(out.logits[0, -1].float().argmax())]], device=dev)
            done += 1
            t_first = t_first or time.perf_counter()
        return t_first - t0, done - 1, time.perf_counter() - t_first

    try:
        ps = prompts(info["vocab_size"], args.prompts + 1, seed=0)
        gen(ps[0], 2, None)  # warm-up
        deadline = time.perf_counter() + limit
        toks, dec_s, ttfts, stopped = 0, 0.0, [], False
        for p in ps[1:]:
            ttft, n, d = gen(p, args.tokens, deadline)
            toks, dec_s = toks + n, dec_s + d
            ttfts.append(ttft)
            if time.perf_counter() > deadline:
                stopped = len(ttfts) < args.prompts or n < args.tokens - 1
                break
        return {"decode_tok_s": toks / dec_s if dec_s else None, "tpot_ms": 1000 * dec_s / toks if toks else None,
                "ttft_ms": 1000 * statistics.mean(ttfts), "decode_tokens": toks, "prompts_done": len(ttfts),
                "stopped_at_time_limit": stopped, "time_limit_s": round(limit, 1), "load_s": round(load_s, 2),
                "device_map_modules": where, "max_memory": {str(k): v for k, v in kw.get("max_memory", {}).items()},
                **({"note": note} if note else {})}
    finally:
        del model
        free()


# ---- report -------------------------------------------------------------------------------------------------------
def fmt(v, spec=".2f", pct=False):
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:.1%}" if pct else format(v, spec)
    return str(v)


def compact(v):
    """The final stdout line: floats to 4 significant digits, without the bulky detail keys (the file has all)."""
    if isinstance(v, float):
        return float(f"{v:.4g}")
    if isinstance(v, dict):
        return {k: compact(x) for k, x in v.items() if k not in ("cumulative", "decode_tok_s_per_prompt", "config",
                                                                 "completion_tokens", "max_memory", "where")}
    return [compact(x) for x in v] if isinstance(v, (list, tuple)) else v


def markdown(res: dict, cmd: str) -> str:
    hw, b, ck = res["hardware"] or {}, res["bounds"] or {}, res["checkpoint"] or {}
    gb = lambda v: fmt(v / 1e9 if v else None, ".3f")  # noqa: E731
    cols = [("decode tok/s", "decode_tok_s", ".2f"), ("TPOT ms", "tpot_ms", ".2f"), ("TTFT ms", "ttft_ms", ".1f"),
            ("decode hit", "decode_exact_hit_rate", "%"), ("substituted", "decode_substituted_rate", "%"),
            ("misses loaded", "misses_loaded", ""), ("misses direct", "misses_direct", ""),
            ("graph steps", "graph_steps", ""), ("eager steps", "eager_steps", ""), ("bound", "bound_fraction", "%"),
            ("s", "elapsed_s", ".1f")]
    md = ["# moelite GPU benchmark\n", f"Command: `{cmd}`  ", f"Date: {res['date']}  ",
          f"Hardware: GPU {hw.get('gpu') or 'none'}; CPU {hw.get('cpu')} ({hw.get('cpu_cores')} cores, "
          f"{hw.get('ram_gib')} GiB RAM; flags {' '.join(hw.get('cpu_flags') or []) or '-'}); torch {hw.get('torch')} "
          f"(CUDA {hw.get('cuda')}), transformers {hw.get('transformers')}, accelerate {hw.get('accelerate')}. "
          f"Total {res['seconds']:.0f} s.{' FATAL: ' + res['fatal'] if res.get('fatal') else ''}\n",
          f"HBM device-to-device copy {fmt(b.get('hbm_copy_GBps_rw'), '.0f')} GB/s counting bytes read + written "
          f"({fmt(b.get('hbm_copy_GBps_read'), '.0f')} GB/s, half of it); pinned host-to-device "
          f"{fmt(b.get('h2d_pinned_GBps'), '.1f')} GB/s. Checkpoint {ck.get('path', '-')}: {ck.get('moe_layers')} MoE "
          f"layers x {ck.get('num_experts')} experts, top-{ck.get('top_k')}; dense {gb(ck.get('dense_bytes'))} GB, "
          f"routed experts {gb(ck.get('expert_bytes'))} GB; active bytes per token "
          f"{gb(ck.get('active_bytes_per_token'))} GB (dense without embedding, lm_head included, + top-k x layers "
          f"x one expert). HBM bound **{fmt(res.get('bound_ms_per_token'), '.3f')} ms/token** = active bytes / the "
          "copy's read+write GB/s (bytes moved per second); 'bound' = this bound / measured TPOT.\n",
          "| section | row | " + " | ".join(c[0] for c in cols) + " | note |", "|---" * (len(cols) + 3) + "|"]
    for r in res["rows"]:
        note = r.get("error") or r.get("skipped") or r.get("note") or ""
        if r.get("stopped_at_time_limit"):
            note = f"stopped at {r['time_limit_s']} s after {r['prompts_done']} prompt(s). {note}"
        if r.get("device_map_modules"):
            note += f" device map {r['device_map_modules']}"
        vals = [fmt(r.get(k), pct=True) if f == "%" else fmt(r.get(k), f or "d") for _, k, f in cols]
        md.append(f"| {r['section']} | {r['label']} | " + " | ".join(vals) + f" | {str(note).replace('|', '/')} |")
    s = res.get("smoe") or {}
    if s:
        md.append(f"\nSMoE at 25%, replay: best exact **{s.get('best_exact')}** {fmt(s.get('best_exact_tok_s'))} "
                  f"tok/s; substitution {fmt(s.get('substitution_tok_s'))} tok/s, speed-up "
                  f"**{fmt(s.get('speedup'))}x**, decode exact hit {fmt(s.get('substitution_decode_exact_hit_rate'), pct=True)}, "
                  f"substituted {fmt(s.get('substitution_substituted_rate'), pct=True)}; per-layer multipliers "
                  f"{s.get('profile')}.")
    md.append("\nmoelite rows reuse one engine per budget (replay first, then own routing, each with a warm-up "
              "generation); hit rates and miss counts are over the measured generations only.\n")
    return "\n".join(md)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=" ".join(__doc__.split("\n")[:2]),
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--work", default="/tmp/moelite_gpu_bench", help="where the real-shape checkpoint is written")
    p.add_argument("--out", default=os.environ.get("OUT") or str(ROOT / "benchmarks" / "results" / "gpu"),
                   help="gpu_bench.json and gpu_bench.md go here ($OUT when set)")
    p.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (smoke test)")
    p.add_argument("--preset", default="qwen3-30b-a3b-64e", help="moelite.eval.realshape preset")
    p.add_argument("--layers", type=int, default=16, help="layers of the real-shape checkpoint")
    p.add_argument("--tokens", type=int, default=64, help="new tokens per generation")
    p.add_argument("--prompts", type=int, default=3, help="measured prompts per row (after one warm-up)")
    p.add_argument("--budgets", default="100%,50%,25%,12.5%", help="expert budgets of the moelite rows")
    p.add_argument("--batch-sizes", default="1,8", help="batch sizes > 1 run at the 100%% and 25%% budgets only")
    p.add_argument("--cache-policy", default="score", help="cache policy of the budget rows")
    p.add_argument("--prefetch", action=argparse.BooleanOptionalAction, default=True, help="prefetch in budget rows")
    p.add_argument("--miss-policy", default="load", help="miss policy of the budget rows")
    p.add_argument("--skip-hf", action="store_true", help="no HF accelerate rows")
    p.add_argument("--compile", action="store_true", help="engines with compile_decode=True (torch.compile before "
                   "CUDA-graph capture)")
    p.add_argument("--skip-smoe", action="store_true", help="no SMoE rows")
    p.add_argument("--trace", default=str(ROOT / "benchmarks" / "results" / "cache" / "demo_trace.npz"),
                   help="routing trace replayed by the replay rows")
    p.add_argument("--profile", default=str(ROOT / "benchmarks" / "results" / "smoe" / "profile_25pct.json"),
                   help="per-layer alpha multipliers (moelite calibrate JSON) of the substitution row")
    p.add_argument("--hf-timeout", type=float, default=120.0, help="decode seconds per HF row before it stops")
    p.add_argument("--time-budget", type=float, default=450.0, help="rows that would start later are skipped")
    p.add_argument("--tiny", action="store_true", help=argparse.SUPPRESS)  # smoke test: tiny hidden sizes
    args = p.parse_args(argv)
    args.budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    args.batch_sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    cmd = "python3 benchmarks/gpu_bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    run = Runner(args.time_budget)
    res: dict = {"command": cmd.strip(), "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
                 "device": args.device, "tokens": args.tokens, "prompts": args.prompts, "tiny": args.tiny,
                 "engine_fields": sorted(FIELDS & {"host_budget", "cuda_graphs", "compile_decode"}), "rows": run.rows, "hardware": None,
                 "bounds": None, "checkpoint": None, "bound_ms_per_token": None, "smoe": None}
    try:
        dev = torch.device(args.device)
        res["hardware"] = hardware(dev)
        log(f"hardware: {res['hardware']}")
        res["bounds"] = run.row("bounds", "HBM copy + pinned H2D", lambda: bounds(dev))
        ck: dict = {}
        run.row("checkpoint", f"realshape {args.preset} {args.layers} layers", lambda: ck.update(
            zip(("rs", "info"), checkpoint(args))) or {k: ck["info"][k] for k in ("reused", "active_bytes_per_token")})
        if not ck:
            raise RuntimeError("no checkpoint; nothing else can run")
        rs, info = ck["rs"], ck["info"]
        res["checkpoint"] = info
        bw = res["bounds"].get("hbm_copy_GBps_rw")
        bound_ms = 1000 * info["active_bytes_per_token"] / (bw * 1e9) if bw else None
        res["bound_ms_per_token"] = bound_ms
        log(f"active bytes/token {info['active_bytes_per_token'] / 1e9:.3f} GB; HBM bound {bound_ms} ms/token")
        moelite_rows(run, args, rs, info, bound_ms)
        try:
            res["smoe"] = None if args.skip_smoe else smoe_rows(run, args, rs, info)
        except Exception as exc:  # noqa: BLE001 - the HF rows still run
            res["smoe"] = {"error": f"{type(exc).__name__}: {exc}"}
            log(f"smoe summary failed: {res['smoe']['error']}")
        for frac, label, reserve in ((0.25, "25%", 60), (1.0, "100%", 90)) * (not args.skip_hf):
            limit = min(args.hf_timeout, run.left() - reserve)  # decode time limit; loading takes about `reserve`
            run.row("hf", f"accelerate offload {label}", (lambda frac=frac, limit=limit: hf_row(
                args, rs, info, frac, limit)) if limit > 5 else (lambda: {"skipped": "not enough of --time-budget left"}),
                budget=label, batch=1)
    except Exception as exc:  # noqa: BLE001 - still write what there is
        res["fatal"] = f"{type(exc).__name__}: {exc}"
        log(f"fatal: {res['fatal']}")
    run.rows.append({"section": "llama.cpp", "label": "llama.cpp CUDA", "status": "not run",
                     "note": "not run: no time to build llama.cpp for CUDA in this run"})
    res["seconds"] = round(time.time() - T0, 1)
    (out / "gpu_bench.json").write_text(json.dumps(res, indent=1, default=str))
    try:
        (out / "gpu_bench.md").write_text(markdown(res, res["command"]))
    except Exception as exc:  # noqa: BLE001 - the JSON line below must still come
        log(f"markdown failed: {type(exc).__name__}: {exc}")
    log(f"wrote {out / 'gpu_bench.json'} and {out / 'gpu_bench.md'}")
    print(json.dumps(compact(res), default=str, separators=(",", ":")), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
