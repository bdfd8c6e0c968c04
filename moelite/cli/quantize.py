"""`moelite quantize SRC DST`: write a checkpoint with weight-only int8/int4 routed experts (moelite.quantize).

Contract: `add_arguments(p)` declares the flags; `run(args) -> int` checks them (bits, group size, folders) before
any weight is read, writes DST with progress, prints its path (with --json: one JSON line with the sizes) and returns
0. The output is compressed-tensors' pack-quantized layout; moelite loads it like any checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

from moelite.cli.flags import add_json_flag

NAME = "quantize"
HELP = "write int8/int4 experts (and dense layers)"


def group_size(text: str) -> int | None:
    if text == "channel":
        return None
    try:
        g = int(text)
    except ValueError:
        g = 0
    if g <= 0 or g % 32:
        import argparse
        raise argparse.ArgumentTypeError(f"{text!r}: give a positive multiple of 32, or 'channel'")
    return g


def add_arguments(p) -> None:
    p.add_argument("src", metavar="SRC", help="model folder to quantize (safetensors, not yet quantized)")
    p.add_argument("dst", metavar="DST", help="folder to write (refused if it exists and is not empty, unless --force)")
    p.add_argument("--bits", type=int, choices=(8, 4), required=True, help="bits per weight")
    p.add_argument("--group-size", type=group_size, default=32, metavar="N",
                   help="inputs sharing one scale: a multiple of 32, or 'channel' (one scale per output row); 32 "
                        "matches llama.cpp's Q8_0/Q4_0 blocks")
    p.add_argument("--dense", action="store_true",
                   help="also quantize the dense linear layers (attention, shared experts, lm_head); routers, "
                        "embeddings and norms stay as they are")
    p.add_argument("--force", action="store_true", help="write into DST even if it holds files")
    add_json_flag(p)


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def run(args) -> int:
    src, dst = Path(args.src), Path(args.dst)
    if not (src / "config.json").is_file():
        raise ValueError(f"src: {args.src} has no config.json (give a model folder)")
    from moelite.quantize import quantize_checkpoint

    out = quantize_checkpoint(src, dst, args.bits, args.group_size, dense=args.dense, progress=not args.json,
                              force=args.force)
    before, after = _size(src), _size(out)
    if args.json:
        print(json.dumps({"out": str(out), "bits": args.bits, "group_size": args.group_size, "dense": args.dense,
                          "src_bytes": before, "dst_bytes": after}))
    else:
        print(f"{out}: int{args.bits} {'experts and dense layers' if args.dense else 'experts'}, "
              f"{before / 2**30:.2f} GiB -> {after / 2**30:.2f} GiB")
    return 0
