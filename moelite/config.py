"""Engine configuration.

Contract: `EngineConfig` holds every knob of `moelite.load`; `validate()` raises ValueError naming the field, the
value and what is allowed. The CLI derives its flags from these fields (`CHOICES` gives the fixed sets). Budgets are
parsed here (`parse_budget`) and resolved against a checkpoint in `resolve_budget`. `SamplingParams` holds one
request's sampling knobs (validated the same way); `parse_alphas` reads a comma list of substitution alphas.
This module does not import torch: the command line validates its flags with it before anything heavy is loaded
(torch devices and dtypes are resolved in `moelite.core.device`).
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
import re
from dataclasses import dataclass
from pathlib import Path

CACHE_POLICIES = ("lru", "lfu", "score", "fifo")
MISS_POLICIES = ("load", "direct", "hybrid")
SUBSTITUTION_MODES = ("always", "stall")
EXPERT_DTYPES = ("auto", "float32", "bfloat16", "float16")
EXPERT_KERNELS = ("auto", "triton", "torch", "native", "compiled", "eager")  # triton/torch: CUDA; others: CPU
DENSE_DTYPES = ("auto", "float32")
CACHE_SCOPES = ("global", "layer")
#: the fixed set of values of each EngineConfig field that has one (the CLI's `choices=`)
CHOICES = {"cache_policy": CACHE_POLICIES, "miss_policy": MISS_POLICIES, "substitution_mode": SUBSTITUTION_MODES,
           "expert_dtype": EXPERT_DTYPES, "expert_kernel": EXPERT_KERNELS, "cache_scope": CACHE_SCOPES,
           "dense_dtype": DENSE_DTYPES}
#: the substitution alphas `moelite tune` measures unless told otherwise
DEFAULT_ALPHAS = "0,0.1,0.2,0.3,0.4,0.5"
_UNITS = {
    "": 1, "b": 1,
    "k": 1000, "kb": 1000, "m": 1000**2, "mb": 1000**2, "g": 1000**3, "gb": 1000**3,
    "kib": 1024, "mib": 1024**2, "gib": 1024**3, "tib": 1024**4, "tb": 1000**4,
}


def parse_budget(value: str | int | float) -> tuple[str, float]:
    """Parse an expert budget: `"25%"` -> ("fraction", 0.25); `2_000_000` or `"2GiB"` -> ("bytes", n).

    >>> parse_budget("25%")
    ('fraction', 0.25)
    >>> parse_budget("1.5GiB")
    ('bytes', 1610612736.0)
    """
    if isinstance(value, bool):
        raise ValueError(f"expert_budget: got {value!r}; use a percentage such as '25%', bytes as an int, or '2GiB'")
    if isinstance(value, (int, float)):
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"expert_budget: {value!r} bytes is not a positive number of bytes")
        return "bytes", float(value)
    if not isinstance(value, str):
        raise ValueError(f"expert_budget: got a {type(value).__name__}; use '25%', an int of bytes, or '2GiB'")
    text = value.strip().lower().replace("_", "")
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*%", text)
    if m:
        pct = float(m.group(1))
        if not 0 < pct <= 100:
            raise ValueError(f"expert_budget: {value!r} is outside (0%, 100%]")
        return "fraction", pct / 100.0
    m = re.fullmatch(r"([0-9]*\.?[0-9]+)\s*([a-z]*)", text)
    if not m or m.group(2) not in _UNITS:
        raise ValueError(
            f"expert_budget: cannot parse {value!r}; use 'auto', a percentage ('25%'), bytes ('1073741824') "
            f"or a size with a unit ({', '.join(u for u in _UNITS if u)})"
        )
    nbytes = float(m.group(1)) * _UNITS[m.group(2)]
    if nbytes <= 0:
        raise ValueError(f"expert_budget: {value!r} is not a positive size")
    return "bytes", nbytes


def check_device(device) -> str:
    """The device's spelling: 'cpu', 'cuda' or 'cuda:N' (a torch.device is read as its string). Whether that CUDA
    device exists is checked when the engine resolves it (`moelite.core.device.parse_device`)."""
    text = device if isinstance(device, str) else str(device)
    if not re.fullmatch(r"cpu|cuda(:[0-9]+)?", text):
        raise ValueError(f"device: {device!r} is not supported; use 'cpu' or 'cuda' / 'cuda:N'")
    return text


@dataclass
class EngineConfig:
    """Everything `moelite.load` accepts besides the model path."""

    device: str = "cpu"
    # "auto" (default): the memory this process may use (cgroup limit, else available RAM; free VRAM on CUDA) minus
    # dense weights, KV cache and headroom (moelite.core.memory), as llama.cpp's page cache fills what there is;
    # or a share of the routed experts ("25%"), bytes, "2GiB"
    expert_budget: str | int | float = "auto"
    cache_policy: str = "lru"
    # dtype of expert slots; "auto" = the checkpoint's (bf16/fp16 stay 16-bit: twice the experts per budget, misses
    # read straight into the slot; CPU kernels compute in float32 from them)
    expert_dtype: str = "auto"
    # CPU: dtype the large dense weights (attention, shared experts, lm_head, embeddings) are kept in; "auto" = the
    # checkpoint's bf16/fp16 (half the bytes to hold and to read per token; computed in float32 by the native
    # kernels, moelite.core.dense), "float32" = converted at load. Small layers and fp32 checkpoints stay float32.
    dense_dtype: str = "auto"
    # one pool shared by all layers ("global") or an equal share per MoE layer ("layer")
    cache_scope: str = "global"
    # fill the cache in layer order at load (SMoE) or start empty; an expert_budget="auto" that holds every routed
    # expert fills it at load either way (the memory is there: experts are not read during the first requests)
    warm_start: bool = False
    # drop file pages after each expert read so the OS page cache is no hidden second cache
    drop_page_cache: bool = True
    # with drop_page_cache: read experts with O_DIRECT (no page cache at all; each expert split over 4 streams)
    # where the file system allows it; False reads through the page cache and drops the pages after
    direct_io: bool = True
    # check every expert read against the checksum recorded for it at the checkpoint's first load (a manifest in
    # $MOELITE_CACHE_DIR/manifests; the first load reads every expert once to record it): a damaged or changed
    # expert fails its request with an integrity error instead of producing output (moelite.core.integrity)
    verify_checksums: bool = True
    # refuse .bin/.pt pickle weights unless this is set (they are converted to safetensors once, then read)
    allow_pickle: bool = False
    # score-window length (decode iterations) for cache_policy="score"
    score_window: int = 8
    # read experts for the next layer in the background, predicted through that layer's gate
    prefetch: bool = False
    # how many of the next layer's predicted experts to prefetch, highest predicted score first (0 = half of top-k)
    prefetch_experts: int = 0
    # background I/O threads reading experts (0 = read on the compute thread; on the CPU, experts of at most 256 KiB
    # are always read there: a handoff to a thread costs more than their read, moelite.core.loader)
    io_threads: int = 2
    # a miss goes into the cache ("load"), is computed from a read buffer without caching ("direct"),
    # or is split between both by score and measured cost ("hybrid", SMoE Algorithm 2)
    miss_policy: str = "load"
    # SMoE substitution threshold; 0 = exact model
    substitution_alpha: float = 0.0
    # which substitutable misses to substitute: "always" = every one (SMoE Algorithm 1); "stall" = only as many as
    # shorten the layer's wait for reads (ceil(misses / io_threads) rounds), lowest score first
    substitution_mode: str = "always"
    # per-MoE-layer multipliers of substitution_alpha, in layer order: layer L substitutes at
    # min(alpha * m[L], ALPHA_CAP). None = one alpha for every layer (the paper). Accepts a sequence, a comma list
    # "0.1,0.5,1.2,2.2", or the JSON file `moelite calibrate` writes (layers whose substitutions cost more accuracy
    # per substitution get less); stored as a tuple after validate()
    substitution_profile: str | tuple | None = None
    # whether substitution also applies in prefill (the paper: decode only)
    substitute_in_prefill: bool = False
    # torch CPU threads; None = 1 for small models (hidden size <= 1024), else torch's default
    num_threads: int | None = None
    # CUDA: pinned host RAM for routed experts under the VRAM slots ("auto" = every expert if it fits in 80% of
    # the available RAM, else what does; a size or a percentage of the routed experts as for expert_budget;
    # "0" = none: misses are read from SSD through a staging buffer)
    host_budget: str | int | float = "auto"
    # CUDA (with a host tier): decode steps run as captured CUDA graphs, misses read zero-copy from pinned RAM
    cuda_graphs: bool = True
    # the fused expert computation: on CUDA "triton" kernels or the "torch" gather + batched matmul; on the CPU
    # "native" (moelite's AVX2 kernel, one call per layer at decode), "compiled" (torch.compile gather + upcast +
    # reduction) or "eager" (F.linear per expert); "auto" = the fastest that works on this machine
    expert_kernel: str = "auto"
    # CPU: decode steps run moelite's lean decode (transformers' weights and functions, without its module
    # forwards: moelite.core.lean_decode) where the architecture allows; False = transformers' forward
    lean_decode: bool = True
    # CUDA graphs: compile the decode step's decoder layers and MoE glue with torch.compile before capture
    # (fewer, fused kernels; the first generation per batch size pays the compile, ~15-20 s)
    compile_decode: bool = False

    def validate(self) -> "EngineConfig":
        check_device(self.device)
        if self.expert_budget != "auto":  # auto: resolved at load against the memory this process may use
            parse_budget(self.expert_budget)
        if self.cache_policy not in CACHE_POLICIES:
            raise ValueError(f"cache_policy: {self.cache_policy!r} is not one of {', '.join(CACHE_POLICIES)}")
        if self.expert_dtype not in EXPERT_DTYPES:
            raise ValueError(f"expert_dtype: {self.expert_dtype!r} is not one of {', '.join(EXPERT_DTYPES)}")
        if self.cache_scope not in CACHE_SCOPES:
            raise ValueError(f"cache_scope: {self.cache_scope!r} is not one of {', '.join(CACHE_SCOPES)}")
        if not isinstance(self.score_window, int) or self.score_window < 1:
            raise ValueError(f"score_window: {self.score_window!r} must be an int >= 1")
        check_alpha(self.substitution_alpha)
        if isinstance(self.io_threads, bool) or not isinstance(self.io_threads, int) or not 0 <= self.io_threads <= 64:
            raise ValueError(f"io_threads: {self.io_threads!r} must be an int in [0, 64]")
        if isinstance(self.prefetch_experts, bool) or not isinstance(self.prefetch_experts, int) \
                or self.prefetch_experts < 0:
            raise ValueError(f"prefetch_experts: {self.prefetch_experts!r} must be an int >= 0 (0 = half of top-k)")
        if self.miss_policy not in MISS_POLICIES:
            raise ValueError(f"miss_policy: {self.miss_policy!r} is not one of {', '.join(MISS_POLICIES)}")
        if self.substitution_mode not in SUBSTITUTION_MODES:
            raise ValueError(f"substitution_mode: {self.substitution_mode!r} is not one of "
                             f"{', '.join(SUBSTITUTION_MODES)}")
        self.substitution_profile = parse_profile(self.substitution_profile)
        if not (self.host_budget == "auto" or self.host_budget in (0, "0")):
            try:
                parse_budget(self.host_budget)
            except ValueError as exc:
                raise ValueError(str(exc).replace("expert_budget:", "host_budget:", 1)
                                 + " (or 'auto', or 0 for no host tier)") from None
        if self.dense_dtype not in DENSE_DTYPES:
            raise ValueError(f"dense_dtype: {self.dense_dtype!r} is not one of {', '.join(DENSE_DTYPES)}")
        if self.expert_kernel not in EXPERT_KERNELS:
            raise ValueError(f"expert_kernel: {self.expert_kernel!r} is not one of {', '.join(EXPERT_KERNELS)}")
        if str(self.device).startswith("cuda") and self.expert_kernel in ("native", "compiled", "eager"):
            raise ValueError(f"expert_kernel: {self.expert_kernel!r} is a CPU kernel; on CUDA use auto, triton or "
                             "torch")
        if self.num_threads is not None and (not isinstance(self.num_threads, int) or self.num_threads < 1):
            raise ValueError(f"num_threads: {self.num_threads!r} must be an int >= 1 or None")
        return self

    def replace(self, **changes) -> "EngineConfig":
        return dataclasses.replace(self, **changes).validate()


def check_alpha(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or not 0 <= alpha < 1:
        raise ValueError(f"substitution_alpha: {alpha!r} must be a number in [0, 1)")
    return float(alpha)


def parse_alphas(text: str, field: str = "alpha_sweep") -> list[float]:
    """A comma list of substitution alphas, each in [0, 1): "0,0.1,0.25" -> [0.0, 0.1, 0.25]."""
    try:
        vals = [float(t) for t in str(text).split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"{field}: {text!r} is not a comma-separated list of numbers such as 0,0.1,0.25") from None
    if not vals:
        raise ValueError(f"{field}: empty list; give alphas such as 0,0.1,0.25")
    for v in vals:
        try:
            check_alpha(v)
        except ValueError as exc:
            raise ValueError(f"{field}: {exc}") from None
    return vals


@dataclass
class SamplingParams:
    """One request's sampling knobs; `validate()` raises ValueError naming the field, the value and the range."""

    max_tokens: int = 64
    temperature: float = 0.8
    top_p: float = 0.95
    top_k: int = 0
    stop: tuple[str, ...] = ()
    seed: int | None = None

    def validate(self) -> "SamplingParams":
        if isinstance(self.max_tokens, bool) or not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise ValueError(f"max_tokens: {self.max_tokens!r} must be an int >= 1")
        for name in ("temperature", "top_p"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{name}: {v!r} must be a finite number")
        if not 0 <= self.temperature <= 10:
            raise ValueError(f"temperature: {self.temperature!r} must be in [0, 10] (0 = greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p: {self.top_p!r} must be in (0, 1]")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k: {self.top_k!r} must be an int >= 0 (0 = off)")
        if isinstance(self.stop, str):
            self.stop = (self.stop,)
        self.stop = tuple(self.stop or ())
        if len(self.stop) > 16 or any(not isinstance(s, str) or not s or len(s) > 256 for s in self.stop):
            raise ValueError("stop: at most 16 non-empty strings of at most 256 characters")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise ValueError(f"seed: {self.seed!r} must be an int or None")
        return self


#: the largest per-layer alpha a profile may give (alpha >= 1 would open the candidate window to every expert)
ALPHA_CAP = 0.95


class Profile(tuple):
    """Per-layer alpha multipliers; from a `moelite calibrate` file it also knows the MoE layer indices and expert
    count it was measured on (None when given as plain numbers), so the engine can refuse another model's file."""

    layers: tuple[int, ...] | None = None
    num_experts: int | None = None


def parse_profile(value) -> tuple[float, ...] | None:
    """substitution_profile: None, a sequence of multipliers >= 0, "a,b,c", or a JSON file with a "profile" list."""
    if value is None or value == "":
        return None
    if isinstance(value, Profile):
        return value
    src, meta = "substitution_profile", {}
    if isinstance(value, (str, Path)):
        text = str(value).strip()
        if re.fullmatch(r"[0-9.eE+\-]+(\s*,\s*[0-9.eE+\-]+)*", text):
            try:
                value = [float(v) for v in text.split(",")]
            except ValueError:
                raise ValueError(f"{src}: cannot read {text!r} as numbers; give multipliers like '0.2,0.6,1.2,2.0'"
                                 ) from None
        else:
            path = Path(text)
            if not path.is_file():
                raise ValueError(f"{src}: {path.name!r} is neither a comma list of numbers nor an existing JSON file "
                                 "(write one with `moelite calibrate --out FILE`)")
            try:
                data = json.loads(path.read_text(encoding="utf-8"))
            except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise ValueError(f"{src}: {path.name!r} is not readable JSON ({exc.__class__.__name__})") from None
            if not isinstance(data, dict) or "profile" not in data:
                raise ValueError(f"{src}: {path.name!r} has no \"profile\" list (expected the JSON that "
                                 "`moelite calibrate` writes)")
            src, value = f"substitution_profile ({path.name})", data["profile"]
            meta = {k: data.get(k) for k in ("layers", "num_experts")}
    if isinstance(value, (bool, int, float)) or not hasattr(value, "__iter__"):
        raise ValueError(f"{src}: {value!r} is not a list of per-layer multipliers")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0:
            raise ValueError(f"{src}: {v!r} is not a finite number >= 0; every layer's multiplier must be one")
        out.append(float(v))
    if not out:
        raise ValueError(f"{src}: empty; give one multiplier per MoE layer or leave it unset")
    profile = Profile(out)
    if isinstance(meta.get("layers"), list) and all(isinstance(x, int) for x in meta["layers"]):
        profile.layers = tuple(meta["layers"])
    if isinstance(meta.get("num_experts"), int):
        profile.num_experts = meta["num_experts"]
    return profile


def alpha_positive(alpha) -> bool:
    """Whether substitution is on: alpha (a float, or a per-token [N] tensor) > 0 for at least one token."""
    return alpha > 0 if type(alpha) is float or isinstance(alpha, numbers.Real) else bool((alpha > 0).any())


def layer_alpha(alpha, scale: float):
    """alpha (float or [N] tensor) of one layer under profile multiplier `scale`, capped at ALPHA_CAP."""
    if type(alpha) is float or isinstance(alpha, numbers.Real):
        return min(float(alpha) * scale, ALPHA_CAP)
    return (alpha * scale).clamp(max=ALPHA_CAP)


def resolve_budget(value, total_expert_bytes: int, slot_bytes: int) -> tuple[int, int]:
    """Return (number of slots, budget bytes). A fraction is of the total routed-expert bytes."""
    kind, amount = parse_budget(value)
    nbytes = amount * total_expert_bytes if kind == "fraction" else amount
    slots = int(nbytes // slot_bytes)
    return slots, int(nbytes)


def format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n} B"
