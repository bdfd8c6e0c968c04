"""Engine flags, derived from `EngineConfig`'s fields: one name per concept in every command that loads a model."""

from __future__ import annotations

import argparse
import dataclasses
import resource

from moelite.config import EngineConfig


_SKIP = {"extra"}
_HELP = {
    "device": "cpu, cuda or cuda:N",
    "expert_budget": "memory for routed experts: '25%%' of them, bytes, or a size such as '2GiB'",
    "cache_policy": "eviction policy: lru, lfu, score (SMoE score window), fifo",
    "expert_dtype": "dtype of expert slots (auto = float32 on CPU, checkpoint dtype on CUDA)",
    "cache_scope": "one pool for all layers (global) or an equal share per layer (layer)",
    "warm_start": "fill the cache in layer order at load",
    "drop_page_cache": "drop file pages after each expert read (honest budget)",
    "allow_pickle": "accept .bin/.pt pickle weights (can run code: only for trusted files)",
    "score_window": "decode iterations the score policy averages over",
    "prefetch": "prefetch the next layer's predicted experts",
    "substitution_alpha": "SMoE substitution threshold (0 = exact)",
    "substitute_in_prefill": "also substitute during prefill",
    "substitution_profile": "per-MoE-layer multipliers of alpha: the JSON file `moelite calibrate` writes, or "
                            "'m0,m1,...' (default: one alpha for every layer)",
    "substitution_mode": "always (every substitutable miss, SMoE) or stall (only those that shorten the layer's "
                         "wait for reads)",
    "num_threads": "torch CPU threads",
    "host_budget": "CUDA: pinned host RAM for routed experts under the VRAM slots (auto = all if they fit, "
                   "a size, a percentage, or 0 = read misses from SSD)",
    "cuda_graphs": "CUDA: run decode steps as captured CUDA graphs (misses read zero-copy from pinned RAM)",
    "expert_kernel": "CUDA: fused expert computation, auto, triton or torch",
    "compile_decode": "CUDA graphs: torch.compile the decode step's layers before capture (first call slower)",
}


def add_engine_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("engine")
    for f in dataclasses.fields(EngineConfig):
        if f.name in _SKIP:
            continue
        flag = "--" + f.name.replace("_", "-")
        text = (_HELP.get(f.name) or f.name.replace("_", " ")) + " (default: %(default)s)"
        if f.type in ("bool", bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=text)
        else:
            conv = {"int": int, "float": float, "int | None": int}.get(str(f.type), str)
            g.add_argument(flag, type=conv, default=f.default, help=text)


def engine_config(args) -> EngineConfig:
    kw = {f.name: getattr(args, f.name) for f in dataclasses.fields(EngineConfig) if f.name not in _SKIP}
    budget = kw["expert_budget"]
    if isinstance(budget, str) and budget.isdigit():
        kw["expert_budget"] = int(budget)
    return EngineConfig(**kw).validate()


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
