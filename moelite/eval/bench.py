"""`moelite bench`: decode speed and hit rate over budgets x cache policies, with baselines, in one run.

Contract: every configuration runs in a fresh worker process (`python -m moelite.eval.bench --worker SPEC`) after the
checkpoint's pages are dropped from the OS page cache, optionally inside a memory cgroup of a given size (Linux
cgroup v1 or v2, as root; the output says whether the cap was applied). Baselines: all experts resident (100%
budget, warm) and on-demand with no cache (every needed expert read from disk each time). Belady's optimal hit
rate is simulated on the routing trace recorded by the LRU run of each budget. Prints a table, writes
hit_rate.png / decode.png / results.json to --out, and ends with one JSON line.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

BASE_FIELDS = ("decode_tok_s", "ttft_s", "expert_hit_rate", "expert_bytes_read", "io_seconds", "stall_seconds",
               "prefetch_precision", "prefetch_recall", "peak_rss_bytes", "resident_expert_bytes_peak",
               "expert_budget_bytes", "survived")


def hardware(device: str = "cpu") -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    gpu = "no GPU used"
    if str(device).startswith("cuda"):
        import torch

        props = torch.cuda.get_device_properties(torch.device(device))
        gpu = f"GPU {props.name} ({props.total_memory / 2**30:.0f} GiB)"
    return f"{os.cpu_count()}-core {cpu}, {mem:.0f} GiB RAM, {gpu}"


def drop_file_cache(folder: Path) -> None:
    """Evict the checkpoint's pages from the OS page cache (a cold start for every configuration)."""
    for f in folder.iterdir():
        if f.suffix == ".safetensors" and hasattr(os, "posix_fadvise"):
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


# ---- worker ------------------------------------------------------------------------------------------------------
def worker(spec: dict) -> dict:
    import torch

    from moelite.engine import Engine
    from moelite.config import EngineConfig
    from moelite.eval.prompts import load_prompts
    from moelite.core.traces import Trace, TraceRecorder, TraceReplay

    torch.set_num_threads(spec.get("threads") or os.cpu_count() or 1)
    drop_file_cache(Path(spec["model"]) if spec["model"] else Path("."))
    cfg = EngineConfig(**spec["engine"]).validate()
    t0 = time.perf_counter()
    engine = Engine(spec["model"], cfg, progress=False)
    load_s = time.perf_counter() - t0
    if spec.get("replay"):
        engine.manager.replay = TraceReplay(Trace.load(spec["replay"]), engine.layout.layers, decode_only=True)
    rec = TraceRecorder(engine, include_prefill=True) if spec.get("record") else None
    prompts = load_prompts(spec.get("prompts"))[: spec.get("n_prompts") or None]
    dec_tokens = dec_s = ttft = 0.0
    if engine.tokenizer is None:  # e.g. a real-shape checkpoint without tokenizer files: bytes as token ids
        vocab = engine.hf_config.vocab_size
        prompts = [(d, [3 + b % (vocab - 3) for b in p.encode()][:128]) for d, p in prompts]
    if spec.get("prompt_tokens"):  # decode-focused runs: a short prompt keeps prefill from reading every expert
        prompts = [(d, (engine.encode(p) if isinstance(p, str) else p)[: spec["prompt_tokens"]]) for d, p in prompts]
    for i, (domain, prompt) in enumerate(prompts):
        if rec is not None:
            with rec.recording(domain=domain, prompt=prompt):
                g = engine.generate(prompt, max_tokens=spec["max_tokens"], temperature=0)
        else:
            g = engine.generate(prompt, max_tokens=spec["max_tokens"], temperature=0)
        dec_tokens += g.stats["completion_tokens"] - 1
        dec_s += g.stats.get("decode_s", 0.0)
        ttft += g.stats.get("ttft_s", 0.0)
    if rec is not None:
        rec.save(spec["record"])
    s = engine.stats()
    return {
        "decode_tok_s": dec_tokens / dec_s if dec_s else 0.0, "ttft_s": ttft / len(prompts), "load_s": load_s,
        "expert_hit_rate": s["decode_hit_rate"], "overall_hit_rate": s["expert_hit_rate"], "expert_hits": s["expert_hits"], "expert_misses": s["expert_misses"],
        "expert_bytes_read": s["expert_bytes_read"], "io_seconds": s["io_seconds"],
        "stall_seconds": s["stall_seconds"], "prefetch_precision": s["prefetch_precision"],
        "prefetch_recall": s["prefetch_recall"], "expert_substitutions": s["expert_substitutions"],
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "resident_expert_bytes_peak": s["resident_expert_bytes_peak"], "expert_budget_bytes": s["expert_budget_bytes"],
        "expert_slots": s["expert_slots"], "survived": True,
    }


# ---- cgroup ------------------------------------------------------------------------------------------------------
class MemoryCap:
    """A memory cgroup of `limit` bytes (page cache included) that worker processes are placed in."""

    def __init__(self, limit: int | None):
        self.limit, self.path, self.note = limit, None, "no cap requested"
        if not limit:
            return
        v1 = Path("/sys/fs/cgroup/memory")
        try:
            if v1.is_dir():
                self.path = v1 / f"moelite-bench-{os.getpid()}"
                self.path.mkdir(exist_ok=True)
                (self.path / "memory.limit_in_bytes").write_text(str(limit))
                self.procs = self.path / "cgroup.procs"
            else:
                self.path = Path("/sys/fs/cgroup") / f"moelite-bench-{os.getpid()}"
                self.path.mkdir(exist_ok=True)
                (self.path / "memory.max").write_text(str(limit))
                self.procs = self.path / "cgroup.procs"
            self.note = f"memory cgroup {self.path.name} capped at {limit / 2**30:.2f} GiB (page cache included)"
        except OSError as exc:
            self.path = None
            self.note = f"memory cap NOT applied ({exc.strerror}: needs root and cgroups); ran uncapped"

    def preexec(self):
        if self.path is None:
            return None
        procs = str(self.procs)
        return lambda: Path(procs).write_text(str(os.getpid()))

    def close(self) -> None:
        if self.path is not None:
            try:
                self.path.rmdir()
            except OSError:
                pass


def run_worker(spec: dict, cap: MemoryCap | None, timeout: float) -> dict:
    cmd = [sys.executable, "-m", "moelite.eval.bench", "--worker", json.dumps(spec)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              preexec_fn=cap.preexec() if cap is not None else None)
    except subprocess.TimeoutExpired:
        return {"survived": False, "error": f"timed out after {timeout:.0f} s"}
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        why = "killed (out of memory?)" if proc.returncode in (-9, 137) else (proc.stderr.strip().splitlines() or ["?"])[-1]
        return {"survived": False, "error": f"exit {proc.returncode}: {why}"}
    return json.loads(lines[-1])


# ---- driver ------------------------------------------------------------------------------------------------------
def run_bench(args) -> dict:
    from moelite.config import parse_budget
    from moelite.eval.simulate import simulate
    from moelite.core.traces import Trace

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model = str(Path(args.model).resolve()) if args.model else None
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    for b in budgets:
        parse_budget(b)
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    base_engine = {"device": "cpu", "expert_dtype": args.expert_dtype, "io_threads": args.io_threads,
                   "cache_policy": "lru"}
    common = {"model": model, "prompts": args.prompts, "n_prompts": args.n_prompts, "max_tokens": args.max_tokens,
              "prompt_tokens": args.prompt_tokens,
              "replay": str(Path(args.replay).resolve()) if args.replay else None, "threads": args.threads}
    cap = MemoryCap(int(parse_budget(args.cgroup_mem)[1]) if args.cgroup_mem else None)
    print(f"# {cap.note}", flush=True)
    rows = []

    def go(label, policy, budget, uncapped=False, **engine):
        spec = dict(common, engine=dict(base_engine, cache_policy=policy, expert_budget=budget, **engine))
        if label == "policy" and policy == "lru" and not engine.get("prefetch"):
            spec["record"] = str(out / f"trace_{budget.replace('%', 'pct')}.npz")
        t0 = time.perf_counter()
        res = run_worker(spec, None if uncapped else cap, args.timeout)
        res.update(kind=label, policy=policy, budget=budget, prefetch=bool(engine.get("prefetch")),
                   miss_policy=engine.get("miss_policy", "load"), wall_s=time.perf_counter() - t0,
                   capped=cap.path is not None and not uncapped)
        rows.append(res)
        print(_row(res), flush=True)
        return res

    print(_header(), flush=True)
    if args.upper_bound:  # holds every expert, so it runs without the cap (it would not fit under it)
        go("all-resident", "lru", "100%", uncapped=True, warm_start=True)
    go("on-demand", "lru", budgets[0], miss_policy="direct")
    for b in budgets:
        for p in policies:
            go("policy", p, b)
        if args.prefetch:
            go("policy+prefetch", policies[-1] if "score" not in policies else "score", b, prefetch=True)
    # Belady (and the simulator's LRU, as a check) on each budget's recorded trace
    for b in budgets:
        tpath = out / f"trace_{b.replace('%', 'pct')}.npz"
        lru_row = next((r for r in rows if r["kind"] == "policy" and r["budget"] == b and r["policy"] == "lru"), None)
        if not tpath.is_file() or not lru_row or not lru_row.get("survived"):
            continue
        tr = Trace.load(tpath)
        slots = lru_row["expert_slots"]
        sim = {p: simulate(tr, slots, p)["hit_rate"] for p in ("belady", "lru")}
        rows.append({"kind": "belady (offline)", "policy": "belady", "budget": b, "expert_hit_rate": sim["belady"],
                     "sim_lru_hit_rate": sim["lru"], "survived": True, "simulated": True})
        print(_row(rows[-1]), flush=True)
    cap.close()
    result = {"hardware": hardware(), "date": time.strftime("%Y-%m-%d"), "model": Path(model).name if model else "demo",
              "replay": Path(args.replay).name if args.replay else None, "cap": cap.note,
              "command": "moelite bench " + " ".join(sys.argv[2:]), "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    _plots(rows, budgets, out)
    best = _summary(rows, budgets)
    result["summary"] = best
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result


def _header() -> str:
    return f"{'config':<22}{'budget':>8}{'decode tok/s':>14}{'dec. hit':>10}{'read GiB':>10}{'stall s':>9}{'pf prec':>9}{'peak RSS GiB':>14}{'ok':>4}"


def _row(r: dict) -> str:
    name = r["kind"] if r["kind"] != "policy" else r["policy"]
    if r.get("prefetch"):
        name = f"{r['policy']}+prefetch"
    if not r.get("survived"):
        return f"{name:<22}{r['budget']:>8}  FAILED: {r.get('error', '')}"
    if r.get("simulated"):
        return f"{name:<22}{r['budget']:>8}{'-':>14}{r['expert_hit_rate']:>10.1%}   (simulated; simulator LRU {r['sim_lru_hit_rate']:.1%})"
    return (f"{name:<22}{r['budget']:>8}{r['decode_tok_s']:>14.2f}{r['expert_hit_rate']:>10.1%}"
            f"{r['expert_bytes_read'] / 2**30:>10.2f}{r['stall_seconds']:>9.1f}{r['prefetch_precision']:>9.2f}"
            f"{r['peak_rss_bytes'] / 2**30:>14.2f}{'yes':>4}")


def _summary(rows, budgets) -> dict:
    """Per budget: the fastest online configuration, its speed-up over on-demand loading, the best demand-only hit
    rate (prefetch excluded: Belady bounds demand caching) against Belady's, and prefetch's effect on stalls."""
    ok = [r for r in rows if r.get("survived") and not r.get("simulated")]
    demand = next((r for r in ok if r["kind"] == "on-demand"), None)
    out = {"budget_never_exceeded": all(r["resident_expert_bytes_peak"] <= r["expert_budget_bytes"] for r in ok)}
    for b in budgets:
        online = [r for r in ok if r["kind"].startswith("policy") and r["budget"] == b]
        if not online:
            continue
        best = max(online, key=lambda r: r["decode_tok_s"])
        plain = [r for r in online if not r["prefetch"]]
        bel = next((r for r in rows if r["kind"].startswith("belady") and r["budget"] == b), None)
        hit = {r["policy"]: r["expert_hit_rate"] for r in plain}
        entry = {"best": f"{best['policy']}{'+prefetch' if best['prefetch'] else ''}",
                 "best_decode_tok_s": best["decode_tok_s"],
                 "speedup_vs_on_demand": best["decode_tok_s"] / demand["decode_tok_s"]
                 if demand and demand["decode_tok_s"] else None,
                 "hit_rate_by_policy": hit,
                 "best_online_hit_rate": max(hit.values()) if hit else None,
                 "belady_hit_rate": bel["expert_hit_rate"] if bel else None}
        for r in online:
            if r["prefetch"]:
                base = next((q for q in plain if q["policy"] == r["policy"]), None)
                entry["prefetch"] = {"policy": r["policy"], "stall_s": r["stall_seconds"],
                                     "stall_s_without": base["stall_seconds"] if base else None,
                                     "precision": r["prefetch_precision"], "recall": r["prefetch_recall"],
                                     "hit_rate_incl_prefetched": r["expert_hit_rate"],
                                     "decode_tok_s": r["decode_tok_s"]}
        out[b] = entry
    return out


def _plots(rows, budgets, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from moelite.config import parse_budget

    def x_of(b):
        kind, v = parse_budget(b)
        return v * 100 if kind == "fraction" else v / 2**30

    unit = "% of routed experts" if parse_budget(budgets[0])[0] == "fraction" else "GiB"
    series: dict[str, list] = {}
    for r in rows:
        if r["kind"] in ("policy", "policy+prefetch", "belady (offline)") and r.get("survived"):
            name = "belady (offline)" if r["kind"].startswith("belady") else r["policy"] + ("+prefetch" if r.get("prefetch") else "")
            series.setdefault(name, []).append(r)
    for metric, fname, label in (("expert_hit_rate", "hit_rate.png", "expert hit rate"),
                                 ("decode_tok_s", "decode.png", "decode tokens/s")):
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, rs in series.items():
            if metric == "decode_tok_s" and name.startswith("belady"):
                continue
            rs = sorted(rs, key=lambda r: x_of(r["budget"]))
            ax.plot([x_of(r["budget"]) for r in rs], [r[metric] for r in rs], marker="o", label=name,
                    linestyle="--" if name.startswith("belady") else "-")
        for r in rows:
            if r["kind"] in ("all-resident", "on-demand") and r.get("survived") and metric == "decode_tok_s":
                ax.axhline(r[metric], color="grey", linestyle=":", linewidth=1)
                ax.annotate(r["kind"], (ax.get_xlim()[0], r[metric]), fontsize=7, color="grey")
        ax.set_xlabel(f"expert budget ({unit})")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(out / fname, dpi=120)
        plt.close(fig)


def register_cli(sub) -> None:
    p = sub.add_parser("bench", help="benchmark budgets x cache policies (and baselines) in one run")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the demo model)")
    p.add_argument("--budgets", default="10%,25%,50%")
    p.add_argument("--policies", default="lru,lfu,score")
    p.add_argument("--prefetch", action=argparse_bool(), default=True, help="also run the best policy with prefetch")
    p.add_argument("--prompts", default=None, help="prompt file (default: built-in three-domain prompts)")
    p.add_argument("--n-prompts", type=int, default=6)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--prompt-tokens", type=int, default=None, help="truncate prompts to this many tokens")
    p.add_argument("--upper-bound", action=argparse_bool(), default=True,
                   help="also run all experts resident (uncapped, warm) as the upper bound")
    p.add_argument("--replay", default=None, help="routing trace (.npz) to replay (real-shape checkpoints)")
    p.add_argument("--expert-dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--io-threads", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch threads per worker")
    p.add_argument("--cgroup-mem", default=None, help="run every configuration inside a memory cgroup of this size")
    p.add_argument("--timeout", type=float, default=1800, help="seconds per configuration")
    p.add_argument("--out", default="bench-out")
    p.add_argument("--summarize", default=None, metavar="RESULTS_JSON",
                   help="only re-summarise an earlier run's results.json (no configurations are run)")

    def run(args) -> int:
        if args.summarize:  # re-read a results.json: table, plots and summary line without re-running
            result = json.loads(Path(args.summarize).read_text())
            budgets = sorted({r["budget"] for r in result["rows"] if r["kind"] != "all-resident"}, key=str)
            for r in result["rows"]:
                print(_row(r))
            _plots(result["rows"], budgets, Path(args.summarize).parent)
            result["summary"] = _summary(result["rows"], budgets)
            Path(args.summarize).write_text(json.dumps(result, indent=1))
        else:
            result = run_bench(args)
        print(json.dumps({"summary": result["summary"], "hardware": result["hardware"], "cap": result["cap"],
                          "out": str(Path(args.summarize) if args.summarize else Path(args.out) / "results.json")}))
        return 0

    p.set_defaults(func=run)


def argparse_bool():
    import argparse

    return argparse.BooleanOptionalAction


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        print("usage: python -m moelite.eval.bench --worker SPEC_JSON (internal); use `moelite bench`", file=sys.stderr)
        sys.exit(2)
