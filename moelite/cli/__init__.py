"""Command line: a thin layer over the Python API.

  moelite generate [--model DIR] --prompt TEXT   stream a continuation, then one stats line (--json: a JSON line)
  moelite info [DIR]                             architecture, sizes, and which budgets fit this machine
Engine flags (--expert-budget, --cache-policy, ...) are derived from `EngineConfig`'s fields.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moelite.config import format_bytes

from moelite.cli.flags import add_engine_flags, engine_config, peak_rss_bytes  # noqa: F401


def cmd_generate(args) -> int:
    from moelite.engine import Engine

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    engine = Engine(args.model, engine_config(args), progress=not args.json)
    if engine.budget_note and not args.json:
        print(engine.budget_note, file=sys.stderr)
    box: dict = {}
    out = sys.stdout
    if not args.json:
        out.write(prompt)
        out.flush()
    for piece in engine.stream(prompt, max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                               top_k=args.top_k, stop=args.stop or (), seed=args.seed, _result=box):  # alpha: engine default
        if not args.json:
            out.write(piece)
            out.flush()
    gen = box["generation"]
    s = gen.stats
    total = engine.stats()
    summary = {
        "text": gen.text, "finish_reason": gen.finish_reason, "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": s["completion_tokens"], "ttft_s": round(s.get("ttft_s", 0.0), 4),
        "decode_tok_s": round(s["decode_tok_s"], 2), "expert_hit_rate": round(s["expert_hit_rate"], 4),
        "expert_bytes_read": s["expert_bytes_read"], "stall_seconds": round(s["stall_seconds"], 4),
        "expert_substitutions": s["expert_substitutions"], "peak_rss_bytes": peak_rss_bytes(),
        "expert_budget_bytes": total["expert_budget_bytes"],
        "resident_expert_bytes_peak": total["resident_expert_bytes_peak"],
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"\n-- TTFT {summary['ttft_s'] * 1000:.0f} ms | decode {summary['decode_tok_s']:.1f} tok/s | "
              f"expert hit rate {summary['expert_hit_rate']:.1%} | read {format_bytes(s['expert_bytes_read'])} | "
              f"stall {s['stall_seconds']:.2f} s | "
              f"peak RSS {format_bytes(summary['peak_rss_bytes'])} | budget "
              f"{format_bytes(summary['expert_budget_bytes'])}")
    return 0


def cmd_info(args) -> int:
    from transformers import AutoConfig

    from moelite.core.arch import adapter_for
    from moelite.core.checkpoint import Checkpoint
    from moelite.demo import demo_model_path
    import torch

    from moelite.core.expert_store import ExpertLayout
    from moelite.core.memory import auto_budget

    path = Path(args.model) if args.model else demo_model_path()
    ckpt = Checkpoint.open(path, allow_pickle=args.allow_pickle)
    adapter = adapter_for(ckpt.model_type)
    cfg = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    n_exp, top_k = adapter.num_experts(cfg), adapter.top_k(cfg)
    layout = ExpertLayout.build(ckpt, adapter, n_exp)
    names = layout.expert_tensor_names()
    dense = sum(t.nbytes for n, t in ckpt.tensors.items() if n not in names)
    expert_bytes = layout.total_disk_bytes
    fp32_scale = 4 / layout.disk_dtype.itemsize
    per_expert32 = layout.disk_bytes * fp32_scale
    auto = auto_budget("cpu", int(dense * fp32_scale), cfg, torch.float32, int(per_expert32 * len(layout.experts)))
    info = {
        "model": path.name, "model_type": ckpt.model_type, "layers": int(cfg.num_hidden_layers),
        "moe_layers": len(layout.layers), "routed_experts_per_layer": n_exp, "top_k": top_k,
        "hidden": layout.hidden, "expert_intermediate": layout.intermediate, "checkpoint_dtype": str(layout.disk_dtype),
        "dense_bytes": dense, "routed_expert_bytes": expert_bytes, "expert_bytes_each": layout.disk_bytes,
        "min_budget_bytes_fp32": int(top_k * per_expert32), "available_ram_bytes": auto.available,
        "available_ram_source": auto.source, "max_budget_fitting_ram_fp32": auto.bytes,
        "auto_budget_note_cpu": auto.note,
    }
    if torch.cuda.is_available():
        gpu = auto_budget("cuda", dense, cfg, layout.disk_dtype, expert_bytes)
        info.update(auto_budget_bytes_cuda=gpu.bytes, auto_budget_note_cuda=gpu.note)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{info['model']}: {ckpt.model_type}, {info['layers']} layers ({info['moe_layers']} MoE), "
          f"{n_exp} routed experts/layer, top-{top_k}, hidden {layout.hidden}, expert intermediate {layout.intermediate}")
    print(f"  dense weights      {format_bytes(dense)} ({layout.disk_dtype} on disk)")
    print(f"  routed experts     {format_bytes(expert_bytes)} = {len(layout.experts)} x {format_bytes(layout.disk_bytes)}")
    print(f"  minimum budget     {format_bytes(info['min_budget_bytes_fp32'])} (top-{top_k} experts as float32 on CPU)")
    pct = auto.bytes / (per_expert32 * len(layout.experts))
    print(f"  this machine (CPU) {auto.note} ({pct:.0%} of the experts as float32)")
    if "auto_budget_note_cuda" in info:
        print(f"  this machine (GPU) {info['auto_budget_note_cuda']} "
              f"({info['auto_budget_bytes_cuda'] / expert_bytes:.0%} of the experts)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moelite", description="Run MoE LLMs with offloaded experts under a budget.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="stream a continuation of a prompt")
    g.add_argument("--model", default=None, help="Hugging Face checkpoint folder (default: the embedded demo model)")
    g.add_argument("--prompt", default=None, help="prompt text (default: read standard input)")
    g.add_argument("--max-tokens", type=int, default=64)
    g.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    g.add_argument("--top-p", type=float, default=0.95)
    g.add_argument("--top-k", type=int, default=0)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--json", action="store_true", help="print only a JSON line with text and stats")
    add_engine_flags(g)
    g.set_defaults(func=cmd_generate)

    i = sub.add_parser("info", help="describe a checkpoint and which budgets fit this machine")
    i.add_argument("model", nargs="?", default=None)
    i.add_argument("--allow-pickle", action="store_true")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_info)

    # subcommands that live beside the concern they wrap: each module has register_cli(subparsers)
    import importlib

    missing = []
    for name in _SUBCOMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            # a broken install (a dependency removed) must not take the other commands down with it
            if exc.name and not exc.name.startswith("moelite"):
                missing.append(f"{name.rsplit('.', 1)[1]} (needs {exc.name}: pip install {exc.name})")
            continue
        mod.register_cli(sub)
    if missing:
        p.epilog = "unavailable here: " + "; ".join(missing)
    return p


_SUBCOMMAND_MODULES = ("moelite.eval.bench", "moelite.eval.evaluate", "moelite.eval.tune", "moelite.eval.calibrate", "moelite.serve.server", "moelite.core.traces",
                       "moelite.eval.realshape", "moelite.cli.predict")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as exc:  # CheckpointError is a ValueError
        print(f"moelite: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
