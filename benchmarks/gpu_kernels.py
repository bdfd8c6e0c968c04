"""Fused expert kernels on the GPU at real expert shapes, against the measured HBM bandwidth.

Candidates for one MoE layer's routed experts, reading the weights from a slot pool laid out as moelite's:
  triton   moelite.core.fused_moe Triton kernels (tokens grouped by slot, weights read once per call)
  torch    gather of the selected slots + batched matmul (the reference backend)
  loop     one F.linear pair per (expert, its tokens), as the per-expert Python path does
Each is checked against a float64 computation first (relative error), then timed as a captured CUDA graph of
20 calls (launch gaps excluded, as in decode) and eagerly, median of --reps. Bytes = distinct selected experts'
weights (each read once is the floor). Last line: JSON.

    python benchmarks/gpu_kernels.py --out benchmarks/results/gpu
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from moelite.core.fused_moe import fused_experts


def hbm_copy_gbps(dev, nbytes=2 << 30, reps=10) -> float:
    a = torch.empty(nbytes // 2, dtype=torch.bfloat16, device=dev)
    b = torch.empty_like(a)
    b.copy_(a)
    times = []
    for _ in range(reps):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        b.copy_(a)
        e.record()
        e.synchronize()
        times.append(s.elapsed_time(e) / 1e3)
    return 2 * nbytes / statistics.median(times) / 1e9  # bytes read + written


def loop_experts(x, gu, dn, slots, w):
    out = torch.zeros_like(x)
    for s in slots.unique().tolist():
        if s < 0:
            continue
        sel = slots == s
        toks = sel.any(1).nonzero().flatten()
        wt = (w * sel).sum(1)[toks]
        g, u = F.linear(x[toks].to(gu.dtype), gu[s]).chunk(2, -1)
        out.index_add_(0, toks, (F.linear(F.silu(g) * u, dn[s]).float() * wt[:, None]).to(x.dtype))
    return out


def time_graph(fn, reps: int, inner: int = 20) -> float:
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(inner):
            fn()
    g.replay()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        g.replay()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b) / 1e3 / inner)
    return statistics.median(times)


def time_eager(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def write(result: dict, out: Path) -> None:
    """gpu_kernels.json and gpu_kernels.md under `out` (--render: the .md again from a saved .json)."""
    out.mkdir(parents=True, exist_ok=True)
    hbm, h, i = result["hbm_copy_gbps"], result["hidden"], result["inter"]
    expert_bytes = 3 * h * i * 2
    (out / "gpu_kernels.json").write_text(json.dumps(result, indent=1))
    lines = [f"# Fused expert kernels, {result['gpu']}, torch {result['torch']}, {result['date']}", "",
             f"HBM copy {hbm:.0f} GB/s (bytes read + written per second; the bandwidth of gpu_bench's bound). "
             f"Expert {h}x{i} bf16 ({expert_bytes / 1e6:.1f} MB), top-{result['top_k']}. 'of HBM' = the distinct "
             "experts' bytes at that rate / the graph time (eager time for loop).", "",
             "| tokens | kernel | distinct experts | rel. error | eager ms | graph ms | GB/s | of HBM |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['tokens']} | {r['kernel']} | {r['distinct_experts']} | {r['error']} |||||")
            continue
        best = r["graph_ms"] or r["eager_ms"]
        gm = f"{r['graph_ms']:.3f}" if r["graph_ms"] else "-"
        frac = r["distinct_experts"] * expert_bytes / (hbm * 1e9) * 1e3 / best
        lines.append(f"| {r['tokens']} | {r['kernel']} | {r['distinct_experts']} | {r['rel_err']:.1e} | "
                     f"{r['eager_ms']:.3f} | {gm} | {r['gbps']:.0f} | {frac:.0%} |")
    tiles = result.get("tiles") or []
    lines += ["", "Triton tiles (gate_up BLOCK_NxBLOCK_K[xWARPSxSTAGES] / down), graph-timed:", "",
              "| tokens | tiles | graph ms | GB/s |", "|---|---|---|---|"]
    lines += [f"| {t['tokens']} | {t['tiles']} | {t.get('graph_ms', float('nan')):.3f} | "
              f"{t.get('gbps', float('nan')):.0f} |" for t in tiles]
    (out / "gpu_kernels.md").write_text("\n".join(lines) + "\n")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--hidden", type=int, default=2048, help="hidden size (Qwen3-30B-A3B: 2048)")
    p.add_argument("--inter", type=int, default=768, help="expert intermediate size (Qwen3-30B-A3B: 768)")
    p.add_argument("--slots", type=int, default=256, help="slots in the pool (several times the L2 cache)")
    p.add_argument("--experts", type=int, default=64, help="experts the router picks from")
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--batches", default="1,4,8,16", help="tokens per call")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--tiles", default="32x128x4x3/32x128x4x3;32x128x4x4/32x128x4x4;32x256x8x3/32x256x8x3;"
                                      "16x256x4x4/32x128x4x4;32x128x2x4/32x128x2x4;64x128x8x3/64x128x8x3",
                   help="Triton tiles to try: 'NxK[xWARPSxSTAGES]/...' (gate_up / down), separated by ';'")
    p.add_argument("--out", default=None, help="folder for gpu_kernels.json / .md")
    p.add_argument("--render", default=None, help="re-render gpu_kernels.md from this saved gpu_kernels.json")
    a = p.parse_args()
    if a.render:
        write(json.loads(Path(a.render).read_text()), Path(a.out or Path(a.render).parent))
        return 0
    dev = torch.device("cuda")
    torch.manual_seed(0)
    h, i = a.hidden, a.inter
    buf = (torch.randn((a.slots, 3 * h * i), device=dev) * 0.02).to(torch.bfloat16)
    gu, dn = buf[:, : 2 * i * h].view(a.slots, 2 * i, h), buf[:, 2 * i * h:].view(a.slots, h, i)
    hbm = hbm_copy_gbps(dev)
    expert_bytes = 3 * h * i * 2
    rows = []
    cands = {"triton": lambda x, s, w: fused_experts(x, buf, h, i, s, w, "triton"),
             "torch": lambda x, s, w: fused_experts(x, buf, h, i, s, w, "torch"),
             "loop": lambda x, s, w: loop_experts(x, gu, dn, s, w)}
    for n in [int(b) for b in a.batches.split(",")]:
        # routing: top-k of random scores over `experts`, each expert mapped to a random slot of the pool
        scores = torch.rand(n, a.experts, device=dev)
        idx = scores.topk(a.top_k, -1).indices
        slot_of = torch.randperm(a.slots, device=dev)[: a.experts]
        slots = slot_of[idx].to(torch.int32)
        w = torch.rand(n, a.top_k, device=dev)
        x = torch.randn(n, h, device=dev, dtype=torch.bfloat16)
        distinct = int(slots.unique().numel())
        floor_s = distinct * expert_bytes / (hbm * 1e9)  # the copy's bytes moved per second, as gpu_bench's bound
        ref = loop_experts(x.double().float(), gu.float(), dn.float(), slots, w).double()
        for name, fn in cands.items():
            row = {"tokens": n, "kernel": name, "distinct_experts": distinct}
            try:
                out = fn(x, slots, w).double()
                row["rel_err"] = float((out - ref).norm() / ref.norm())
                row["eager_ms"] = time_eager(lambda: fn(x, slots, w), a.reps) * 1e3
                row["graph_ms"] = (time_graph(lambda: fn(x, slots, w), a.reps) * 1e3) if name != "loop" else None
                best = row["graph_ms"] or row["eager_ms"]
                row["gbps"] = distinct * expert_bytes / (best / 1e3) / 1e9
                row["of_hbm"] = (floor_s * 1e3) / best
            except Exception as exc:  # a candidate that fails here is reported, not fatal
                row["error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
            rows.append(row)
            print(json.dumps(row), flush=True)
    # tile sizes of the Triton kernels (BLOCK_N, BLOCK_K), same calls, graph-timed
    import moelite.core.fused_moe as fm

    tiles = []
    default = (fm.GATE_UP_TILE, fm.DOWN_TILE)
    for n in (1, 8):
        scores = torch.rand(n, a.experts, device=dev)
        slots = torch.randperm(a.slots, device=dev)[: a.experts][scores.topk(a.top_k, -1).indices].to(torch.int32)
        w = torch.rand(n, a.top_k, device=dev)
        x = torch.randn(n, h, device=dev, dtype=torch.bfloat16)
        distinct = int(slots.unique().numel())
        for t in a.tiles.split(";"):
            gu_t, dn_t = [tuple(int(v) for v in part.split("x")) for part in t.split("/")]
            gu_t, dn_t = gu_t + (4, 3)[len(gu_t) - 2:], dn_t + (4, 3)[len(dn_t) - 2:]
            fm.GATE_UP_TILE, fm.DOWN_TILE = gu_t, dn_t
            try:
                ms = time_graph(lambda: fused_experts(x, buf, h, i, slots, w, "triton"), a.reps) * 1e3
                tiles.append({"tokens": n, "tiles": t, "graph_ms": ms,
                              "gbps": distinct * expert_bytes / (ms / 1e3) / 1e9})
            except Exception as exc:
                tiles.append({"tokens": n, "tiles": t, "error": str(exc)[:200]})
            print(json.dumps(tiles[-1]), flush=True)
    fm.GATE_UP_TILE, fm.DOWN_TILE = default
    result = {"gpu": torch.cuda.get_device_name(dev), "torch": torch.__version__, "hbm_copy_gbps": hbm,
              "hidden": h, "inter": i, "top_k": a.top_k, "rows": rows, "tiles": tiles,
              "date": time.strftime("%Y-%m-%d")}
    if a.out:
        write(result, Path(a.out))
    print(json.dumps({k: v for k, v in result.items() if k != "rows"} | {"rows": len(rows)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
