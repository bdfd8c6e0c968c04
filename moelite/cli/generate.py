"""`moelite generate`: stream a continuation of a prompt, then one stats line (--json: one JSON line instead).

Contract: `add_arguments(p)` declares the flags (the engine flags and the sampling flags, all checked before the model
loads); `run(args) -> int` loads the engine, streams the text to stdout and returns the exit status.
"""

from __future__ import annotations

import json
import sys

from moelite.cli.flags import (add_engine_flags, add_json_flag, add_model_flag, add_sampling_flags, engine_config,
                               peak_rss_bytes, sampling_params)
from moelite.config import format_bytes

NAME = "generate"
HELP = "stream a continuation of a prompt"


def add_arguments(p) -> None:
    add_model_flag(p)
    p.add_argument("--prompt", default=None, help="prompt text (default: read standard input)")
    add_sampling_flags(p)
    add_json_flag(p)
    add_engine_flags(p)


def run(args) -> int:
    config, params = engine_config(args), sampling_params(args)  # bad flags fail here, before anything loads
    from moelite.engine import Engine

    prompt = args.prompt if args.prompt is not None else sys.stdin.read()
    engine = Engine(args.model, config, progress=not args.json)
    if engine.budget_note and not args.json:
        print(engine.budget_note, file=sys.stderr)
    box: dict = {}
    out = sys.stdout
    if not args.json:
        out.write(prompt)
        out.flush()
    for piece in engine.stream(prompt, max_tokens=params.max_tokens, temperature=params.temperature,
                               top_p=params.top_p, top_k=params.top_k, stop=params.stop, seed=params.seed,
                               _result=box):  # alpha: the engine's default
        if not args.json:
            out.write(piece)
            out.flush()
    gen = box["generation"]
    s = gen.stats
    total = engine.stats()
    summary = {
        "text": gen.text, "finish_reason": gen.finish_reason, "prompt_tokens": gen.prompt_tokens,
        "completion_tokens": s["completion_tokens"], "ttft_s": round(s.get("ttft_s", 0.0), 4),
        "decode_tok_s": round(s["decode_tok_s"], 2), "exact_hit_rate": round(s["exact_hit_rate"], 4),
        "expert_bytes_read": s["expert_bytes_read"], "stall_seconds": round(s["stall_seconds"], 4),
        "expert_substitutions": s["expert_substitutions"], "peak_rss_bytes": peak_rss_bytes(),
        "expert_budget_bytes": total["expert_budget_bytes"],
        "resident_expert_bytes_peak": total["resident_expert_bytes_peak"],
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"\n-- TTFT {summary['ttft_s'] * 1000:.0f} ms | decode {summary['decode_tok_s']:.1f} tok/s | "
              f"exact hit rate {summary['exact_hit_rate']:.1%} | read {format_bytes(s['expert_bytes_read'])} | "
              f"stall {s['stall_seconds']:.2f} s | "
              f"peak RSS {format_bytes(summary['peak_rss_bytes'])} | budget "
              f"{format_bytes(summary['expert_budget_bytes'])}")
    return 0
