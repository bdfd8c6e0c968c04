"""`moelite calibrate`: measure each MoE layer's accuracy cost of substitution and write a per-layer alpha profile.

Contract: `add_arguments(p)` declares the flags; `run(args) -> int` checks them before the model loads, runs
`moelite.eval.calibrate.calibrate` on the calibration text (`--text`, else WikiText-2 *valid* in the data folder:
quality is reported on test), prints the per-layer table and one JSON line, and with `--out` writes the profile JSON
that `--substitution-profile` takes.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from moelite.cli.flags import (add_data_dir_flag, add_engine_flags, add_json_flag, add_model_flag, engine_config,
                               nonneg_float, positive_int)
from moelite.eval.corpus import data_dir

NAME = "calibrate"
HELP = "measure each MoE layer's accuracy cost of substitution and write a per-layer alpha profile " \
       "(--substitution-profile)"


def add_arguments(p) -> None:
    add_model_flag(p)
    p.add_argument("--text", default=None, metavar="FILE",
                   help="calibration text (default: DATA_DIR/wikitext-2/valid.txt)")
    add_data_dir_flag(p)
    p.add_argument("--probe-alpha", type=float, default=0.25, help="alpha in (0, 1) each layer is probed at alone")
    p.add_argument("--gamma", type=nonneg_float, default=2.0, help="how strongly multipliers follow the cost ratios")
    p.add_argument("--score-tokens", type=positive_int, default=512, help="scored tokens per pass")
    p.add_argument("--window", type=positive_int, default=256, help="tokens per sliding window")
    p.add_argument("--stride", type=positive_int, default=128, help="tokens the window advances (= scored per window)")
    p.add_argument("--out", default=None, metavar="JSON", help="write the profile JSON here (default: not written)")
    add_json_flag(p)
    add_engine_flags(p)


def _text(args) -> Path:
    if args.text:
        path = Path(args.text)
        if not path.is_file():
            raise ValueError(f"--text: {path} does not exist")
        return path
    root = data_dir(args.data_dir, required=False)
    path = root / "wikitext-2" / "valid.txt" if root else None
    if path is None or not path.is_file():
        raise ValueError("--text: give --text FILE (no data folder with wikitext-2/valid.txt was found: see "
                         "--data-dir)")
    return path


def run(args) -> int:
    if not 0 < args.probe_alpha < 1:
        raise ValueError(f"--probe-alpha: {args.probe_alpha!r} must be in (0, 1)")
    if args.stride > args.window:
        raise ValueError(f"--stride: {args.stride} must be at most --window ({args.window})")
    path = _text(args)
    config = engine_config(args, substitution_profile=None)  # calibration measures every layer at one alpha
    from tqdm.auto import tqdm

    from moelite.engine import Engine
    from moelite.eval.calibrate import calibrate, table
    from moelite.eval.evaluate import read_text_ids

    engine = Engine(args.model, config, progress=not args.json)
    try:
        ids = read_text_ids(engine, path, args.score_tokens, args.window)
        with tqdm(total=len(engine.layout.layers), desc="calibrate", unit="layer", disable=args.json) as bar:
            def report(row: dict) -> None:
                bar.update(1)
                bar.write(f"layer {row['layer']}: {row['substitutions_per_token']:.3f} substitutions/token, "
                          f"KL {row['mean_kl']:.5f}", file=sys.stderr)

            res = calibrate(engine, ids, args.probe_alpha, args.gamma, args.score_tokens, args.window, args.stride,
                            progress=None if args.json else report)
    finally:
        engine.close()
    res["model"] = Path(args.model).name if args.model else "demo_model"
    res["text"] = path.name if path.parent.name in ("", ".") else f"{path.parent.name}/{path.name}"
    if not args.json:
        print(table(res))
    if args.out:
        Path(args.out).write_text(json.dumps(res, indent=1) + "\n", encoding="utf-8")
        if not args.json:
            print(f"wrote {args.out}: use it with --substitution-profile {args.out}", file=sys.stderr)
    print(json.dumps(res))
    return 0
