"""`moelite bench`: decode speed and hit rate over budgets x cache policies, with baselines, in one run.

Contract:
  - `run_bench(plan, progress=False, echo=True)`: every configuration of a `BenchPlan` runs in a fresh worker process
    (`python -m moelite.eval.bench --worker SPEC`) after the checkpoint's pages are dropped from the OS page cache,
    optionally inside a memory cgroup of a given size (Linux cgroup v1 or v2, as root; the output says whether the
    cap was applied). Every configuration starts from the plan's engine fields (the command's engine flags) with its
    own budget, cache policy and, per row, prefetch / miss policy / warm start. Baselines: all experts resident
    (100% budget, warm) and on-demand with no cache (every needed expert read from disk each time). Belady's optimal
    hit rate is simulated on the routing trace recorded by the LRU run of each budget. Prints a table row per
    configuration (unless `echo` is off; `progress`: a bar on stderr), writes hit_rate.png / decode.png /
    results.json to the plan's `out` and returns the result (its "summary" per budget).
  - `summarize(results_json, echo=True)`: the table, plots and summary of an earlier run again, without running.
  - `worker(spec)`: one configuration in this process (the worker entry point); returns its measurements.
The command line is moelite/cli/bench.py.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from moelite.config import EngineConfig, parse_budget
from moelite.core.traces import Trace, TraceRecorder, TraceReplay
from moelite.engine import Engine
from moelite.eval.prompts import load_prompts
from moelite.eval.simulate import simulate


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


# ---- roofline ----------------------------------------------------------------------------------------------------
def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> dict[int, float]:
    """This machine's read bandwidth now (GB/s) by thread count: the best of `repeats` sums over `gib` GiB, at 1
    thread and at 2 (when there are two cores)."""
    buf = torch.ones(int(gib * (1 << 30)) // 4)
    old, out = torch.get_num_threads(), {}
    try:
        for t in sorted({1, min(2, os.cpu_count() or 1)}):
            torch.set_num_threads(t)
            buf.sum()  # fault the pages in and warm up
            best = float("inf")
            for _ in range(repeats):
                t0 = time.perf_counter()
                buf.sum()
                best = min(best, time.perf_counter() - t0)
            out[t] = buf.numel() * 4 / best / 1e9
    finally:
        torch.set_num_threads(old)
    return out


def bytes_per_token(engine) -> int:
    """Weight bytes one decode token reads, in the checkpoint's dtype: every dense weight but the embedding, plus
    the token's active experts (top-k in every MoE layer)."""
    experts = engine.layout.expert_tensor_names()
    dense = sum(t.nbytes for n, t in engine.checkpoint.tensors.items()
                if n not in experts and not n.endswith("embed_tokens.weight"))
    return dense + engine.top_k * len(engine.layout.layers) * engine.layout.disk_bytes


def roofline(engine, decode_tok_s: float) -> dict:
    """The decode bound of this model on this machine (bytes per token over the best read bandwidth, measured now)
    and the share of it `decode_tok_s` reaches."""
    bw = read_bandwidth()
    best = max(bw.values())
    per_token = bytes_per_token(engine)
    bound = best * 1e9 / per_token
    return {"read_gbps_by_threads": {str(k): round(v, 2) for k, v in bw.items()}, "bytes_per_token": per_token,
            "bound_tok_s": bound, "roofline_ratio": decode_tok_s / bound}


# ---- worker ------------------------------------------------------------------------------------------------------
def worker(spec: dict) -> dict:
    if spec["engine"].get("num_threads") is None:  # every core unless the engine picks (1 for small models)
        torch.set_num_threads(os.cpu_count() or 1)
    drop_file_cache(Path(spec["model"]) if spec["model"] else Path("."))
    cfg = EngineConfig(**spec["engine"]).validate()
    t0 = time.perf_counter()
    engine = Engine(spec["model"], cfg, progress=False)
    load_s = time.perf_counter() - t0
    if spec.get("replay"):
        engine.manager.set_replay(TraceReplay(Trace.load(spec["replay"]), engine.layout.layers, decode_only=True))
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
    tok_s = dec_tokens / dec_s if dec_s else 0.0
    return {
        **(roofline(engine, tok_s) if spec.get("roofline") else {}),
        "expert_kernel": s["expert_kernel"], "expert_slot_dtype": s["expert_slot_dtype"],
        "decode_tok_s": tok_s, "ttft_s": ttft / len(prompts), "load_s": load_s,
        # the counters' own names (moelite.core.counters): decode exact hits over decode evaluations, etc.
        **{k: s[k] for k in ("decode_exact_hit_rate", "decode_read_wait_rate", "exact_hit_rate", "expert_hits",
                             "expert_misses", "expert_reads_in_flight")},
        "expert_bytes_read": s["expert_bytes_read"], "io_seconds": s["io_seconds"],
        "verify_checksums": s["verify_checksums"], "checksum_seconds": s["checksum_seconds"],
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
@dataclass
class BenchPlan:
    """What `run_bench` measures: budgets x cache policies (plus baselines) of one model, each configuration from
    the `engine` fields (EngineConfig keyword arguments, JSON-able) with its own budget and policy."""

    model: str | None
    out: str | Path
    budgets: list[str]
    policies: list[str]
    engine: dict = field(default_factory=dict)
    prompts: str | None = None
    n_prompts: int = 6
    max_tokens: int = 32
    prompt_tokens: int | None = None
    replay: str | None = None
    prefetch_row: bool = True
    upper_bound: bool = True
    cgroup_mem: str | None = None
    timeout: float = 1800.0
    command: str = "moelite bench"
    roofline: bool = False  # the all-resident row also reports the read-bandwidth bound and its share of it

    def validate(self) -> "BenchPlan":
        """ValueError naming the field before any worker starts: every configuration must be a valid EngineConfig."""
        if not self.budgets or not self.policies:
            raise ValueError("budgets/policies: give at least one of each")
        for b in self.budgets:
            for p in self.policies:
                EngineConfig(**dict(self.engine, expert_budget=b, cache_policy=p)).validate()
        if self.cgroup_mem is not None:
            parse_budget(self.cgroup_mem)
        for name in ("n_prompts", "max_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: {getattr(self, name)!r} must be an int >= 1")
        if self.replay is not None and not Path(self.replay).is_file():
            raise ValueError(f"replay: {self.replay} does not exist")
        return self

    @property
    def runs(self) -> int:
        """Worker processes the plan starts."""
        per_budget = len(self.policies) + (1 if self.prefetch_row else 0)
        return len(self.budgets) * per_budget + 1 + (1 if self.upper_bound else 0)


def run_bench(plan: BenchPlan, progress: bool = False, echo: bool = True) -> dict:
    plan.validate()
    out = Path(plan.out)
    out.mkdir(parents=True, exist_ok=True)
    model = str(Path(plan.model).resolve()) if plan.model else None
    budgets, policies = plan.budgets, plan.policies
    base_engine = dict(plan.engine, cache_policy="lru")
    common = {"model": model, "prompts": plan.prompts, "n_prompts": plan.n_prompts, "max_tokens": plan.max_tokens,
              "prompt_tokens": plan.prompt_tokens,
              "replay": str(Path(plan.replay).resolve()) if plan.replay else None}
    cap = MemoryCap(int(parse_budget(plan.cgroup_mem)[1]) if plan.cgroup_mem else None)
    bar = tqdm(total=plan.runs, desc="bench", unit="config", disable=not progress)

    def say(line: str) -> None:
        if echo:
            (bar.write if progress else print)(line)
            sys.stdout.flush()

    say(f"# {cap.note}")
    rows = []

    def go(label, policy, budget, uncapped=False, roofline=False, **engine):
        spec = dict(common, roofline=roofline,
                    engine=dict(base_engine, cache_policy=policy, expert_budget=budget, **engine))
        if label == "policy" and policy == "lru" and not engine.get("prefetch"):
            spec["record"] = str(out / f"trace_{budget.replace('%', 'pct')}.npz")
        t0 = time.perf_counter()
        res = run_worker(spec, None if uncapped else cap, plan.timeout)
        res.update(kind=label, policy=policy, budget=budget, prefetch=bool(spec["engine"].get("prefetch")),
                   miss_policy=spec["engine"].get("miss_policy", "load"), wall_s=time.perf_counter() - t0,
                   capped=cap.path is not None and not uncapped)
        rows.append(res)
        bar.update(1)
        say(_row(res))
        return res

    say(_header())
    try:
        if plan.upper_bound:  # holds every expert, so it runs without the cap (it would not fit under it)
            go("all-resident", "lru", "100%", uncapped=True, warm_start=True, roofline=plan.roofline)
        go("on-demand", "lru", budgets[0], miss_policy="direct")
        for b in budgets:
            for p in policies:
                go("policy", p, b)
            if plan.prefetch_row:
                go("policy+prefetch", policies[-1] if "score" not in policies else "score", b, prefetch=True)
    finally:
        bar.close()
        cap.close()
    rows += _belady_rows(rows, budgets, out)
    for r in rows:
        if r.get("simulated"):
            say(_row(r))
    result = {"hardware": hardware(plan.engine.get("device", "cpu")), "date": time.strftime("%Y-%m-%d"),
              "model": Path(model).name if model else "demo", "replay": Path(plan.replay).name if plan.replay else None,
              "cap": cap.note, "command": plan.command, "rows": rows}
    (out / "results.json").write_text(json.dumps(result, indent=1))
    _plots(rows, budgets, out)
    result["summary"] = _summary(rows, budgets)
    (out / "results.json").write_text(json.dumps(result, indent=1))
    return result


def _belady_rows(rows: list[dict], budgets: list[str], out: Path) -> list[dict]:
    """Belady (and the simulator's LRU, as a check) on each budget's trace recorded by its LRU run."""
    extra = []
    for b in budgets:
        tpath = out / f"trace_{b.replace('%', 'pct')}.npz"
        lru_row = next((r for r in rows if r["kind"] == "policy" and r["budget"] == b and r["policy"] == "lru"), None)
        if not tpath.is_file() or not lru_row or not lru_row.get("survived"):
            continue
        tr = Trace.load(tpath)
        slots = lru_row["expert_slots"]
        sim = {p: simulate(tr, slots, p)["hit_rate"] for p in ("belady", "lru")}
        extra.append({"kind": "belady (offline)", "policy": "belady", "budget": b, "decode_exact_hit_rate": sim["belady"],
                      "sim_lru_hit_rate": sim["lru"], "survived": True, "simulated": True})
    return extra


def summarize(results_json: str | Path, echo: bool = True) -> dict:
    """Re-read an earlier run's results.json: print its table, redraw its plots, recompute and store its summary."""
    path = Path(results_json)
    if not path.is_file():
        raise ValueError(f"summarize: {path} does not exist")
    result = json.loads(path.read_text())
    budgets = sorted({r["budget"] for r in result["rows"] if r["kind"] != "all-resident"}, key=str)
    for r in result["rows"] if echo else ():
        print(_row(r))
    _plots(result["rows"], budgets, path.parent)
    result["summary"] = _summary(result["rows"], budgets)
    path.write_text(json.dumps(result, indent=1))
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
        return f"{name:<22}{r['budget']:>8}{'-':>14}{r['decode_exact_hit_rate']:>10.1%}   (simulated; simulator LRU {r['sim_lru_hit_rate']:.1%})"
    return (f"{name:<22}{r['budget']:>8}{r['decode_tok_s']:>14.2f}{r['decode_exact_hit_rate']:>10.1%}"
            f"{r['expert_bytes_read'] / 2**30:>10.2f}{r['stall_seconds']:>9.1f}{r['prefetch_precision']:>9.2f}"
            f"{r['peak_rss_bytes'] / 2**30:>14.2f}{'yes':>4}")


def _summary(rows, budgets) -> dict:
    """Per budget: the fastest online configuration, its speed-up over on-demand loading, the best demand-only hit
    rate (prefetch excluded: Belady bounds demand caching) against Belady's, and prefetch's effect on stalls."""
    ok = [r for r in rows if r.get("survived") and not r.get("simulated")]
    demand = next((r for r in ok if r["kind"] == "on-demand"), None)
    out = {"budget_never_exceeded": all(r["resident_expert_bytes_peak"] <= r["expert_budget_bytes"] for r in ok)}
    top = next((r for r in ok if r["kind"] == "all-resident" and "bound_tok_s" in r), None)
    if top is not None:
        out["roofline"] = {k: top[k] for k in ("decode_tok_s", "bound_tok_s", "roofline_ratio", "bytes_per_token",
                                               "read_gbps_by_threads", "expert_kernel", "expert_slot_dtype")}
    for b in budgets:
        online = [r for r in ok if r["kind"].startswith("policy") and r["budget"] == b]
        if not online:
            continue
        best = max(online, key=lambda r: r["decode_tok_s"])
        plain = [r for r in online if not r["prefetch"]]
        bel = next((r for r in rows if r["kind"].startswith("belady") and r["budget"] == b), None)
        hit = {r["policy"]: r["decode_exact_hit_rate"] for r in plain}
        entry = {"best": f"{best['policy']}{'+prefetch' if best['prefetch'] else ''}",
                 "best_decode_tok_s": best["decode_tok_s"],
                 "speedup_vs_on_demand": best["decode_tok_s"] / demand["decode_tok_s"]
                 if demand and demand["decode_tok_s"] else None,
                 "hit_rate_by_policy": hit,
                 "best_online_hit_rate": max(hit.values()) if hit else None,
                 "belady_hit_rate": bel["decode_exact_hit_rate"] if bel else None}
        for r in online:
            if r["prefetch"]:
                base = next((q for q in plain if q["policy"] == r["policy"]), None)
                entry["prefetch"] = {"policy": r["policy"], "stall_s": r["stall_seconds"],
                                     "stall_s_without": base["stall_seconds"] if base else None,
                                     "precision": r["prefetch_precision"], "recall": r["prefetch_recall"],
                                     "decode_exact_hit_rate": r["decode_exact_hit_rate"],
                                     "decode_tok_s": r["decode_tok_s"]}
        out[b] = entry
    return out


def _plots(rows, budgets, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def x_of(b):
        kind, v = parse_budget(b)
        return v * 100 if kind == "fraction" else v / 2**30

    unit = "% of routed experts" if parse_budget(budgets[0])[0] == "fraction" else "GiB"
    series: dict[str, list] = {}
    for r in rows:
        if r["kind"] in ("policy", "policy+prefetch", "belady (offline)") and r.get("survived"):
            name = "belady (offline)" if r["kind"].startswith("belady") else r["policy"] + ("+prefetch" if r.get("prefetch") else "")
            series.setdefault(name, []).append(r)
    for metric, fname, label in (("decode_exact_hit_rate", "hit_rate.png", "decode exact hit rate"),
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


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        print(json.dumps(worker(json.loads(sys.argv[2]))))
    else:
        print("usage: python -m moelite.eval.bench --worker SPEC_JSON (internal); use `moelite bench`", file=sys.stderr)
        sys.exit(2)
