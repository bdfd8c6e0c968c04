"""The expert manager's configuration and per-call state: options frozen at load, the state of one call, hook types.

Contract:
  - `ManagerOptions` (frozen, validated): what EngineConfig fixes for the manager's life (`from_config`); its
    per-layer alpha multipliers are a read-only mapping.
  - `CallState` (frozen): what one call (a request, a batch step, an evaluation pass) runs with: substitution alpha
    (a float in [0, 1) or a [N] tensor per token), routing hook, whether the hook runs in prefill, per-layer alpha
    multipliers. `derive(call, alpha=..., hook=..., in_prefill=..., alpha_scale=...)` validates the parts named
    (the others stay, `KEEP`) and returns the next state; `ExpertManager.request` installs it for a block of calls.
  - `RouteContext` (frozen): what a routing hook may look at (adapter, residency, the call's substitution settings).
  - Hook types: `RoutingHook` = fn(ctx, layer, block, routing, alpha) -> Routing; `Observer` = fn(layer, routing,
    phase) with phase `PREFILL` or `DECODE`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from types import MappingProxyType

import torch
from torch import nn

from moelite.config import MISS_POLICIES, SUBSTITUTION_MODES, check_alpha
from moelite.core.arch.base import ArchAdapter, Routing

Key = tuple[int, int]
PREFILL, DECODE = "prefill", "decode"
KEEP = object()  # request(): this part of the call state stays as the enclosing call has it
_EMPTY: Mapping[int, float] = MappingProxyType({})


def frozen_scale(scale) -> Mapping[int, float]:
    """{layer: multiplier} as a read-only mapping of int -> float."""
    return MappingProxyType({int(k): float(v) for k, v in dict(scale or {}).items()})


@dataclass(frozen=True)
class ManagerOptions:
    """What the engine configuration fixes for the manager's life (see EngineConfig for each field)."""

    miss_policy: str = "load"
    prefetch: bool = False
    prefetch_experts: int = 0  # per token, highest predicted score first; 0 = half of top-k
    substitute_in_prefill: bool = False
    substitution_mode: str = "always"
    alpha: float = 0.0  # the engine's substitution alpha: what a call runs at unless it names its own
    alpha_scale: Mapping[int, float] = field(default_factory=lambda: _EMPTY)  # per-layer multipliers of alpha;
    # empty = one alpha in every layer
    io_parallel: int = 1  # reads in flight at once (I/O threads): what "stall" mode counts rounds with
    expert_kernel: str = "auto"  # CPU slots: cpu_kernels.ResidentKernel's kind (CUDA kernels: cuda_experts)

    def __post_init__(self):
        if self.miss_policy not in MISS_POLICIES:
            raise ValueError(f"miss_policy: {self.miss_policy!r} is not one of {', '.join(MISS_POLICIES)}")
        if self.substitution_mode not in SUBSTITUTION_MODES:
            raise ValueError(f"substitution_mode: {self.substitution_mode!r} is not one of "
                             f"{', '.join(SUBSTITUTION_MODES)}")
        if isinstance(self.io_parallel, bool) or not isinstance(self.io_parallel, int) or self.io_parallel < 1:
            raise ValueError(f"io_parallel: {self.io_parallel!r} must be an int >= 1")
        check_alpha(self.alpha)
        object.__setattr__(self, "alpha_scale", frozen_scale(self.alpha_scale))

    @classmethod
    def from_config(cls, config, layers: list[int]) -> "ManagerOptions":
        """Options of an engine (`config` validated) whose MoE layers are `layers`, ascending."""
        profile = config.substitution_profile
        return cls(miss_policy=config.miss_policy, prefetch=config.prefetch,
                   prefetch_experts=config.prefetch_experts, substitute_in_prefill=config.substitute_in_prefill,
                   substitution_mode=config.substitution_mode, alpha=config.substitution_alpha,
                   alpha_scale=dict(zip(layers, profile)) if profile is not None else {},
                   io_parallel=max(1, config.io_threads), expert_kernel=config.expert_kernel)


@dataclass(frozen=True)
class RouteContext:
    """What a routing hook may look at: the architecture adapter (to weigh a new selection), expert residency,
    and the substitution settings of the call."""

    adapter: ArchAdapter | None
    resident: Callable[[Key], bool]
    alpha_scale: Mapping[int, float]
    substitution_mode: str
    io_parallel: int


#: fn(ctx, layer, block, routing, alpha) -> Routing
RoutingHook = Callable[[RouteContext, int, nn.Module, Routing, object], Routing]
#: fn(layer, routing, phase) with phase "prefill" | "decode"
Observer = Callable[[int, Routing, str], None]


@dataclass(frozen=True)
class CallState:
    """The per-call part of the manager's state (see `ExpertManager.request`)."""

    alpha: object = 0.0  # a float, or a [N] tensor with one threshold per token (a batch of sequences)
    hook: RoutingHook | None = None
    in_prefill: bool = False
    alpha_scale: Mapping[int, float] = field(default_factory=lambda: _EMPTY)




def derive(call: CallState, alpha=KEEP, hook=KEEP, in_prefill=KEEP, alpha_scale=KEEP) -> CallState:
    """`call` with the parts named replaced, each validated (errors name the part, the value and what is allowed)."""
    changes = {}
    if alpha is not KEEP:
        changes["alpha"] = alpha if isinstance(alpha, torch.Tensor) else check_alpha(alpha)
    if hook is not KEEP:
        if hook is not None and not callable(hook):
            raise ValueError(f"hook: {hook!r} is not callable; give fn(ctx, layer, block, routing, alpha) or None")
        changes["hook"] = hook
    if in_prefill is not KEEP:
        changes["in_prefill"] = bool(in_prefill)
    if alpha_scale is not KEEP:
        changes["alpha_scale"] = frozen_scale(alpha_scale)
    return replace(call, **changes)
