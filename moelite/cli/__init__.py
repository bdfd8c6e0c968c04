"""The command line: a thin layer on top of the library (which never imports it).

  moelite generate   stream a continuation of a prompt       moelite info       a checkpoint and the budgets that fit
  moelite serve      OpenAI-compatible HTTP server           moelite bench      budgets x cache policies, baselines
  moelite eval       perplexity, agreement, alpha sweep      moelite tune       alpha for a decode-latency target
  moelite calibrate  per-layer substitution profile          moelite trace      record a routing trace
  moelite realshape  real-shape random checkpoint            moelite predict    eMoE predictors and sensitivity
  moelite quantize   int8/int4 experts (and dense layers)    moelite verify     a checkpoint's headers and expert checksums

Contract:
  - Each command is a module of this package with NAME, HELP, `add_arguments(parser)` and `run(args) -> int`;
    `COMMANDS` lists them. `build_parser(commands=None)` builds the parser with every command's flags (or only those
    of `commands`; the others are listed with their help line). `main(argv)` builds only the chosen command's flags,
    so `moelite --help` imports neither torch nor transformers (command modules defer those imports to `run`).
  - Every --help shows each default and each fixed choice (`flags.HelpFormatter`). Flags are checked before
    anything loads; a bad value, a missing file or any library ValueError / OSError / FloatingPointError (an
    expert read or integrity error, NaN logits) is one line `moelite: error: ...` on stderr and exit status 2
    (usage errors too: `flags.Parser`); Ctrl-C exits 130. `main`
    returns the exit status (it never raises SystemExit).
  - One name per concept in every command: the engine flags (--expert-budget, --cache-policy, ...) from
    `EngineConfig`; --max-tokens is always tokens to generate (--score-tokens: tokens scored); --data-dir /
    $MOELITE_DATA_DIR is the data folder; --json prints only the final JSON line (no progress bars).
"""

from __future__ import annotations

import argparse
import sys

from moelite import __version__
from moelite.cli import (bench, calibrate, eval as eval_command, generate, info, predict, quantize, realshape, serve,
                         trace, tune, verify)
from moelite.cli.flags import HelpFormatter, Parser

COMMANDS = (generate, info, serve, bench, eval_command, tune, calibrate, trace, realshape, predict, quantize, verify)


def build_parser(commands=None) -> argparse.ArgumentParser:
    """The `moelite` parser; `commands`: names whose flags are added (None: all of them)."""
    p = Parser(prog="moelite", description="Run MoE LLMs with offloaded experts under a budget.",
               formatter_class=HelpFormatter)
    p.add_argument("--version", action="version", version=f"moelite {__version__}")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for mod in COMMANDS:
        c = sub.add_parser(mod.NAME, help=mod.HELP, description=mod.HELP, formatter_class=HelpFormatter)
        if commands is None or mod.NAME in commands:
            mod.add_arguments(c)
        c.set_defaults(run=mod.run)
    return p


def chosen_command(argv: list[str]) -> str | None:
    """The command named in argv (the first word that is not an option), or None."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(commands=[chosen_command(argv)])
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, or a usage error (already printed): its exit status
        return exc.code if isinstance(exc.code, int) else 2
    try:
        return args.run(args)
    # CheckpointError is a ValueError, an expert read or integrity error an OSError, NaN logits a FloatingPointError
    except (ValueError, OSError, FloatingPointError) as exc:
        print(f"moelite: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
