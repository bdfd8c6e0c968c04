"""`moelite trace`: record a routing trace (.npz, moelite.core.traces) while generating over a prompt set.

Contract: `add_arguments(p)` declares the flags; `run(args) -> int` loads the engine, generates `--max-tokens` tokens
for each prompt (`--repeat` passes), writes the trace to `--out` and prints one JSON line.
"""

from __future__ import annotations

import json

from moelite.cli.flags import add_engine_flags, add_json_flag, add_model_flag, engine_config, positive_int

NAME = "trace"
HELP = "record a routing trace (.npz) over a prompt set"


def add_arguments(p) -> None:
    add_model_flag(p)
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="prompt file, one per line or JSON lines (default: the built-in prompts of three domains)")
    p.add_argument("--max-tokens", type=positive_int, default=64, help="tokens to generate per prompt")
    p.add_argument("--repeat", type=positive_int, default=1, help="passes over the prompt set")
    p.add_argument("--seed", type=int, default=0, help="sampling seed of the first prompt (then +1 per prompt)")
    p.add_argument("--out", required=True, metavar="NPZ", help="trace file to write")
    add_json_flag(p)
    add_engine_flags(p)


def run(args) -> int:
    config = engine_config(args)
    from moelite.core.traces import record
    from moelite.engine import Engine
    from moelite.eval.prompts import load_prompts

    prompts = load_prompts(args.prompts) * args.repeat
    engine = Engine(args.model, config, progress=not args.json)
    path = record(engine, prompts, args.max_tokens, args.out, seed=args.seed, progress=not args.json)
    print(json.dumps({"trace": str(path), "requests": len(prompts), "max_tokens": args.max_tokens}))
    return 0
