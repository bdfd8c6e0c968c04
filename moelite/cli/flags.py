"""Flags shared by the commands: one name per concept in every command, each checked before anything loads.

Contract:
  - `HelpFormatter`: every command's --help shows each flag's default (a flag whose help already states its
    default keeps that wording) and, through argparse's `choices`, every fixed set of values.
  - `Parser`: an ArgumentParser whose usage errors are one line, `moelite: error: argument --flag: ... (see
    `moelite CMD --help`)`, exit status 2.
  - `add_model_flag(p)`: --model DIR (default: the embedded demo model).
  - `add_engine_flags(p, lists=None)`: one flag per `EngineConfig` field (--expert-budget, --cache-policy, ...),
    with `choices` from `moelite.config.CHOICES`. `lists` maps fields to a comma-list default for a command that
    runs several configurations (bench: --expert-budget 10%,25%,50% --cache-policy lru,lfu,score); each item is
    checked at parse time.
  - `engine_fields(args, **overrides)` -> the raw EngineConfig keyword arguments (JSON-able, for worker processes);
    `engine_config(args, **overrides)` -> a validated EngineConfig. A bad value is a ValueError that names the
    flag ("--expert-budget: ..."), so `moelite` prints one `moelite: error:` line and exits 2.
  - `add_sampling_flags(p)` / `sampling_params(args)` -> validated `SamplingParams` (the library's own check,
    run before the model loads).
  - `add_data_dir_flag(p)`: --data-dir (default: $MOELITE_DATA_DIR, else ../shared/data beside the checkout;
    resolved by `moelite.eval.corpus.data_dir`, the one definition).
  - `add_json_flag(p)`: --json (only the final JSON line: no table, no progress bars).
  - `positive_int`, `nonneg_int`, `positive_float`, `nonneg_float`, `port_number`: argparse types whose errors name
    the allowed range.
This module and every command module import neither torch nor transformers at import time: `moelite --help` is fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import resource

from moelite.config import CHOICES, EngineConfig, SamplingParams, parse_budget
from moelite.eval.corpus import DATA_ENV

_HELP = {
    "device": "cpu, cuda or cuda:N",
    "expert_budget": "memory for routed experts: '25%%' of them, bytes, a size such as '2GiB', or 'auto' (what "
                     "this machine has room for)",
    "cache_policy": "eviction policy (score = SMoE's score window)",
    "expert_dtype": "dtype of expert slots (auto = the checkpoint's)",
    "cache_scope": "one pool for all layers (global) or an equal share per layer (layer)",
    "warm_start": "fill the cache in layer order at load (an 'auto' budget that holds every expert always does)",
    "drop_page_cache": "drop file pages after each expert read (honest budget)",
    "direct_io": "read experts with O_DIRECT, past the OS page cache, where the file system allows it (with "
                 "drop_page_cache)",
    "verify_checksums": "check every expert read against the checksums recorded at the checkpoint's first load "
                        "(an integrity error instead of garbage output; see `moelite verify`)",
    "allow_pickle": "accept .bin/.pt pickle weights (can run code: only for trusted files)",
    "score_window": "decode iterations the score policy averages over",
    "prefetch": "prefetch the next layer's predicted experts",
    "prefetch_experts": "experts of the next layer to prefetch, highest predicted score first (0 = half of top-k)",
    "io_threads": "background threads reading experts (0 = read on the compute thread; CPU experts of at most 256 "
                  "KiB always are)",
    "miss_policy": "a miss goes into the cache (load), is computed from a read buffer (direct), or either by "
                   "score and cost (hybrid, SMoE)",
    "substitution_alpha": "SMoE substitution threshold in [0, 1) (0 = exact)",
    "substitute_in_prefill": "also substitute during prefill",
    "substitution_profile": "per-MoE-layer multipliers of alpha: the JSON file `moelite calibrate` writes, or "
                            "'m0,m1,...' (default: one alpha for every layer)",
    "substitution_mode": "always (every substitutable miss, SMoE) or stall (only those that shorten the layer's "
                         "wait for reads)",
    "num_threads": "torch CPU threads (default: 1 for small models, hidden size <= 1024, else torch's default)",
    "host_budget": "CUDA: pinned host RAM for routed experts under the VRAM slots (auto = all if they fit, "
                   "a size, a percentage, or 0 = read misses from SSD)",
    "cuda_graphs": "CUDA: run decode steps as captured CUDA graphs (misses read zero-copy from pinned RAM)",
    "expert_kernel": "the fused expert computation (CUDA: triton or torch; CPU: native, compiled or eager)",
    "dense_dtype": "CPU: dtype of large dense weights (auto = the checkpoint's bf16/fp16, computed in float32)",
    "lean_decode": "CPU: decode steps without transformers' module forwards (same functions and weights; "
                   "--no-lean-decode = transformers' forward)",
    "compile_decode": "CUDA graphs: torch.compile the decode step's layers before capture (first call slower)",
}
_TYPES = {"int": int, "float": float, "int | None": int}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows every flag's default; help that already says "default" (or argparse's own %(default)s) is kept."""

    def _get_help_string(self, action):
        text = action.help or ""
        if "%(default)" in text or "default:" in text or action.default is argparse.SUPPRESS:
            return text
        if action.option_strings or action.nargs in (argparse.OPTIONAL, argparse.ZERO_OR_MORE):
            text += " (default: %(default)s)" if action.default is not None else " (default: none)"
        return text


class Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the flag (argparse's full usage text would bury it); exit status 2."""

    def error(self, message: str):
        self.exit(2, f"moelite: error: {message} (see `{self.prog} --help`)\n")


# ---- argparse types ------------------------------------------------------------------------------------------
def _number(kind, low: float, strict: bool, what: str):
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        if (isinstance(value, float) and not math.isfinite(value)) or (value <= low if strict else value < low):
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}")
        return value

    convert.__name__ = kind.__name__  # argparse names the type in its messages
    return convert


positive_int = _number(int, 0, True, "an int >= 1")
nonneg_int = _number(int, 0, False, "an int >= 0")
positive_float = _number(float, 0, True, "a number > 0")
nonneg_float = _number(float, 0, False, "a number >= 0")


def port_number(text: str) -> int:
    value = nonneg_int(text)
    if value > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port in [0, 65535]")
    return value


def _comma_list(field: str, choices: tuple[str, ...] | None):
    """A comma list whose every item is one of `choices` (or, for budgets, a budget `parse_budget` reads)."""

    def convert(text: str) -> list[str]:
        items = [t.strip() for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"{text!r}: give at least one value")
        for item in items:
            if choices is not None and item not in choices:
                raise argparse.ArgumentTypeError(f"{item!r} is not one of {', '.join(choices)}")
            if choices is None:
                try:
                    parse_budget(item)
                except ValueError as exc:
                    raise argparse.ArgumentTypeError(str(exc).split(": ", 1)[-1]) from None
        return items

    convert.__name__ = f"{field} list"
    return convert


# ---- flag groups -----------------------------------------------------------------------------------------------
def add_model_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, metavar="DIR",
                   help="Hugging Face checkpoint folder (default: the embedded demo model)")


def add_json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true",
                   help="print only the final JSON line (no table, no progress bars)")


def add_data_dir_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None, metavar="DIR",
                   help=f"the shared data folder (tinyshakespeare/, wikitext-2/, hellaswag/) (default: ${DATA_ENV}, "
                        "else ../shared/data beside the checkout)")


def add_engine_flags(p: argparse.ArgumentParser, lists: dict[str, str] | None = None) -> None:
    lists = lists or {}
    g = p.add_argument_group("engine")
    for f in dataclasses.fields(EngineConfig):
        flag = "--" + f.name.replace("_", "-")
        text = _HELP.get(f.name) or f.name.replace("_", " ")
        choices = CHOICES.get(f.name)
        if f.name in lists:
            g.add_argument(flag, type=_comma_list(f.name, choices), default=lists[f.name], metavar="LIST",
                           help=f"comma list, one configuration each: {text}"
                                + (f" ({', '.join(choices)})" if choices else ""))
        elif f.type in ("bool", bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        else:
            g.add_argument(flag, type=_TYPES.get(str(f.type), str), default=f.default, choices=choices, help=text)


def add_sampling_flags(p: argparse.ArgumentParser, max_tokens: int = 64) -> None:
    d = SamplingParams()
    p.add_argument("--max-tokens", type=int, default=max_tokens, help="tokens to generate")
    p.add_argument("--temperature", type=float, default=d.temperature, help="sampling temperature in [0, 10] "
                                                                            "(0 = greedy)")
    p.add_argument("--top-p", type=float, default=d.top_p, help="nucleus sampling mass in (0, 1]")
    p.add_argument("--top-k", type=int, default=d.top_k, help="sample among the k most likely tokens (0 = off)")
    p.add_argument("--stop", action="append", default=None, metavar="TEXT",
                   help="stop string (repeatable; default: none)")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: none, i.e. random)")


# ---- from flags to validated values ------------------------------------------------------------------------
def as_flag_error(exc: ValueError) -> ValueError:
    """A library error "field_name: ..." as "--field-name: ..." (the flag the user typed)."""
    m = re.match(r"([a-z_]+):", str(exc))
    return ValueError(f"--{m.group(1).replace('_', '-')}{str(exc)[m.end(1):]}") if m else exc


def engine_fields(args, **overrides) -> dict:
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig)}
    kw.update(overrides)
    budget = kw["expert_budget"]
    if isinstance(budget, str) and budget.isdigit():
        kw["expert_budget"] = int(budget)
    return kw


def engine_config(args, **overrides) -> EngineConfig:
    try:
        return EngineConfig(**engine_fields(args, **overrides)).validate()
    except ValueError as exc:
        raise as_flag_error(exc) from None


def sampling_params(args) -> SamplingParams:
    try:
        return SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p,
                              top_k=args.top_k, stop=tuple(args.stop or ()), seed=args.seed).validate()
    except ValueError as exc:
        raise as_flag_error(exc) from None


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
