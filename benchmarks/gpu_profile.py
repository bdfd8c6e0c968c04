"""Where a CUDA-graph decode step's time goes: the graph's GPU time, the host's time per step, and the kernels of
one step (run eagerly in graph mode under torch.profiler), on a real-shape checkpoint with every expert in VRAM.

    python benchmarks/gpu_profile.py --layers 16 --out benchmarks/results/gpu/profile_100pct.txt

Last line: JSON (tok/s, graph replay ms, host ms per step, kernels per step, their summed GPU time).
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from torch.profiler import ProfilerActivity, profile

import moelite
from moelite.eval.realshape import make_realshape


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default="/tmp/moelite_gpu_profile", help="where the real-shape checkpoint is written")
    p.add_argument("--layers", type=int, default=16)
    p.add_argument("--preset", default="qwen3-30b-a3b-64e")
    p.add_argument("--compile-decode", action="store_true", help="engine option compile_decode=True")
    p.add_argument("--out", default=None, help="file for the kernel table")
    a = p.parse_args()
    rs = make_realshape(f"{a.work}/rs{a.layers}", preset=a.preset, layers=a.layers, progress=False)
    eng = moelite.load(rs, device="cuda", expert_budget="100%", cache_policy="lru", compile_decode=a.compile_decode)
    eng.eos_ids = set()
    ids = list(range(10, 42))
    eng.generate(ids, max_tokens=16, temperature=0)
    gen = eng.generate(ids, max_tokens=128, temperature=0)
    dec = list(eng._decoders.values())[-1]
    graph, _ = dec.graphs[False]
    torch.cuda.synchronize()
    s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    s.record()
    for _ in range(20):
        graph.replay()
    e.record()
    e.synchronize()
    replay_ms = s.elapsed_time(e) / 20
    t0 = time.perf_counter()
    for _ in range(20):
        dec.step([5])
    dec.flush()
    step_ms = (time.perf_counter() - t0) / 20 * 1e3
    m = eng.manager
    mask = dec.valid[:, None, None, :]
    with torch.inference_mode(), m.capturing(dec.buffers):  # the capture-time path, run eagerly: the profiler
        # sees each kernel
        dec._forward(dec.ids, dec.pos, mask)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            dec._forward(dec.ids, dec.pos, mask)
            torch.cuda.synchronize()
    kernels = [x for x in prof.events() if x.device_type == torch.autograd.DeviceType.CUDA]
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=30, max_name_column_width=70)
    result = {"gpu": torch.cuda.get_device_name(), "layers": a.layers, "compile_decode": a.compile_decode,
              "decode_tok_s": gen.stats["decode_tok_s"], "graph_replay_ms": replay_ms, "host_step_ms": step_ms,
              "kernels_per_step": len(kernels), "kernel_us_sum": sum(x.device_time for x in kernels)}
    if a.out:
        with open(a.out, "w") as f:
            f.write(f"# python benchmarks/gpu_profile.py {' '.join(f'--{k} {v}' for k, v in vars(a).items())}\n")
            f.write(json.dumps(result) + "\n\n" + table + "\n")
    print(table)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
