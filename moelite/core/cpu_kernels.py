"""CPU expert kernels: a MoE layer's resident experts in one call, chosen for the CPU this runs on.

Contract:
  - `cpu_flags()` (from `native`) -> the instruction-set flags of this CPU that matter here; recorded with every
    figure.
  - `ResidentKernel(act_fn, kind)` computes, for (token, expert) pairs p over resident slots,
        out[tok[p]] += w[p] * down[slot[p]] @ act(gate[slot[p]] @ x[tok[p]]) * (up[slot[p]] @ x[tok[p]])
    in one call: `run(gate_up_all [S, 2I, H], down_all [S, H, I], x [N, H], slots [P], tok [P], w [P]) -> [N, H]`.
    Compute is in x's dtype (float32 on CPU) whatever the slots' storage dtype (bf16, fp16 or fp32): a bf16 slot is
    upcast on the fly, so the result equals a float32 reference whose weights are the checkpoint's, up to summation
    order (the exactness tests hold in the checkpoint's dtype).
  - Kinds: "native" = moelite's AVX2 / AVX-512 kernel (`native.swiglu_pairs`, built at first use): each selected slot read once
    in its storage dtype, converted in registers, one C call per layer with no Python per expert; the fastest where
    it runs (measured: benchmarks/results/cpu_native/). "compiled" = torch.compile (Inductor, C++ codegen) of gather
    + upcast + two reductions over the pairs:
    each selected slot's bytes are read once in their storage dtype, with no Python call per expert; used for
    decode-sized calls (at most `COMPILED_MAX_PAIRS` pairs), where reading the weights is the whole cost.
    "eager" = one `F.linear` pair per expert (the weights upcast to float32 first when stored narrower), for
    prefill, where each expert serves many tokens and matrix products dominate (16-bit slots are converted into a
    reused float32 buffer, not a fresh tensor: fresh ones cost a page fault per 4 KiB). `kind="auto"` picks "native"
    where it runs (AVX2, FMA, F16C and a C compiler), else "compiled" when torch.compile works here (a C++ compiler is
    needed; tried once at construction on a tiny problem, so a broken toolchain falls back before any real work),
    else "eager"; `why` says which runs and why
    (`moelite info` and `engine.stats()` show it).
  - The compiled function is SwiGLU with SiLU (every supported architecture; another activation runs eager) and
    shape-generic (dynamic shapes): one compilation per process and slot dtype, cached on disk by Inductor across
    processes.
"""

from __future__ import annotations

import logging
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from moelite.core import native
from moelite.core.native import cpu_flags  # noqa: F401 - re-exported: the figures' CPU flags
from moelite.core.quant import QWeight, dequant_scratch

log = logging.getLogger("moelite.core.cpu_kernels")

KINDS = ("auto", "native", "compiled", "eager")
#: largest number of (token, expert) pairs the compiled kernel takes in one call (decode: batch x top-k)
COMPILED_MAX_PAIRS = 64


def _pairs(gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor, slots: torch.Tensor, tok: torch.Tensor,
           w: torch.Tensor) -> torch.Tensor:
    """SwiGLU experts over (token, expert) pairs. Shape legend: S slots, P pairs, N tokens, H hidden, I expert
    intermediate; gate_up [S, 2I, H], down [S, H, I], x [N, H], slots / tok / w [P]."""
    xs = x.index_select(0, tok)  # [P, H]
    h = (gate_up[slots].to(x.dtype) * xs[:, None, :]).sum(-1)  # [P, 2I]
    g, u = h.chunk(2, dim=-1)  # [P, I] each
    a = F.silu(g) * u  # [P, I]
    y = (down[slots].to(x.dtype) * a[:, None, :]).sum(-1)  # [P, H]
    return torch.zeros_like(x).index_add_(0, tok, y * w[:, None])  # [N, H]


@lru_cache(maxsize=64)
def is_silu(act_fn) -> bool:
    """Whether `act_fn` computes SiLU (transformers has its own SiLU classes: checked by value, not by type)."""
    t = torch.linspace(-6, 6, 49)
    try:
        with torch.no_grad():
            return bool(torch.allclose(act_fn(t), F.silu(t), rtol=1e-6, atol=1e-7))
    except Exception:
        return False


@lru_cache(maxsize=1)
def _compiled_pairs():
    """`_pairs` compiled once per process (shape-generic), checked on a tiny problem against the eager function so
    that a broken toolchain shows here, before any real work; raises what torch.compile raised."""
    fn = torch.compile(_pairs, dynamic=True, fullgraph=True)
    gen = torch.Generator().manual_seed(0)
    gu, dn = torch.randn(3, 8, 16, generator=gen), torch.randn(3, 16, 4, generator=gen)
    x = torch.randn(2, 16, generator=gen)
    slots, tok, w = torch.tensor([0, 2, 1]), torch.tensor([0, 0, 1]), torch.rand(3, generator=gen)
    got, want = fn(gu, dn, x, slots, tok, w), _pairs(gu, dn, x, slots, tok, w)
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-5):
        raise RuntimeError("the compiled expert kernel disagrees with the eager one on a smoke test")
    return fn


class ResidentKernel:
    def __init__(self, act_fn: nn.Module, kind: str = "auto"):
        if kind not in KINDS:
            raise ValueError(f"expert_kernel: {kind!r} is not one of {', '.join(KINDS)}")
        self.act_fn = act_fn
        self.kind, self.why = "eager", "asked for: one F.linear pair per expert"
        self._compiled = None
        if kind == "eager":
            return
        if not is_silu(act_fn):
            if kind in ("compiled", "native"):
                raise ValueError(f"expert_kernel: {kind!r} computes SwiGLU experts; this model's activation is "
                                 f"{type(act_fn).__name__}; use 'auto' or 'eager'")
            self.why = f"the experts' activation is {type(act_fn).__name__}, not SiLU: one F.linear pair per expert"
            return
        if kind in ("auto", "native"):
            if native.available():
                self.kind = "native"
                self.why = (f"moelite's native kernel ({native.status()}): one call per layer, slots read once in "
                            f"their dtype (CPU flags: {' '.join(cpu_flags()) or 'unknown'})")
                return
            if kind == "native":
                raise RuntimeError(f"expert_kernel: 'native' asked for, but {native.status()}; use 'auto'")
        try:
            self._compiled = _compiled_pairs()
            self.kind = "compiled"
            self.why = ("torch.compile gather + upcast + reduction: one call per layer at decode, slots read once "
                        f"(CPU flags: {' '.join(cpu_flags()) or 'unknown'})")
        except Exception as exc:  # no C++ compiler, or Inductor cannot build here: the eager kernel still works
            if kind == "compiled":
                raise RuntimeError(f"expert_kernel: 'compiled' asked for, but torch.compile fails here ({exc}); "
                                   "use 'auto' or 'eager'") from exc
            self._compiled = None
            self.why = f"torch.compile is not usable here ({type(exc).__name__}): one F.linear pair per expert"
            log.warning("expert kernel: %s", self.why)

    def warm(self, gate_up: torch.Tensor, down: torch.Tensor, dtype: torch.dtype = torch.float32) -> None:
        """Compile now, at load, for the calls decode makes on these slot views (their dtype and strides): one and
        several tokens, one and several pairs (torch.compile specialises sizes 1 apart). Not every shape is
        covered yet: on a real-shape checkpoint the first generations after load still ran slower (a compile
        on first use, presumably). The slots' contents do not matter (the results are dropped)."""
        if self.kind == "native":
            native.load()  # built (or found in the cache) now, not at the first token
            return
        if self._compiled is None or isinstance(gate_up, QWeight):  # packed slots never take the compiled kernel
            return
        h, last = gate_up.shape[-1], min(1, gate_up.shape[0] - 1)
        for n, pairs in ((1, 1), (1, 2), (2, 3)):
            x = torch.zeros(n, h, dtype=dtype)
            slots = torch.tensor([0, last, 0][:pairs])
            tok = torch.tensor([0, 0, n - 1][:pairs])
            if self._call(gate_up, down, x, slots, tok, torch.zeros(pairs, dtype=dtype)) is None:
                return

    def _call(self, *args) -> torch.Tensor | None:
        """The compiled kernel, or None after it failed (e.g. a process that built many engines of other shapes
        hits torch.compile's recompilation limit): this kernel then runs eager from here on, and says so."""
        try:
            return self._compiled(*args)
        except Exception as exc:
            self._compiled, self.kind = None, "eager"
            self.why = f"torch.compile failed at run time ({type(exc).__name__}): one F.linear pair per expert"
            log.warning("expert kernel: %s", self.why)
            return None

    def run(self, gate_up, down, x: torch.Tensor, slots: torch.Tensor, tok: torch.Tensor,
            w: torch.Tensor) -> torch.Tensor:
        quantized = isinstance(gate_up, QWeight)
        if self.kind == "native" and slots.numel() <= COMPILED_MAX_PAIRS and (quantized or gate_up.dtype in native.DTYPES):
            return native.swiglu_pairs(gate_up, down, x.float().contiguous(), slots, tok, w,
                                       torch.zeros(x.shape, dtype=torch.float32)).to(x.dtype)
        if self._compiled is not None and slots.numel() <= COMPILED_MAX_PAIRS and not quantized:
            out = self._call(gate_up, down, x, slots, tok, w)
            if out is not None:
                return out
        out = torch.zeros_like(x)
        for s in slots.unique().tolist():  # eager: each expert once for all its tokens
            sel = (slots == s).nonzero().squeeze(1)
            ti = tok[sel]
            out.index_add_(0, ti, expert_forward(gate_up[s], down[s], x[ti], self.act_fn) * w[sel, None])
        return out


def expert_forward(gate_up, down, xs: torch.Tensor, act_fn: nn.Module) -> torch.Tensor:
    """One expert on tokens xs [n, H] -> [n, H] in xs's dtype (SwiGLU: down(act(gate x) * up x)); gate_up [2I, H],
    down [H, I] in any storage dtype (upcast to xs's dtype when narrower), or quantized (`QWeight`): decode-sized
    inputs through the native kernel, others over the weights dequantized into a reused buffer."""
    if isinstance(gate_up, QWeight):
        n = xs.shape[0]
        if 0 < n <= native.MAX_ROWS and native.available() and is_silu(act_fn):
            x = xs.float().contiguous()
            out = native.swiglu_pairs(gate_up[None], down[None], x, torch.zeros(n, dtype=torch.long), torch.arange(n),
                                      torch.ones(n), torch.zeros_like(x))
            return out.to(xs.dtype)
        gate_up, down = dequant_scratch(gate_up, 0), dequant_scratch(down, 1)
        g, u = F.linear(xs.float(), gate_up).chunk(2, dim=-1)
        return F.linear(act_fn(g) * u, down).to(xs.dtype)
    if gate_up.dtype != xs.dtype:
        gate_up, down = _upcast(gate_up, xs.dtype, 0), _upcast(down, xs.dtype, 1)
    g, u = F.linear(xs, gate_up).chunk(2, dim=-1)  # [n, I] each
    return F.linear(act_fn(g) * u, down)  # [n, H]



def _upcast(t: torch.Tensor, dtype: torch.dtype, which: int) -> torch.Tensor:
    """`t` converted to `dtype` in this thread's reused buffer `which` (valid until the next call with `which`)."""
    return native.scratch(("upcast", which), t.numel(), dtype).view(t.shape).copy_(t)
