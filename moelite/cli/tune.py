"""`moelite tune`: pick the smallest substitution alpha that meets a decode-latency target (moelite.eval.tune).

Contract: `add_arguments(p)` declares the flags; `run(args) -> int` checks them before any model loads, measures
decode speed over the alpha grid, fits T(alpha), prints a line per measured alpha and the verdict (--json: only the
JSON line) and returns 0 when the target is met, 1 when no alpha in the grid meets it.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from moelite.cli.flags import (add_data_dir_flag, add_engine_flags, add_json_flag, add_model_flag, as_flag_error,
                               engine_config, nonneg_int, positive_float, positive_int)
from moelite.config import DEFAULT_ALPHAS, parse_alphas
from moelite.eval.corpus import data_dir

NAME = "tune"
HELP = "pick the smallest substitution alpha that meets a decode-latency target"


def add_arguments(p) -> None:
    add_model_flag(p)
    t = p.add_mutually_exclusive_group(required=True)
    t.add_argument("--target-tpot-ms", type=positive_float, default=None,
                   help="time per output token to meet, in ms (this or --target-tok-s)")
    t.add_argument("--target-tok-s", type=positive_float, default=None,
                   help="decode speed to meet, in tokens/s (this or --target-tpot-ms)")
    p.add_argument("--alphas", default=DEFAULT_ALPHAS, help="grid of substitution alphas to measure")
    p.add_argument("--prompts", default=None, metavar="FILE",
                   help="calibration prompts file (default: the built-in three-domain prompts)")
    p.add_argument("--n-prompts", type=positive_int, default=6, help="prompts measured per alpha (at least 2)")
    p.add_argument("--max-tokens", type=positive_int, default=32, help="tokens to generate per prompt (at least 2)")
    p.add_argument("--repeats", type=positive_int, default=1, help="passes over the calibration prompts per alpha")
    p.add_argument("--interleave", action=argparse.BooleanOptionalAction, default=True,
                   help="keep one engine per grid alpha alive and alternate them prompt by prompt (fair on a busy "
                        "machine); off: a fresh engine per alpha and repeat, median (for slot pools too big to "
                        "hold several)")
    p.add_argument("--degree", type=nonneg_int, default=1, help="degree of the T(alpha) polynomial fit")
    p.add_argument("--quality-text", default=None, metavar="FILE",
                   help="text for the quality cost (default: DATA_DIR/wikitext-2/valid.txt when present, else none)")
    p.add_argument("--score-tokens", type=positive_int, default=384, help="scored tokens for the quality cost")
    add_data_dir_flag(p)
    add_json_flag(p)
    add_engine_flags(p)


def run(args) -> int:
    try:
        alphas = parse_alphas(args.alphas, "alphas")
    except ValueError as exc:
        raise as_flag_error(exc) from None
    if args.n_prompts < 2 or args.max_tokens < 2:
        raise ValueError("--n-prompts and --max-tokens must be at least 2 (one prompt warms up; decode needs 2 tokens)")
    quality = args.quality_text
    if quality is None:
        root = data_dir(args.data_dir, required=False)
        if root is not None and (root / "wikitext-2" / "valid.txt").is_file():
            quality = root / "wikitext-2" / "valid.txt"
    if quality is not None and not Path(quality).is_file():
        raise ValueError(f"--quality-text: {quality} does not exist")
    config = engine_config(args)
    from tqdm.auto import tqdm

    from moelite.eval.tune import tune

    rounds = args.n_prompts * args.repeats if args.interleave else len(alphas) * args.repeats
    log = None if args.json else (lambda p: print(f"alpha {p['alpha']:<6g} TPOT {p['tpot_ms']:8.2f} ms  "
                                                  f"{p['decode_tok_s']:7.2f} tok/s  exact hit "
                                                  f"{p['decode_exact_hit_rate']:.1%}  substituted "
                                                  f"{p['decode_substituted_rate']:.1%}", file=sys.stderr))
    with tqdm(total=rounds, desc="tune", unit="round" if args.interleave else "run", disable=args.json) as bar:
        res = tune(args.model, config, args.target_tpot_ms, args.target_tok_s, alphas, args.prompts, args.n_prompts,
                   args.max_tokens, args.repeats, args.degree, quality, args.score_tokens, log, args.interleave,
                   progress=bar.update)
    if not args.json:
        verdict = "meets" if res["met"] else "cannot meet (fastest measured shown)"
        line = f"alpha = {res['alpha']:g} {verdict} the target {res['target_tpot_ms']:.2f} ms/token " \
               f"(fit: {res['predicted_tpot_ms']:.2f} ms, R^2 {res['fit_r2']:.2f})"
        if "quality" in res:
            q = res["quality"]
            line += f"; quality vs exact: top-1 {q['top1_agreement']:.2%}, KL {q['mean_kl']:.4f}, " \
                    f"perplexity x{q['perplexity_ratio']:.4f}"
        print(line, file=sys.stderr)
    print(json.dumps(res))
    return 0 if res["met"] else 1
