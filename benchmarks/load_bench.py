"""Load benchmark for `moelite serve`: concurrent streaming clients with mixed domains and SLOs.

  python benchmarks/load_bench.py soak    --clients 16 --minutes 5 --max-batch 16 --disconnect-frac 0.1
  python benchmarks/load_bench.py compare --rates 1.5,3,6,12 --minutes 1 --modes fcfs,slo

soak: N closed-loop clients stream requests back to back for M minutes (a tenth of them close the connection
mid-stream, after 1-4 chunks, on every request); reports lost requests and 5xx (must be 0), RSS growth after
warm-up (< 5%), and that the server has no running or queued work afterwards (no leaked work). compare: the same
seeded Poisson arrival schedule (task mix, prompts) at each rate against a server per admission mode, the modes
interleaved rate by rate so a slow spell of a shared machine hits both alike; reports the share of requests
meeting their TTFT target, goodput (requests meeting TTFT and TPOT targets per wall second, first request to last
response), p50/p99 TTFT and TPOT of completed requests, errors by status, lost requests. A refused (429) request
counts as not meeting its target; a deliberate client disconnect is left out of the shares.

Both spawn servers on free loopback ports (`python -m moelite.cli serve ...`, default: the embedded demo model)
unless `--url` points at a running one (soak only; loopback addresses only). SLO targets are fixed per task (TASKS,
scaled by --target-scale for other hardware) and sent with each request; each task's idle TTFT / TPOT on the
server (median of a few sequential requests) is measured first and reported beside them. Client counts, rates,
in-flight requests and durations are bounded. Writes JSON + PNG under benchmarks/results/load/ and prints the
JSON summary (without the RSS series) as the last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import random
import re
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import httpx

OUT_DIR = Path(__file__).resolve().parent / "results" / "load"
PROMPTS = {
    "chat": ["Tell me about the sea.", "Who was Romeo?", "Speak of love and war.", "What is a kingdom worth?",
             "Describe a storm at night."],
    "code": ["def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
             "import os\n\n\ndef list_files(root):\n", "class Stack:\n    def __init__(self):\n",
             "def parse_args(argv=None):\n    parser = argparse.ArgumentParser(", "for key, value in sorted(items"],
    "summarize": [  # the longest prompts; short enough for a 256-token byte-level context (fallback model)
        "The river rises in the northern hills and flows south through farms and small towns. The railway came "
        "in 1871 and the mills closed. Summary:",
        "The observatory was founded in 1890 above the city. Its telescope timed the ships' clocks; city lights "
        "later ended the research. Summary:",
        "The festival began as a harvest market in the old square and grew into a week of music, food and boat "
        "races on the lake. Summary:"],
}
# task -> (endpoint, max_tokens, TTFT target s, TPOT target s); targets are multiplied by --target-scale
TASKS = {"chat": ("chat", 32, 0.3, 0.15), "code": ("completions", 48, 0.6, 0.15),
         "summarize": ("completions", 40, 1.2, 0.2)}
LIMITS = {"clients": 64, "minutes": 30.0, "rate": 50.0, "inflight": 512}


# ---- one request ------------------------------------------------------------------------------------------------
async def one_request(client: httpx.AsyncClient, task: str, targets: dict, rng: random.Random,
                      disconnect_after: int | None = None) -> dict:
    endpoint, max_tokens, *_ = TASKS[task]
    prompt = rng.choice(PROMPTS[task])
    body = {"max_tokens": max_tokens, "stream": True, "stream_options": {"include_usage": True}, "temperature": 0.8,
            "task": task, "ttft_ms": targets[task]["ttft_s"] * 1000, "tpot_ms": targets[task]["tpot_s"] * 1000}
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
        path = "/v1/chat/completions"
    else:
        body["prompt"] = prompt
        path = "/v1/completions"
    rec = {"task": task, "status": None, "outcome": "lost", "ttft_s": None, "tpot_s": None, "tokens": 0,
           "t_send": time.monotonic()}
    t0 = time.perf_counter()
    t_first = t_last = None
    chunks = 0
    try:
        async with client.stream("POST", path, json=body) as r:
            rec["status"] = r.status_code
            if r.status_code != 200:
                body = await r.aread()
                rec["outcome"] = f"http_{r.status_code}"
                rec["message"] = body[:300].decode("utf-8", "replace")
                rec["retry_after"] = float(r.headers.get("retry-after", 0) or 0)
                return rec
            async for line in r.aiter_lines():
                if not line.startswith("data: "):
                    continue
                if line == "data: [DONE]":
                    rec["outcome"] = "ok"
                    break
                obj = json.loads(line[6:])
                if "error" in obj:
                    rec["outcome"] = "stream_error"
                    break
                if obj.get("usage"):
                    rec["tokens"] = obj["usage"]["completion_tokens"]
                for ch in obj.get("choices", []):
                    piece = ch.get("text") if "text" in ch else (ch.get("delta") or {}).get("content")
                    if piece or ch.get("finish_reason"):
                        now = time.perf_counter()
                        t_first = t_first or now
                        t_last = now
                        chunks += 1
                if disconnect_after is not None and chunks >= disconnect_after and not any(
                        ch.get("finish_reason") for ch in obj.get("choices", [])):
                    rec["outcome"] = "disconnected"  # deliberate: leave mid-stream
                    break
    except (httpx.HTTPError, json.JSONDecodeError) as exc:
        rec["outcome"] = "lost"
        rec["error"] = type(exc).__name__
    if t_first is not None:
        rec["ttft_s"] = t_first - t0
        if rec["tokens"] > 1:
            rec["tpot_s"] = (t_last - t_first) / (rec["tokens"] - 1)
    return rec


def met(rec: dict, targets: dict) -> tuple[bool, bool]:
    t = targets[rec["task"]]
    ok = rec["outcome"] == "ok"
    ttft = ok and rec["ttft_s"] is not None and rec["ttft_s"] <= t["ttft_s"]
    tpot = ok and (rec["tpot_s"] is None or rec["tpot_s"] <= t["tpot_s"])
    return ttft, ttft and tpot


# ---- server side ------------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_server(args, mode: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    cmd = [sys.executable, "-m", "moelite.cli", "serve", "--port", str(port), "--scheduler", mode, "--max-batch",
           str(args.max_batch), "--max-queue", str(args.max_queue), "--num-threads", str(args.threads),
           "--log-level", "warning", *(["--model", args.model] if args.model else []), *args.server_arg]
    log = open(Path(tempfile.gettempdir()) / f"moelite-load-bench-{mode}-{port}.log", "w")  # not in the repo
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=Path(__file__).resolve().parents[1])
    url = f"http://127.0.0.1:{port}"
    t0 = time.time()
    while time.time() - t0 < 300:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server did not start within 300 s")


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(120)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


async def scrape(client: httpx.AsyncClient) -> dict:
    text = (await client.get("/metrics")).text
    out = {}
    for name in ("moelite_process_rss_bytes", "moelite_queue_depth", "moelite_running_requests",
                 "moelite_tokens_per_second", "moelite_generated_tokens_total", "moelite_expert_exact_hit_rate"):
        m = re.search(rf"^{name} ([0-9.e+-]+)$", text, re.M)
        out[name.replace("moelite_", "")] = float(m.group(1)) if m else None
    out["cancelled"] = sum(float(v) for v in re.findall(r'moelite_requests_total\{[^}]*outcome="cancelled"\} (\S+)',
                                                         text))
    return out


async def sampler(client, samples: list, t0: float, stop: asyncio.Event, every: float = 1.0) -> None:
    while not stop.is_set():
        try:
            s = await scrape(client)
            s["t"] = time.monotonic() - t0
            samples.append(s)
        except httpx.HTTPError:
            pass
        try:
            await asyncio.wait_for(stop.wait(), every)
        except asyncio.TimeoutError:
            pass


async def wait_idle(client, timeout: float = 30.0) -> dict:
    t0 = time.monotonic()
    while True:
        s = await scrape(client)
        if (s["running_requests"] == 0 and s["queue_depth"] == 0) or time.monotonic() - t0 > timeout:
            s["idle_after_s"] = time.monotonic() - t0
            return s
        await asyncio.sleep(0.2)


async def calibrate(client, scale: float, n: int = 5) -> dict:
    """Targets per task (TASKS x scale), with the idle TTFT / TPOT (median of n sequential requests) for context."""
    loose = {t: {"ttft_s": 3600.0, "tpot_s": 600.0} for t in TASKS}
    rng = random.Random(0)
    await one_request(client, "code", loose, rng)  # warm-up
    targets = {}
    for task, (_, _, ttft_s, tpot_s) in TASKS.items():
        recs = [await one_request(client, task, loose, rng) for _ in range(n)]
        ttft = statistics.median(r["ttft_s"] for r in recs if r["ttft_s"] is not None)
        tpot = statistics.median([r["tpot_s"] for r in recs if r["tpot_s"] is not None] or [0.0])
        targets[task] = {"idle_ttft_s": round(ttft, 4), "idle_tpot_s": round(tpot, 4),
                         "ttft_s": round(scale * ttft_s, 3), "tpot_s": round(scale * tpot_s, 3)}
    return targets


def summarize(recs: list[dict], targets: dict, duration: float) -> dict:
    """duration: wall seconds from the first request to the last response (rates are per second of it)."""
    def pct(xs, q):
        xs = sorted(xs)
        return round(xs[min(len(xs) - 1, int(q * len(xs)))], 4) if xs else None
    ok = [r for r in recs if r["outcome"] == "ok"]
    judged = [r for r in recs if r["outcome"] != "disconnected"]  # a client that left on purpose has no SLO
    ttft_met = sum(met(r, targets)[0] for r in judged)
    good = sum(met(r, targets)[1] for r in judged)
    by_status: dict[str, int] = {}
    for r in recs:
        if r["outcome"] not in ("ok", "disconnected"):
            by_status[r["outcome"]] = by_status.get(r["outcome"], 0) + 1
    ttfts = [r["ttft_s"] for r in ok if r["ttft_s"] is not None]
    tpots = [r["tpot_s"] for r in ok if r["tpot_s"] is not None]
    return {"requests": len(recs), "completed": len(ok), "disconnected": sum(r["outcome"] == "disconnected"
                                                                              for r in recs),
            "ttft_met_frac": round(ttft_met / len(judged), 4) if judged else None,
            "slo_met_frac": round(good / len(judged), 4) if judged else None,
            "goodput_rps": round(good / duration, 3), "throughput_rps": round(len(ok) / duration, 3),
            "ttft_p50_s": pct(ttfts, 0.5), "ttft_p99_s": pct(ttfts, 0.99), "tpot_p50_s": pct(tpots, 0.5),
            "tpot_p99_s": pct(tpots, 0.99), "errors": by_status,
            "lost": sum(r["outcome"] in ("lost", "stream_error") for r in recs),
            "http_5xx": sum(1 for r in recs if (r["status"] or 0) >= 500)}


# ---- scenarios --------------------------------------------------------------------------------------------------
async def run_soak(args, url: str) -> dict:
    duration = args.minutes * 60
    n_disc = math.ceil(args.clients * args.disconnect_frac) if args.disconnect_frac > 0 else 0
    limits = httpx.Limits(max_connections=args.clients + 4, max_keepalive_connections=args.clients + 4)
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(120.0), limits=limits, headers=args.headers) as c:
        targets = await calibrate(c, args.target_scale)
        samples: list = []
        recs: list = []
        t0 = time.monotonic()
        stop = asyncio.Event()
        samp = asyncio.create_task(sampler(c, samples, t0, stop))

        async def client(i: int):
            rng = random.Random(1000 + i)
            while time.monotonic() - t0 < duration:
                task = rng.choice(list(TASKS))
                rec = await one_request(c, task, targets, rng, rng.randint(1, 4) if i < n_disc else None)
                rec["client"] = i
                recs.append(rec)
                if rec["outcome"].startswith("http_"):
                    await asyncio.sleep(min(2.0, rec.get("retry_after") or 0.5))
        await asyncio.gather(*(client(i) for i in range(args.clients)))
        wall = time.monotonic() - t0
        after = await wait_idle(c)
        stop.set()
        await samp
    warm = [s for s in samples if s["t"] >= args.warmup_frac * wall and s["process_rss_bytes"]]
    rss0 = warm[0]["process_rss_bytes"] if warm else None
    rss_end = warm[-1]["process_rss_bytes"] if warm else None
    res = {"scenario": "soak", "url_spawned": args.url is None, "clients": args.clients,
           "disconnecting_clients": n_disc, "minutes": args.minutes, "wall_s": round(wall, 1), "targets": targets,
           **summarize(recs, targets, wall),
           "rss_after_warmup_bytes": rss0, "rss_end_bytes": rss_end,
           "rss_max_after_warmup_bytes": max((s["process_rss_bytes"] for s in warm), default=None),
           "rss_growth_after_warmup": round((rss_end - rss0) / rss0, 4) if rss0 else None,
           "server_idle_after_s": round(after["idle_after_s"], 2), "server_running_after": after["running_requests"],
           "server_queue_after": after["queue_depth"], "server_cancelled_total": after["cancelled"]}
    res["pass"] = bool(res["lost"] == 0 and res["http_5xx"] == 0 and res["rss_growth_after_warmup"] is not None
                       and res["rss_growth_after_warmup"] < 0.05 and after["running_requests"] == 0
                       and after["queue_depth"] == 0)
    res["rss_series"] = [(round(s["t"], 1), s["process_rss_bytes"], s["running_requests"], s["queue_depth"])
                         for s in samples]
    return res


async def run_rate(url: str, rate: float, duration: float, targets: dict, seed: int, inflight: int, headers) -> dict:
    rng = random.Random(seed)  # same seed per rate -> the same schedule for every mode
    schedule, t = [], 0.0
    while True:
        t += rng.expovariate(rate)
        if t >= duration:
            break
        schedule.append((t, rng.choice(list(TASKS)), rng.randrange(1 << 30)))
    limits = httpx.Limits(max_connections=inflight, max_keepalive_connections=64)
    sem = asyncio.Semaphore(inflight)
    recs: list = []
    async with httpx.AsyncClient(base_url=url, timeout=httpx.Timeout(300.0), limits=limits, headers=headers) as c:
        samples: list = []
        t0 = time.monotonic()
        stop = asyncio.Event()
        samp = asyncio.create_task(sampler(c, samples, t0, stop))

        async def fire(at, task, s):
            await asyncio.sleep(max(0.0, at - (time.monotonic() - t0)))
            async with sem:
                recs.append(await one_request(c, task, targets, random.Random(s)))
        await asyncio.gather(*(fire(*x) for x in schedule))
        wall = time.monotonic() - t0
        after = await wait_idle(c)
        stop.set()
        await samp
    res = {"rate_rps": rate, "offered": len(schedule), **summarize(recs, targets, wall),
           "sample_errors": [r["message"] for r in recs if r.get("message")][:5],
           "wall_s": round(wall, 1), "server_idle_after_s": round(after["idle_after_s"], 2)}
    res["rss_series"] = [(round(s["t"], 1), s["process_rss_bytes"], s["running_requests"], s["queue_depth"])
                         for s in samples]
    return res


async def run_compare(args) -> dict:
    out = {"scenario": "compare", "rates": args.rates, "minutes_per_rate": args.minutes, "modes": args.modes,
           "max_batch": args.max_batch, "max_queue": args.max_queue, "runs": []}
    servers = {}
    try:
        for mode in args.modes:  # all servers up front; the idle ones cost no CPU
            servers[mode] = spawn_server(args, mode)
        async with httpx.AsyncClient(base_url=servers[args.modes[0]][1], timeout=120, headers=args.headers) as c:
            targets = await calibrate(c, args.target_scale)  # the same targets for every mode
        out["targets"] = targets
        for rate in args.rates:
            for mode in args.modes:  # interleaved, so a slow spell of the shared machine hits both modes alike
                r = await run_rate(servers[mode][1], rate, args.minutes * 60, targets, args.seed, args.inflight,
                                   args.headers)
                r["mode"] = mode
                out["runs"].append(r)
                print(f"{mode:5s} rate {rate:5.2f}/s: TTFT met {r['ttft_met_frac']:.1%}, goodput "
                      f"{r['goodput_rps']:.2f}/s, errors {r['errors']}, lost {r['lost']}", file=sys.stderr, flush=True)
    finally:
        out["server_exit"] = {mode: stop_server(proc) for mode, (proc, _) in servers.items()}
    table = {}
    for r in out["runs"]:
        table.setdefault(r["rate_rps"], {})[r["mode"]] = r["ttft_met_frac"]
    out["ttft_met_by_rate"] = table
    if {"fcfs", "slo"} <= set(args.modes):
        wins = [(rate, v["slo"] - v["fcfs"]) for rate, v in table.items() if v.get("fcfs", 1) < 0.5]
        out["fcfs_below_half_rates"] = [w[0] for w in wins]
        out["slo_gain_points_at_those_rates"] = [round(100 * w[1], 1) for w in wins]
        out["pass"] = any(w[1] >= 0.20 for w in wins)  # at some rate where FCFS < 50%: SLO >= 20 points more
    return out


# ---- plots and main ---------------------------------------------------------------------------------------------
def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if res["scenario"] == "soak":
        fig, ax = plt.subplots(figsize=(8, 4))
        s = res["rss_series"]
        ax.plot([x[0] for x in s], [x[1] / 2**20 for x in s], label="server RSS (MiB)")
        ax.set_xlabel("time (s)")
        ax.set_ylabel("RSS (MiB)")
        ax2 = ax.twinx()
        ax2.plot([x[0] for x in s], [x[2] for x in s], color="tab:orange", alpha=0.5, label="running")
        ax2.set_ylabel("running sequences")
        ax.set_title(f"soak: {res['clients']} streaming clients, {res['minutes']} min, RSS growth after warm-up "
                     f"{100 * (res['rss_growth_after_warmup'] or 0):.1f}%", fontsize=9)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, loc="lower right")
    else:
        fig, axes = plt.subplots(1, 3, figsize=(13, 4))
        for mode in res["modes"]:
            runs = [r for r in res["runs"] if r["mode"] == mode]
            rates = [r["rate_rps"] for r in runs]
            axes[0].plot(rates, [100 * r["ttft_met_frac"] for r in runs], "o-", label=mode)
            axes[1].plot(rates, [r["goodput_rps"] for r in runs], "o-", label=mode)
            axes[2].plot(rates, [r["ttft_p99_s"] or 0 for r in runs], "o-", label=mode)
        for ax, title in zip(axes, ("requests meeting TTFT target (%)", "goodput (req/s meeting TTFT+TPOT)",
                                    "p99 TTFT of completed (s)")):
            ax.set_xlabel("arrival rate (req/s)")
            ax.set_title(title, fontsize=9)
            ax.legend()
        axes[0].axhline(50, color="grey", lw=0.5)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("scenario", choices=("soak", "compare"))
    p.add_argument("--url", default=None, help="a running server (loopback only; soak only). Default: spawn one")
    p.add_argument("--api-key", default=os.environ.get("MOELITE_API_KEY"))
    p.add_argument("--model", default=None, help="checkpoint for the spawned server (default: embedded demo model)")
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--minutes", type=float, default=5.0)
    p.add_argument("--disconnect-frac", type=float, default=0.1)
    p.add_argument("--warmup-frac", type=float, default=0.2, help="share of the soak counted as warm-up for RSS")
    p.add_argument("--rates", default="1.5,3,6,12", help="arrival rates (req/s), comma-separated")
    p.add_argument("--modes", default="fcfs,slo")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-scale", type=float, default=1.0, help="multiply every task's TTFT/TPOT target")
    p.add_argument("--inflight", type=int, default=256, help="client-side cap on concurrent requests")
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-queue", type=int, default=64)
    p.add_argument("--threads", type=int, default=1, help="server --num-threads")
    p.add_argument("--mode", default="slo", help="admission mode of the soak's spawned server")
    p.add_argument("--server-arg", action="append", default=[], help="extra argument for `moelite serve`")
    p.add_argument("--tag", default=None, help="output file name stem")
    args = p.parse_args(argv)
    args.rates = [float(x) for x in args.rates.split(",") if x]
    args.modes = [m for m in args.modes.split(",") if m]
    bad = [("clients", args.clients, 1, LIMITS["clients"]), ("minutes", args.minutes, 0.05, LIMITS["minutes"]),
           ("inflight", args.inflight, 1, LIMITS["inflight"]), ("disconnect-frac", args.disconnect_frac, 0, 1)]
    bad += [("rates", r, 0.01, LIMITS["rate"]) for r in args.rates]
    for name, v, lo, hi in bad:
        if not lo <= v <= hi:
            p.error(f"--{name}: {v} is outside [{lo}, {hi}]")
    if set(args.modes) - {"fcfs", "slo"}:
        p.error("--modes: use fcfs and/or slo")
    if args.url:
        host = urlparse(args.url).hostname or ""
        if host not in ("127.0.0.1", "localhost", "::1"):
            p.error("--url: loopback addresses only")
        if args.scenario == "compare":
            p.error("--url: compare restarts the server per mode; let it spawn them")
    args.headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    OUT_DIR.mkdir(parents=True, exist_ok=True)
    t_start = time.strftime("%Y%m%d-%H%M%S")
    if args.scenario == "soak":
        proc, url = (None, args.url) if args.url else spawn_server(args, args.mode)
        try:
            res = asyncio.run(run_soak(args, url))
        finally:
            if proc is not None:
                res_exit = stop_server(proc)
        if proc is not None:
            res["server_exit"] = res_exit
    else:
        res = asyncio.run(run_compare(args))
    res["command"] = "python benchmarks/load_bench.py " + " ".join(sys.argv[1:] if argv is None else argv)
    res["hardware"] = f"{os.cpu_count()}-core CPU, no GPU"
    stem = args.tag or f"{args.scenario}_{t_start}"
    (OUT_DIR / f"{stem}.json").write_text(json.dumps(res, indent=1))
    plot(res, OUT_DIR / f"{stem}.png")
    res["png"] = str((OUT_DIR / f"{stem}.png").relative_to(Path(__file__).resolve().parents[1]))
    slim = {k: v for k, v in res.items() if k not in ("rss_series",)}
    if "runs" in slim:
        slim["runs"] = [{k: v for k, v in r.items() if k != "rss_series"} for r in slim["runs"]]
    print(json.dumps(slim))
    return 0


if __name__ == "__main__":
    sys.exit(main())
