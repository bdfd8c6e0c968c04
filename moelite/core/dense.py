"""Dense weights in the checkpoint's dtype on the CPU: linear layers and embeddings that store bf16/fp16 and compute
in float32.

On the CPU moelite computes in float32 (16-bit matrix products are very slow on CPUs without AVX-512-BF16). Kept
in float32, a bf16 checkpoint's dense weights (attention, shared experts, dense MLPs, lm_head) take twice their
bytes in memory and twice the reading per token. Here they keep the checkpoint's dtype and are converted on the fly:

  - `Linear16(weight, bias)`: y = x @ w.T + b with w stored 16-bit. Up to `native.MAX_ROWS` rows (decode): the
    native matrix-vector kernel reads each weight once (`native.gemv`). More rows (prefill): the weight is converted
    to float32 a block of output features at a time into a reused buffer (a fresh float32 copy would cost page
    faults for every call) and multiplied there. Either way the result equals a float32 layer over the same weights
    up to summation order.
  - `Embedding16(weight)`: rows looked up in the stored dtype, returned in float32.
  - `fuse_swiglu(model)`: after loading, a SwiGLU MLP whose three projections are Linear16, float32 nn.Linear on
    the CPU (small layers: the cost is per call), or int8/int4 `LinearQ` of one scheme (shared experts, dense MLP layers), gets its gate and up weights in one [2I, H] block and computes, up to MAX_ROWS rows, in one native
    call (`native.swiglu_pairs` over a single slot) instead of three products and two elementwise ops.
  - `fuse_projections(model)`: after loading, the q/k/v projections of an attention module (all Linear16 of one
    dtype, all float32 nn.Linear on the CPU, or all `quant.LinearQ` of one scheme; biases all or none) get their weights in one block, so that at
    decode one native call computes the three: q_proj's call computes them and keeps k and v for k_proj's and
    v_proj's calls on the same input tensor object (attention modules project one hidden state, unchanged between
    the three calls); any other call computes its own part. The attention module's `moelite_qkv` is the fused
    block: lean decode (`core/lean_decode.py`) takes the three parts of one call from its `parts(x)`.
  - `convert(model, dtype, min_bytes)`: swaps nn.Linear / nn.Embedding modules whose float32 weight has at least
    `min_bytes` for the 16-bit ones, on the meta device before weights are loaded (so the float32 copy never exists);
    tied embeddings stay tied. Small layers keep float32: their cost is per call, not the bytes.
  - `dense_dtype(config, device, checkpoint_dtype)` -> the dtype large dense weights are stored in: the checkpoint's
    16-bit dtype on the CPU when the native kernels run here and `dense_dtype` is "auto"; else None (float32, as the
    model computes). `stored_dtype(shape, ...)` applies the same rule to one tensor, `dense_bytes(...)` to a checkpoint's dense
    tensors (the budget's dense bytes; `moelite info`).
"""

from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from torch import nn

from moelite.core import native, quant
from moelite.core.cpu_kernels import is_silu
from moelite.core.quant import SUFFIXES as QUANT_SUFFIXES

#: float32 size below which a dense weight stays float32 (its cost is per call, not reading it)
SMALL_DENSE_BYTES = 1 << 20

def matmul16(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x float32 [..., I], w 16-bit [O, I] -> float32 [..., O] (`Linear16.forward`)."""
    i = w.shape[1]
    return native.linear(x, w.shape[0], lambda x2: native.gemv(x2, w),
                         lambda s, e: native.scratch("matmul16", (e - s) * i).view(e - s, i).copy_(w[s:e]), bias)


class Linear16(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool, dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=dtype, device=device),
                                   requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, dtype=torch.float32, device=device),
                                 requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul16(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, stored={self.weight.dtype}"


class Embedding16(nn.Module):
    def __init__(self, num_embeddings: int, embedding_dim: int, padding_idx, dtype: torch.dtype, device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.weight = nn.Parameter(torch.empty(num_embeddings, embedding_dim, dtype=dtype, device=device),
                                   requires_grad=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx).float()


def stored_dtype(shape, dense16: torch.dtype | None, model_dtype: torch.dtype) -> torch.dtype:
    """The dtype a dense tensor of `shape` is kept in: `dense16` for matrices of at least SMALL_DENSE_BYTES in float32,
    else the model's."""
    numel = 1
    for s in shape:
        numel *= s
    if dense16 is not None and len(shape) == 2 and numel * 4 >= SMALL_DENSE_BYTES:
        return dense16
    return model_dtype


def dense_bytes(tensors: dict, expert_names, dense16: torch.dtype | None, model_dtype: torch.dtype) -> int:
    """Bytes the non-expert tensors of a checkpoint (name -> info with .shape, .dtype, .nbytes) take once loaded
    (quantized weights, their scales and shapes: as stored)."""
    return sum(t.nbytes if n.rpartition(".")[2] in QUANT_SUFFIXES else
               t.nbytes // t.dtype.itemsize * stored_dtype(t.shape, dense16, model_dtype).itemsize
               for n, t in tensors.items() if n not in expert_names)


def dense_dtype(setting: str, device: torch.device, checkpoint_dtype: torch.dtype) -> torch.dtype | None:
    if setting != "auto" or device.type != "cpu" or checkpoint_dtype not in (torch.bfloat16, torch.float16):
        return None
    return checkpoint_dtype if native.available() else None


def convert(model: nn.Module, dtype: torch.dtype) -> int:
    """Swap large nn.Linear / nn.Embedding modules of a meta-device model for 16-bit ones; returns how many."""
    n = 0
    for name, mod in list(model.named_modules()):
        if type(mod) is nn.Linear and stored_dtype(mod.weight.shape, dtype, torch.float32) == dtype:
            new = Linear16(mod.in_features, mod.out_features, mod.bias is not None, dtype, device="meta")
        elif type(mod) is nn.Embedding and stored_dtype(mod.weight.shape, dtype, torch.float32) == dtype:
            new = Embedding16(mod.num_embeddings, mod.embedding_dim, mod.padding_idx, dtype, device="meta")
        else:
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], new)
        n += 1
    return n


def _fused_swiglu_forward(mod: nn.Module, gate_up: torch.Tensor, down: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """One SwiGLU MLP: x [..., H] -> [..., H]; gate_up [1, 2I, H] and down [1, H, I] are the module's weights."""
    lead, h = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, h)
    n = x2.shape[0]
    if not 0 < n <= native.MAX_ROWS:
        return mod.down_proj(mod.act_fn(mod.gate_proj(x)) * mod.up_proj(x))
    x2 = x2.contiguous()
    out = torch.zeros_like(x2)
    native.swiglu_pairs(gate_up, down, x2, torch.zeros(n, dtype=torch.long), torch.arange(n), torch.ones(n), out)
    return out.view(*lead, h)


def _scheme(p: nn.Module):
    """What must agree for projections to share one weight block: the 16-bit dtype, or the quantization scheme."""
    if type(p) is Linear16:
        return Linear16, p.weight.dtype
    if type(p) is nn.Linear and p.weight.dtype == torch.float32 and p.weight.device.type == "cpu":
        return nn.Linear, torch.float32  # small float32 layers: one native call instead of several F.linear
    if type(p) is quant.LinearQ:
        return quant.LinearQ, p.bits, p.group, p.weight_scale.dtype
    return None


def _stack_rows(parts: list[nn.Module]):
    """The weights of `parts` (all Linear16, all float32 nn.Linear on the CPU, or all LinearQ, of one `_scheme` and
    input size) in one block of rows, in order, each part's weight re-pointed to its rows of it (no second copy): a
    tensor [sum O, I] or a `quant.QWeight`. None (nothing changed) for projections that cannot share one."""
    if _scheme(parts[0]) is None or len({(_scheme(p), p.in_features) for p in parts}) != 1:
        return None
    bounds, o = [], 0
    for p in parts:
        bounds.append((o, o + p.out_features))
        o += p.out_features
    with torch.no_grad():
        if type(parts[0]) in (Linear16, nn.Linear):
            w = torch.cat([p.weight for p in parts])
            for p, (a, b) in zip(parts, bounds):
                p.weight = nn.Parameter(w[a:b], requires_grad=False)
            return w
        packed, scale = torch.cat([p.weight_packed for p in parts]), torch.cat([p.weight_scale for p in parts])
    for p, (a, b) in zip(parts, bounds):
        p.weight_packed, p.weight_scale = packed[a:b], scale[a:b]
    return quant.QWeight(packed.view(torch.uint8), scale, parts[0].bits, parts[0].group)


def _slot(w):
    """A weight as a stack of one slot (`native.swiglu_pairs` takes slot stacks): [1, O, I]."""
    if isinstance(w, quant.QWeight):
        return quant.QWeight(w.packed[None], w.scale[None], w.bits, w.group)
    return w[None]


def fuse_swiglu(model: nn.Module) -> int:
    """Give every SwiGLU MLP of Linear16 projections, or of `quant.LinearQ` projections of one scheme, a one-call
    forward (see the contract); returns how many."""
    if not native.available():
        return 0
    n = 0
    for mod in model.modules():
        g, u, d = (getattr(mod, k, None) for k in ("gate_proj", "up_proj", "down_proj"))
        if not is_silu(getattr(mod, "act_fn", None)) or any(p is None or p.bias is not None for p in (g, u, d)) \
                or (g.out_features, g.in_features) != (u.out_features, u.in_features) \
                or (d.out_features, d.in_features) != (g.in_features, g.out_features) \
                or _scheme(d) != _scheme(g) or (type(g) is quant.LinearQ and (g.in_features % 32 or g.out_features % 32)):
            continue
        gate_up = _stack_rows([g, u])  # [2I, H]: gate rows, then up rows
        if gate_up is None:
            continue
        down = d.qweight if type(d) is quant.LinearQ else d.weight
        mod.forward = partial(_fused_swiglu_forward, mod, _slot(gate_up), _slot(down))
        n += 1
    return n


class _Fused:
    """Several projections of one input (q, k, v) in one weight block: the first part's call at decode computes
    every part, later parts' calls on the same tensor take theirs (see `fuse_projections`)."""

    def __init__(self, mods: list[nn.Module], decode, bias: torch.Tensor | None):
        self.forwards = [m.forward for m in mods]  # each part's own product: prefill, or another input
        self.bounds, o = [], 0
        for m in mods:
            self.bounds.append((o, o + m.out_features))
            o += m.out_features
        self.decode, self.bias, self.kept, self.x = decode, bias, None, None

    def forward(self, part: int, x: torch.Tensor) -> torch.Tensor:
        lead, i = x.shape[:-1], x.shape[-1]
        n = x.numel() // i if i else 0
        if not 0 < n <= native.MAX_ROWS:
            return self.forwards[part](x)
        if part and self.x is x and self.kept is not None and self.kept[part] is not None:
            y = self.kept[part]
            self.kept[part] = None
        else:
            x2 = x.reshape(n, i)
            y_all = self.decode(x2 if x2.stride(-1) == 1 else x2.contiguous())
            if self.bias is not None:
                y_all += self.bias
            self.kept = [y_all[:, a:b] for a, b in self.bounds]
            self.x = x
            y = self.kept[part]
            self.kept[part] = None
        if all(k is None for k in self.kept):
            self.kept, self.x = None, None  # every part taken: hold no tensor
        return y.contiguous().view(*lead, y.shape[-1])

    def parts(self, x2: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Every part at once (lean decode): x2 [n, I] -> one [n, O_part] per part, views of one product up to
        MAX_ROWS rows, each part's own product beyond."""
        n = x2.shape[0]
        if not 0 < n <= native.MAX_ROWS:
            return tuple(f(x2) for f in self.forwards)
        y = self.decode(x2 if x2.stride(-1) == 1 else x2.contiguous())
        if self.bias is not None:
            y += self.bias
        return tuple(y[:, a:b] for a, b in self.bounds)


def fuse_projections(model: nn.Module, names=("q_proj", "k_proj", "v_proj")) -> int:
    """One weight block and one native call at decode for the q/k/v projections of each attention module (see the
    contract); returns how many modules were fused."""
    if not native.available():
        return 0
    n = 0
    for mod in model.modules():
        parts = [getattr(mod, k, None) for k in names]
        if any(_scheme(p) is None for p in parts):  # not 16-bit or quantized linears (or not an attention module)
            continue
        has_bias = [p.bias is not None for p in parts]
        if any(has_bias) and not all(has_bias):
            continue
        fused = _stack_rows(parts)
        if fused is None:
            continue
        decode = partial(native.qgemv, qw=fused) if isinstance(fused, quant.QWeight) else partial(native.gemv, w=fused)
        bias = torch.cat([p.bias for p in parts]) if all(has_bias) else None
        fused_mod = _Fused(parts, decode, bias)
        for k, p in enumerate(parts):
            p.forward = partial(fused_mod.forward, k)
        mod.moelite_qkv = fused_mod  # lean decode takes all three parts in one call (`_Fused.parts`)
        n += 1
    return n
