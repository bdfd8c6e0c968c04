"""Cold read latency of one expert at a time: moelite's reader through the page cache against O_DIRECT.

usage: python3 benchmarks/read_latency.py CHECKPOINT [--experts 40] [--rounds 2]

For each mode, interleaved over --rounds, the OS page cache is emptied (needs root: /proc/sys/vm/drop_caches; without
it the figures are not cold and the output says so), then --experts experts picked at random (a fresh pick per round
and mode) are read one after another with `ExpertReader.read_bytes` into one slot-sized buffer, exactly as a miss
reads them (checksums off):
  page-cache   direct_io=False: the range announced with WILLNEED, read in READ_CHUNK pieces, pages dropped after
  o_direct     direct_io=True: O_DIRECT in direct_io.CHUNK pieces, the range split over direct_io.STREAMS threads
Prints the median, p10 and p90 milliseconds per expert and GB/s per mode, the CPU flags and the commit; the JSON line
is last.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import time
from pathlib import Path

import torch

from moelite.core import direct_io
from moelite.core.arch import adapter_for
from moelite.core.checkpoint import Checkpoint
from moelite.core.expert_store import ExpertLayout, ExpertReader, SlotPool
from moelite.core.native import cpu_flags


def drop_caches() -> bool:
    try:
        os.sync()
        Path("/proc/sys/vm/drop_caches").write_text("3")
        return True
    except OSError:
        return False


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--experts", type=int, default=40, help="experts read per mode and round")
    ap.add_argument("--rounds", type=int, default=2, help="interleaved rounds of both modes")
    args = ap.parse_args()
    ck = Checkpoint.open(args.checkpoint)
    cfg = ck.config
    n_exp = cfg.get("num_experts") or cfg.get("num_local_experts") or cfg.get("n_routed_experts")
    layout = ExpertLayout.build(ck, adapter_for(ck.model_type), n_exp)
    pool = SlotPool(layout, 0, layout.disk_dtype, torch.device("cpu"))
    dest = torch.empty(layout.numel, dtype=layout.disk_dtype)
    rng = random.Random(0)
    times: dict[str, list[float]] = {"page-cache": [], "o_direct": []}
    cold = True
    for _ in range(args.rounds):
        for mode in times:
            reader = ExpertReader(layout, pool, drop_page_cache=True, direct_io=mode == "o_direct")
            cold &= drop_caches()
            for key in rng.sample(sorted(layout.experts), args.experts):
                t0 = time.perf_counter()
                reader.read_bytes(key, dest, count=False)
                times[mode].append(time.perf_counter() - t0)
            reader.close()
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    out = {"checkpoint": ck.folder.name, "expert_bytes": layout.disk_bytes, "cold": cold, "commit": commit,
           "cpu_flags": list(cpu_flags()), "streams": direct_io.STREAMS, "chunk": direct_io.CHUNK,
           "date": time.strftime("%Y-%m-%d")}
    for mode, t in times.items():
        t = sorted(t)
        med = statistics.median(t)
        out[mode] = {"median_ms": round(med * 1e3, 2), "p10_ms": round(t[len(t) // 10] * 1e3, 2),
                     "p90_ms": round(t[9 * len(t) // 10] * 1e3, 2), "gb_s": round(layout.disk_bytes / med / 1e9, 2)}
        print(f"{mode:11s} median {out[mode]['median_ms']:7.2f} ms/expert  p10 {out[mode]['p10_ms']:7.2f}  "
              f"p90 {out[mode]['p90_ms']:7.2f}  {out[mode]['gb_s']:.2f} GB/s")
    if not cold:
        print("# the page cache could not be emptied (not root): these reads may not be cold")
    print(json.dumps(out))


if __name__ == "__main__":
    main()
