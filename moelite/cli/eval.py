"""`moelite eval`: perplexity, agreement with the exact model, HellaSwag and the alpha sweep (moelite.eval.evaluate).

Contract: `add_arguments(p)` declares the flags; `run(args) -> int` checks them (alphas, files, data folder, engine
flags) before any model loads, then scores each text file (`--score-tokens` scored tokens each, teacher-forced
through the decode path) at each alpha against the exact model (100% budget, alpha 0; `--reference DIR`: another
checkpoint, e.g. the unquantized model a quantized one came from), measures decode speed
(`--speed-prompts` prompts of `--max-tokens` generated tokens; with several alphas, all engines interleaved) and
prints one JSON line last. `--alpha-sweep` also writes a markdown table, a JSON file and a PNG under `--out`.
Data: texts come from `--text`, else WikiText-2 test in the data folder (`--data-dir` / $MOELITE_DATA_DIR).
"""

from __future__ import annotations

import gc
import json
import sys
from pathlib import Path

from moelite.cli.flags import (add_data_dir_flag, add_engine_flags, add_json_flag, add_model_flag, as_flag_error,
                               engine_config, nonneg_int, positive_int)
from moelite.config import parse_alphas
from moelite.eval.corpus import data_dir

NAME = "eval"
HELP = "perplexity, agreement with the exact model, HellaSwag, alpha sweep"
HELLASWAG_FILE = Path("hellaswag") / "hellaswag_val_full.txt.bz2"


def add_arguments(p) -> None:
    add_model_flag(p)
    p.add_argument("--text", action="append", metavar="FILE",
                   help="text file to score (repeatable; default: DATA_DIR/wikitext-2/test.txt)")
    add_data_dir_flag(p)
    p.add_argument("--window", type=positive_int, default=256, help="tokens per sliding window")
    p.add_argument("--stride", type=positive_int, default=128, help="tokens the window advances (= scored per window)")
    p.add_argument("--score-tokens", type=positive_int, default=1024, help="scored tokens per text file")
    p.add_argument("--hellaswag", nargs="?", const="auto", default=None, metavar="FILE",
                   help=f"also score HellaSwag (default: off; without FILE: DATA_DIR/{HELLASWAG_FILE.as_posix()})")
    p.add_argument("--limit", type=positive_int, default=200, help="HellaSwag items")
    p.add_argument("--alpha-sweep", default=None, metavar="ALPHAS",
                   help="comma-separated alphas, e.g. 0,0.1,0.25,0.4 (default: only --substitution-alpha)")
    p.add_argument("--speed-prompts", type=nonneg_int, default=3, help="prompts of the decode-speed measurement "
                                                                        "(0: skip it)")
    p.add_argument("--max-tokens", type=positive_int, default=32, help="tokens to generate per speed prompt")
    p.add_argument("--speed-rounds", type=positive_int, default=12,
                   help="with --alpha-sweep: prompts per alpha in the interleaved speed measurement")
    p.add_argument("--no-reference", action="store_true", help="skip the exact-model comparison")
    p.add_argument("--reference", default=None, metavar="DIR",
                   help="compare against this model instead of --model at 100%% budget (e.g. the unquantized model "
                        "`moelite quantize` read; same tokenizer); default: --model itself")
    p.add_argument("--out", default="benchmarks/results/smoe", metavar="DIR",
                   help="folder for the sweep's table, JSON and PNG")
    add_json_flag(p)
    add_engine_flags(p)


def _texts(args) -> list[Path]:
    if args.text:
        paths = [Path(t) for t in args.text]
    elif args.hellaswag:
        return []
    else:
        root = data_dir(args.data_dir, required=False)
        if root is None or not (root / "wikitext-2" / "test.txt").is_file():
            raise ValueError("--text: give --text FILE (no data folder with wikitext-2/test.txt was found: see "
                             "--data-dir)")
        paths = [root / "wikitext-2" / "test.txt"]
    for path in paths:
        if not path.is_file():
            raise ValueError(f"--text: {path} does not exist")
    return paths


def _hellaswag_path(args) -> Path | None:
    if not args.hellaswag:
        return None
    if args.hellaswag != "auto":
        path = Path(args.hellaswag)
    else:
        path = data_dir(args.data_dir) / HELLASWAG_FILE
    if not path.is_file():
        raise ValueError(f"--hellaswag: {path} does not exist (give --hellaswag FILE or --data-dir)")
    return path


def run(args) -> int:
    # every flag is checked before a model loads
    try:
        alphas = parse_alphas(args.alpha_sweep) if args.alpha_sweep else [args.substitution_alpha]
    except ValueError as exc:
        raise as_flag_error(exc) from None
    if args.data_dir is not None:
        data_dir(args.data_dir)
    if args.stride > args.window:
        raise ValueError(f"--stride: {args.stride} must be at most --window ({args.window})")
    texts, hellaswag_path = _texts(args), _hellaswag_path(args)
    if args.reference is not None and not (Path(args.reference) / "config.json").is_file():
        raise ValueError(f"--reference: {args.reference} has no config.json (give a model folder)")
    if args.reference is not None and args.no_reference:
        raise ValueError("--reference: cannot be combined with --no-reference")
    config = engine_config(args, substitution_alpha=alphas[0])
    from tqdm.auto import tqdm

    from moelite.engine import Engine
    from moelite.eval.evaluate import (Reference, compare_text, hellaswag, measure_decode, measure_interleaved,
                                       prompts_from_ids, read_text_ids, sweep_plot, sweep_table, text_name)

    quiet = args.json

    def load(**overrides):
        return Engine(args.model, config.replace(**overrides), progress=not quiet)

    first = load()
    ids_by_file = {text_name(p): read_text_ids(first, p, args.score_tokens, args.window) for p in texts}
    if args.no_reference:
        reference = None
    elif args.reference is not None:  # another checkpoint (the unquantized model): at 100% budget, exact
        ref_engine = Engine(args.reference, config.replace(expert_budget="100%", substitution_alpha=0.0),
                            progress=not quiet)
        if ref_engine.hf_config.vocab_size != first.hf_config.vocab_size:
            raise ValueError(f"--reference: vocabulary of {ref_engine.hf_config.vocab_size} tokens, --model has "
                             f"{first.hf_config.vocab_size}; give the model this one was made from")
        reference = Reference(ref_engine)
    else:
        reference = Reference(load(expert_budget="100%", substitution_alpha=0.0))
    speeds: dict = {}
    if len(alphas) > 1 and args.speed_prompts > 0 and ids_by_file:
        # the speed of all alphas measured interleaved (engines alive together), before any quality pass
        engines = {a: (load(substitution_alpha=a), a) for a in alphas}
        prompts = prompts_from_ids(next(iter(ids_by_file.values())), args.speed_prompts + 1)
        with tqdm(total=args.speed_rounds, desc="speed", unit="round", disable=quiet) as bar:
            speeds = measure_interleaved(engines, prompts, args.max_tokens, args.speed_rounds, progress=bar.update)
        del engines
        gc.collect()
    scored = sum(min(args.score_tokens, max(len(ids) - 1, 0)) for ids in ids_by_file.values()) * len(alphas)
    name, rows = first.path.name, []
    with tqdm(total=scored, desc="scoring", unit="tok", disable=quiet or not scored) as bar:
        for a in alphas:
            engine = first if first is not None else load(substitution_alpha=a)
            first = None
            row: dict = {"alpha": a, "expert_budget": args.expert_budget, "cache_policy": args.cache_policy}
            if a in speeds:
                row["speed"] = speeds[a]
            elif args.speed_prompts > 0 and ids_by_file:
                prompts = prompts_from_ids(next(iter(ids_by_file.values())), args.speed_prompts + 1)  # +1: warm-up
                row["speed"] = measure_decode(engine, prompts, args.max_tokens, a)
            row["texts"] = {nm: compare_text(engine, ids, a, reference, args.window, args.stride, args.score_tokens,
                                             progress=bar.update) for nm, ids in ids_by_file.items()}
            if hellaswag_path is not None:
                with tqdm(total=args.limit, desc=f"hellaswag alpha {a:g}", unit="item", disable=quiet,
                          leave=False) as items:
                    row["hellaswag"] = hellaswag(engine, hellaswag_path, args.limit, a, reference,
                                                 progress=items.update)
            rows.append(row)
            del engine
            gc.collect()  # free this alpha's engine (a web of cycles) before loading the next
            if not quiet:
                bar.write(json.dumps(row), file=sys.stderr)
    profile = config.substitution_profile
    result = {"model": name, "expert_budget": args.expert_budget, "cache_policy": args.cache_policy,
              "substitution_mode": args.substitution_mode, "substitution_profile": profile and list(profile),
              "window": args.window, "stride": args.stride, "score_tokens": args.score_tokens, "rows": rows,
              "reference": None if args.no_reference else Path(args.reference or args.model or name).name}
    if args.alpha_sweep:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        tag = f"alpha_sweep_{str(args.expert_budget).replace('%', 'pct')}_{args.cache_policy}"
        if args.substitution_mode != "always":
            tag += f"_{args.substitution_mode}"
        if profile:
            tag += "_profile"
        (out / f"{tag}.md").write_text(f"`moelite eval` on {name}, budget {args.expert_budget}, policy "
                                       f"{args.cache_policy}, substitution mode {args.substitution_mode}, per-layer "
                                       f"alpha multipliers {list(profile) if profile else 'none (one alpha)'}\n\n"
                                       + sweep_table(rows))
        (out / f"{tag}.json").write_text(json.dumps(result, indent=1))
        sweep_plot(rows, out / f"{tag}.png", f"{name}: budget {args.expert_budget}, {args.cache_policy}")
        result["files"] = [str(out / f"{tag}.{x}") for x in ("md", "json", "png")]
        if not quiet:
            print(sweep_table(rows))
    print(json.dumps(result))
    return 0
