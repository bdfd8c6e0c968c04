"""Weight-only quantized weights: compressed-tensors' pack-quantized layout, read and written.

A quantized linear weight W [O, I] is stored as three tensors (the layout vLLM and llm-compressor use, so published
checkpoints in it load too):
  - `<name>.weight_packed` int32 [O, I * bits / 32]: element i of a row at bit i * bits, as the unsigned q + 2^(bits-1);
  - `<name>.weight_scale` [O, I / G] in the model's dtype (G the group size; per-channel: G = I);
  - `<name>.weight_shape` int [2] = (O, I).
W = q * scale, symmetric (no zero point), q in [-(2^(bits-1) - 1), 2^(bits-1) - 1] as written here.

Contract:
  - `QuantSpec.from_config(hf_config)` -> the checkpoint's quantization (bits 4 or 8, group size or None for
    per-channel), or None for an unquantized checkpoint; anything else (asymmetric, activation quantization, act-order,
    another method or format) is a `CheckpointError` naming the field and what moelite reads.
  - `quantize(w, bits, group)` -> (packed int32, scale in w's dtype): round to nearest with scale = max|w| / qmax per
    group; `pack(q, bits)` / `unpack(packed bytes, bits)` between int8 values and bytes.
  - `QWeight(packed, scale, bits, group)`: a quantized matrix (or a stack of them, one per expert slot) whose packed
    rows are uint8 [..., O, I * bits / 8] and scales [..., O, I / G]; `dequantize(qw)` -> float32 [..., O, I] (the
    reference the native kernels are tested against, and the fallback when they cannot run).
  - `LinearQ`: nn.Linear with a quantized weight (dense layers of a checkpoint written with `--dense`); decode-sized
    inputs (<= native.MAX_ROWS rows) use the native kernel, larger ones dequantize a block of rows at a time.
  - `quantized_linears(ckpt)` -> module names whose weight is stored packed; `convert(model, ckpt)` swaps those
    nn.Linear modules for LinearQ on the meta device, before the weights are loaded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import nn

from moelite.core import native
from moelite.core.checkpoint import CheckpointError

BITS = (4, 8)
SUFFIXES = ("weight_packed", "weight_scale", "weight_shape")


@dataclass(frozen=True)
class QuantSpec:
    bits: int
    group: int | None  # None: one scale per output row (strategy "channel")

    def group_for(self, in_features: int) -> int:
        return self.group or in_features

    @classmethod
    def from_config(cls, hf_config) -> "QuantSpec | None":
        qc = getattr(hf_config, "quantization_config", None)
        if qc is None:
            return None
        qc = qc if isinstance(qc, dict) else qc.to_dict()
        where = "config.json quantization_config"
        method = qc.get("quant_method")
        if method != "compressed-tensors":
            raise CheckpointError(f"{where}.quant_method is {method!r}; moelite reads 'compressed-tensors' "
                                  "(pack-quantized int4/int8 weights, written by `moelite quantize`)")
        groups = qc.get("config_groups") or {}
        if not groups:
            raise CheckpointError(f"{where}.config_groups is empty; expected one group of int weights")
        specs = set()
        for gname, g in groups.items():
            fmt = g.get("format") or qc.get("format")
            if fmt != "pack-quantized":
                raise CheckpointError(f"{where}: group {gname!r} has format {fmt!r}; moelite reads 'pack-quantized'")
            if g.get("input_activations") or g.get("output_activations"):
                raise CheckpointError(f"{where}: group {gname!r} quantizes activations; moelite reads weight-only "
                                      "quantization")
            w = g.get("weights") or {}
            bits, kind = w.get("num_bits"), w.get("type")
            if kind != "int" or bits not in BITS:
                raise CheckpointError(f"{where}: group {gname!r} has {bits}-bit {kind!r} weights; moelite reads int "
                                      f"weights of {' or '.join(map(str, BITS))} bits")
            if not w.get("symmetric", True):
                raise CheckpointError(f"{where}: group {gname!r} is asymmetric (zero points); moelite reads "
                                      "symmetric weights")
            if w.get("actorder") not in (None, False, "static"):
                raise CheckpointError(f"{where}: group {gname!r} has actorder {w.get('actorder')!r}; moelite reads "
                                      "weights without activation reordering (actorder null)")
            strategy = w.get("strategy")
            if strategy == "channel":
                specs.add(cls(bits, None))
            elif strategy == "group" and isinstance(w.get("group_size"), int) and w["group_size"] % 32 == 0:
                specs.add(cls(bits, w["group_size"]))
            else:
                raise CheckpointError(f"{where}: group {gname!r} has strategy {strategy!r} with group_size "
                                      f"{w.get('group_size')!r}; moelite reads 'group' (group_size a multiple of 32) "
                                      "or 'channel'")
        if len(specs) != 1:
            raise CheckpointError(f"{where}: groups differ in bits or group size ({sorted(map(str, specs))}); "
                                  "moelite reads one scheme per checkpoint")
        return specs.pop()

    def config(self, targets: list[str], ignore: list[str]) -> dict:
        """The quantization_config a checkpoint written with this spec carries (compressed-tensors' schema)."""
        weights = {"num_bits": self.bits, "type": "int", "symmetric": True, "dynamic": False, "actorder": None,
                   "observer": "minmax", "strategy": "group" if self.group else "channel", "group_size": self.group}
        return {"quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
                "config_groups": {"group_0": {"targets": targets, "weights": weights, "input_activations": None,
                                              "output_activations": None, "format": "pack-quantized"}},
                "ignore": ignore, "kv_cache_scheme": None}


def quant_label(spec: QuantSpec | None) -> str | None:
    """'int8 g128', 'int4 per-channel', or None (stats, `moelite info`, results files)."""
    if spec is None:
        return None
    return f"int{spec.bits} " + (f"g{spec.group}" if spec.group else "per-channel")


def qmax(bits: int) -> int:
    return (1 << (bits - 1)) - 1


def pack(q: torch.Tensor, bits: int) -> torch.Tensor:
    """int8 values [O, I] in [-2^(bits-1), 2^(bits-1)) -> int32 [O, I * bits / 32] (compressed-tensors' packing)."""
    u = (q.to(torch.int16) + (1 << (bits - 1))).to(torch.uint8)
    if bits == 4:
        u = u[:, 0::2] | (u[:, 1::2] << 4)
    return u.contiguous().view(torch.int32)


def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Packed bytes (uint8 [..., O, I * bits / 8], or the int32 tensor) -> int8 values [..., O, I]."""
    u = packed.contiguous().view(torch.uint8)
    if bits == 4:
        u = torch.stack((u & 15, u >> 4), dim=-1).flatten(-2)
    return (u.to(torch.int16) - (1 << (bits - 1))).to(torch.int8)


def quantize(w: torch.Tensor, bits: int, group: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """w [O, I] -> (packed int32 [O, I * bits / 32], scale [O, I / G] in w's dtype)."""
    o, i = w.shape
    g = group or i
    if i % g or g % 32:
        raise ValueError(f"quantize: in_features {i} is not a multiple of the group size {g} (a multiple of 32)")
    wf = w.float().view(o, i // g, g)
    scale = (wf.abs().amax(-1) / qmax(bits)).to(w.dtype)  # the scale as stored, used to round
    s = scale.float().clamp_min(torch.finfo(torch.float32).tiny)[..., None]
    q = torch.round(wf / s).clamp_(-qmax(bits), qmax(bits)).to(torch.int8).view(o, i)
    return pack(q, bits), scale


class QWeight(NamedTuple):
    packed: torch.Tensor  # uint8 [..., O, I * bits / 8]
    scale: torch.Tensor  # [..., O, I / G]
    bits: int
    group: int

    @property
    def out_features(self) -> int:
        return self.packed.shape[-2]

    @property
    def in_features(self) -> int:
        return self.packed.shape[-1] * 8 // self.bits

    def __getitem__(self, i) -> "QWeight":  # one slot of a stack
        return QWeight(self.packed[i], self.scale[i], self.bits, self.group)


def dequantize(qw: QWeight, out: torch.Tensor | None = None) -> torch.Tensor:
    """float32 [..., O, I] = q * scale (into `out` when given)."""
    q = unpack(qw.packed, qw.bits)
    lead, i = q.shape[:-1], q.shape[-1]
    w = q.view(*lead, i // qw.group, qw.group).float() * qw.scale.float()[..., None]
    if out is None:
        return w.view(*lead, i)
    return out.view(*lead, i).copy_(w.view(*lead, i))


def dequant_scratch(qw: QWeight, which: int = 0) -> torch.Tensor:
    """`qw` dequantized into this thread's reused float32 buffer `which` (valid until its next use)."""
    shape = (*qw.packed.shape[:-1], qw.in_features)
    numel = 1
    for s in shape:
        numel *= s
    return dequantize(qw, native.scratch(("dequant", which), numel).view(shape))


def matmul_q(x: torch.Tensor, qw: QWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x float32 [..., I] @ W.T -> float32 [..., O] (LinearQ.forward)."""
    return native.linear(x, qw.out_features, lambda x2: native.qgemv(x2, qw),
                         lambda s, e: dequant_scratch(QWeight(qw.packed[s:e], qw.scale[s:e], qw.bits, qw.group)), bias)


class LinearQ(nn.Module):
    """A linear layer with a weight-only quantized weight, loaded from `weight_packed` / `weight_scale` /
    `weight_shape` (the checkpoint's names)."""

    def __init__(self, in_features: int, out_features: int, bias: bool, bits: int, group: int,
                 scale_dtype: torch.dtype, device=None):
        super().__init__()
        self.in_features, self.out_features, self.bits, self.group = in_features, out_features, bits, group
        self.register_buffer("weight_packed", torch.empty(out_features, in_features * bits // 32, dtype=torch.int32,
                                                          device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, in_features // group, dtype=scale_dtype,
                                                         device=device))
        self.register_buffer("weight_shape", torch.empty(2, dtype=torch.int64, device=device))
        self.bias = nn.Parameter(torch.empty(out_features, dtype=torch.float32, device=device),
                                 requires_grad=False) if bias else None

    @property
    def qweight(self) -> QWeight:
        return QWeight(self.weight_packed.view(torch.uint8), self.weight_scale, self.bits, self.group)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return matmul_q(x, self.qweight, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, int{self.bits}, "
                f"group={self.group}")


def quantized_linears(tensors) -> set[str]:
    """Module names whose weight a checkpoint (tensor names) stores packed."""
    return {n.removesuffix(".weight_packed") for n in tensors if n.endswith(".weight_packed")}


def convert(model: nn.Module, ckpt, spec: QuantSpec | None, rename=lambda n: n) -> int:
    """Swap the nn.Linear modules of a meta-device model whose checkpoint weight is packed for LinearQ; returns how
    many. A packed weight whose module is not an nn.Linear, or whose shapes disagree, is a CheckpointError."""
    names = {rename(n + ".weight").removesuffix(".weight"): n for n in quantized_linears(ckpt.tensors)}
    if not names:
        return 0
    if spec is None:
        raise CheckpointError(f"{next(iter(names.values()))}.weight_packed: a packed weight, but config.json has no "
                              "quantization_config")
    mods = dict(model.named_modules())
    n = 0
    for name, src in names.items():
        mod = mods.get(name)
        if mod is None:  # a routed expert (the expert store reads those) or an unknown tensor (the loader says so)
            continue
        if type(mod) is not nn.Linear:
            raise CheckpointError(f"{src}.weight_packed: module {name!r} is a {type(mod).__name__}, not a linear layer")
        g = spec.group_for(mod.in_features)
        scale = ckpt.tensors.get(src + ".weight_scale")
        if mod.in_features % g or scale is None or scale.shape != (mod.out_features, mod.in_features // g):
            raise CheckpointError(f"{src}.weight_scale: expected shape [{mod.out_features}, {mod.in_features // g}] "
                                  f"for int{spec.bits} group {g}, found "
                                  f"{list(scale.shape) if scale is not None else 'none'}")
        new = LinearQ(mod.in_features, mod.out_features, mod.bias is not None, spec.bits, g, scale.dtype,
                      device="meta")
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        setattr(parent, name.rsplit(".", 1)[-1], new)
        n += 1
    return n

