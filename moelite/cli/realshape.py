"""`moelite realshape OUT`: write a real-shape random checkpoint for I/O benchmarks (moelite.eval.realshape).

Contract: `add_arguments(p)` declares the flags; `run(args) -> int` refuses an existing non-empty OUT folder unless
`--force` is given (before anything is written), writes the checkpoint, prints its path and returns 0.
"""

from __future__ import annotations

from pathlib import Path

from moelite.cli.flags import add_json_flag, positive_int

NAME = "realshape"
HELP = "write a real-shape random checkpoint for I/O benchmarks"
DTYPES = ("bfloat16", "float16", "float32")


def add_arguments(p) -> None:
    from moelite.eval.realshape import PRESETS

    p.add_argument("out", metavar="OUT", help="folder to write (refused if it exists and is not empty, unless --force)")
    p.add_argument("--preset", default="qwen3-30b-a3b-64e", choices=sorted(PRESETS), help="expert shapes to copy")
    p.add_argument("--layers", type=positive_int, default=8, help="decoder layers")
    p.add_argument("--tokenizer-from", default=None, metavar="DIR",
                   help="copy tokenizer files (and vocab size) from this model (default: no tokenizer)")
    p.add_argument("--dtype", default="bfloat16", choices=DTYPES, help="dtype of the weights on disk")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights")
    p.add_argument("--force", action="store_true", help="write into OUT even if it holds files (they may be replaced)")
    add_json_flag(p)


def check_out(out: Path, force: bool) -> None:
    """ValueError when `out` is a file, or a non-empty folder and `force` is not set."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"out: {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()) and not force:
        raise ValueError(f"out: {out} exists and is not empty; give another folder, or --force to write into it")


def run(args) -> int:
    out = Path(args.out)
    check_out(out, args.force)
    if args.tokenizer_from is not None and not (Path(args.tokenizer_from) / "config.json").is_file():
        raise ValueError(f"--tokenizer-from: {args.tokenizer_from} has no config.json (give a model folder)")
    import torch

    from moelite.eval.realshape import make_realshape

    print(make_realshape(out, args.preset, args.layers, dtype=getattr(torch, args.dtype),
                         tokenizer_from=args.tokenizer_from, seed=args.seed, progress=not args.json))
    return 0
