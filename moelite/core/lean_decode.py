"""Lean decode: one new token per sequence through the decoder, on transformers' weights and functions, without its
module forwards.

A decode step of transformers' model is a few dozen small tensor operations per layer, wrapped in module calls,
keyword plumbing, deprecation and output-capturing decorators, per-step mask construction and config attribute
look-ups. On a CPU those wrappers cost as much as the operations (about 5 ms per token on the 8-layer real-shape
checkpoint, more than the whole step of the small demo model), so this module runs the same operations directly.

Contract:
  - `why_not(model, hf_config, device)` -> None when `LeanDecoder(model, hf_config)` reproduces this model's decode
    step, else the reason (an architecture other than the Llama-style attention of Qwen2-MoE, Qwen3-MoE, Mixtral
    and OLMoE, such as DeepSeek's latent attention; a sliding-window or non-SDPA attention; a device other than the
    CPU). The caller then uses transformers' forward.
  - `step(tokens [B], caches [B] DynamicCache)` -> float32 logits [B, V] on the CPU, after appending each token's
    keys and values to its own cache. Each row equals what transformers' forward computes for that sequence alone
    (same functions in the same order and dtypes: the RMSNorm arithmetic as `F.rms_norm`, the rotary module's own
    `forward`, the modeling file's
    `apply_rotary_pos_emb`, SDPA with the arguments transformers passes at one query position, and `enable_gqa`),
    up to the row-batching of the projections (several sequences' q/k/v and o projections run as one product).
  - Module forward hooks do not fire here: while one is installed on the model's modules (or globally), `hooked()`
    is true and the caller steps through transformers' forward instead, where they do.
  - Per layer: input norm -> q/k/v (one native call when `dense.fuse_projections` fused them) -> optional q/k norms
    (per head, Qwen3; over the whole projection, OLMoE, with its `clip_qkv`) -> rotary -> per sequence: cache append
    and attention over its own cache -> o projection -> residual -> post-attention norm -> the MLP block's own
    decode forward (`OffloadedMoEBlock.eager_forward`, or the dense MLP's forward) -> residual.
"""

from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

from moelite.core.moe_layer import OffloadedMoEBlock

#: model_type values whose decoder layers this module reproduces (Llama-style attention, RMSNorm, rotary)
SUPPORTED = ("qwen2_moe", "qwen3_moe", "mixtral", "olmoe")


def _attention_parts(attn: nn.Module) -> bool:
    return all(hasattr(attn, k) for k in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim", "scaling"))


def why_not(model: nn.Module, hf_config, device: torch.device) -> str | None:
    """Why this model's decode step cannot run lean (None: it can)."""
    if device.type != "cpu":
        return f"lean decode runs on the CPU; {device.type} decodes through transformers' forward or CUDA graphs"
    mt = getattr(hf_config, "model_type", None)
    if mt not in SUPPORTED:
        return f"model_type {mt!r}: lean decode covers {', '.join(SUPPORTED)}"
    impl = getattr(hf_config, "_attn_implementation", None)
    if impl != "sdpa":
        return f"attention implementation {impl!r}: lean decode reproduces 'sdpa'"
    types = getattr(hf_config, "layer_types", None) or []
    if any(t != "full_attention" for t in types) or (not types and getattr(hf_config, "sliding_window", None)):
        return "sliding-window attention layers"
    core = getattr(model, "model", None)
    if core is None or not all(hasattr(core, k) for k in ("embed_tokens", "layers", "norm", "rotary_emb")):
        return "the model lacks the embed_tokens / layers / norm / rotary_emb layout"
    for layer in core.layers:
        if not _attention_parts(layer.self_attn) or not hasattr(layer, "input_layernorm"):
            return f"decoder layer of type {type(layer).__name__} has another attention layout"
    return None


def _norm(mod: nn.Module):
    """An RMSNorm module's function: `F.rms_norm` with its weight and epsilon for the float32 RMSNorm of these
    architectures (x * rsqrt(mean(x^2) + eps) * weight, the same arithmetic in fewer operator calls), else its own
    forward."""
    w, eps = getattr(mod, "weight", None), getattr(mod, "variance_epsilon", None)
    if not type(mod).__name__.endswith("RMSNorm") or w is None or eps is None or w.dtype != torch.float32:
        return mod.forward
    shape = tuple(w.shape)
    return lambda x: F.rms_norm(x, shape, w, eps)


def _projections(attn: nn.Module):
    """fn(x [n, H]) -> (q [n, Oq], k [n, Ok], v [n, Ov]): the fused native call, else each projection's forward."""
    fused = getattr(attn, "moelite_qkv", None)
    if fused is not None:
        return fused.parts
    q, k, v = attn.q_proj.forward, attn.k_proj.forward, attn.v_proj.forward
    return lambda x: (q(x), k(x), v(x))


class _Layer:
    __slots__ = ("n1", "n2", "qkv", "q_norm", "k_norm", "per_head", "clip", "o", "mlp", "dim", "scaling", "gqa", "idx")

    def __init__(self, layer: nn.Module, idx: int, hf_config):
        attn = layer.self_attn
        self.idx = idx
        self.n1, self.n2 = _norm(layer.input_layernorm), _norm(layer.post_attention_layernorm)
        self.qkv = _projections(attn)
        self.dim, self.scaling = attn.head_dim, attn.scaling
        heads = hf_config.num_attention_heads
        self.gqa = heads != (getattr(hf_config, "num_key_value_heads", None) or heads)
        qn, kn = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
        self.q_norm = _norm(qn) if qn is not None else None
        self.k_norm = _norm(kn) if kn is not None else None
        # Qwen3 normalises each head (weight [head_dim]); OLMoE the whole projection (weight [heads * head_dim])
        self.per_head = qn is not None and qn.weight.shape[-1] == self.dim
        self.clip = getattr(hf_config, "clip_qkv", None)
        self.o = attn.o_proj.forward
        self.mlp = layer.mlp.eager_forward if isinstance(layer.mlp, OffloadedMoEBlock) else layer.mlp.forward


class LeanDecoder:
    """The decode step of the module contract over a transformers model's own weights."""

    def __init__(self, model: nn.Module, hf_config):
        core = model.model
        self.embed = core.embed_tokens.forward
        self.rotary = core.rotary_emb.forward
        self.norm = _norm(core.norm)
        self.head = model.lm_head.forward
        self.layers = [_Layer(layer, i, hf_config) for i, layer in enumerate(core.layers)]
        self.rope = sys.modules[type(core.layers[0].self_attn).__module__].apply_rotary_pos_emb
        self.modules = list(model.modules())  # whose hooks would not fire here (`hooked`)

    def hooked(self) -> bool:
        """Whether a forward hook is installed on the model's modules (or globally): such a step must run through
        transformers' forward, where the hooks fire."""
        return bool(_global_forward_hooks or _global_forward_pre_hooks) or any(
            m._forward_hooks or m._forward_pre_hooks for m in self.modules)

    @torch.inference_mode()
    def step(self, tokens: list[int], caches: list) -> torch.Tensor:
        b = len(tokens)
        ids = torch.tensor(tokens, dtype=torch.long).view(b, 1)  # [B, 1]
        h = self.embed(ids)  # [B, 1, H]
        pos = torch.tensor([c.get_seq_length() for c in caches], dtype=torch.long).view(b, 1)  # [B, 1]
        cos, sin = self.rotary(h, pos)  # [B, 1, D] each
        for layer in self.layers:
            h = h + self._attention(layer, layer.n1(h), cos, sin, caches)
            h = h + layer.mlp(layer.n2(h))
        return self.head(self.norm(h))[:, -1].float()  # [B, V]

    def _attention(self, L: _Layer, x: torch.Tensor, cos, sin, caches) -> torch.Tensor:
        """x [B, 1, H] (normed) -> attention output [B, 1, H]; appends each sequence's keys and values."""
        b = x.shape[0]
        q, k, v = L.qkv(x.view(b, -1))  # [B, Oq], [B, Ok], [B, Ov]
        d = L.dim
        if L.q_norm is not None and not L.per_head:  # OLMoE: over the whole projection, before the head split
            q, k = L.q_norm(q), L.k_norm(k)
        if L.clip is not None:
            q, k, v = q.clamp(-L.clip, L.clip), k.clamp(-L.clip, L.clip), v.clamp(-L.clip, L.clip)
        q, k, v = q.view(b, 1, -1, d), k.view(b, 1, -1, d), v.view(b, 1, -1, d)
        if L.per_head:  # Qwen3: each head
            q, k = L.q_norm(q), L.k_norm(k)
        q, k = self.rope(q.transpose(1, 2), k.transpose(1, 2), cos, sin)  # [B, heads, 1, D], [B, kv_heads, 1, D]
        v = v.transpose(1, 2)
        outs = []
        for i, cache in enumerate(caches):
            keys, values = cache.layers[L.idx].update(k[i:i + 1], v[i:i + 1])  # [1, kv_heads, T, D]
            outs.append(F.scaled_dot_product_attention(q[i:i + 1], keys, values, scale=L.scaling, enable_gqa=L.gqa))
        a = outs[0] if b == 1 else torch.cat(outs)  # [B, heads, 1, D]
        return L.o(a.transpose(1, 2).reshape(b, 1, -1))  # [B, 1, H]
