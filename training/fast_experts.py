"""Training-only fast CPU forward/backward for the routed experts of Qwen2-MoE.

transformers' ``Qwen2MoeExperts`` stores the experts as two stacked parameters,
``gate_up_proj`` ``(E, 2*I, H)`` and ``down_proj`` ``(E, H, I)``.  Its eager and
``grouped_mm`` paths are slow on CPU for many small experts (per-expert autograd
nodes, full-size zero gradients, scatter-with-accumulate).  This module registers an
experts implementation that sorts the (token, expert) pairs by expert, gathers with
``index_select`` / scatters with ``index_add`` and unbinds the stacked weights once
per call (about 2x faster than ``grouped_mm`` in our fp32 training-step measurement
with 64 experts on a 2-core CPU).

Only the computation changes: the parameters are the model's own, so
``save_pretrained`` still writes the standard Qwen2-MoE checkpoint.  Activation is
SiLU (``hidden_act="silu"``), as in Qwen2-MoE.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

IMPLEMENTATION_NAME = "moelite_cpu_train"


def fast_experts_forward(self, hidden_states, top_k_index, top_k_weights):
    """Drop-in for ``Qwen2MoeExperts.forward`` (same signature and result)."""
    k = top_k_index.size(-1)
    flat = top_k_index.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=self.num_experts).tolist()
    tok = order // k
    x = hidden_states.index_select(0, tok)  # backward: index_add, not index_put
    w = top_k_weights.reshape(-1).index_select(0, order).to(x.dtype)
    # unbind once: backward stacks the per-expert gradients in one allocation
    gate_up = self.gate_up_proj.unbind(0)
    down = self.down_proj.unbind(0)
    outs = []
    for e, xs in enumerate(x.split(counts)):
        if counts[e] == 0:
            continue
        g, u = F.linear(xs, gate_up[e]).chunk(2, dim=-1)
        outs.append(F.linear(F.silu(g) * u, down[e]))
    y = torch.cat(outs) * w.unsqueeze(-1)
    return torch.zeros_like(hidden_states).index_add(0, tok, y)


def register() -> str:
    """Register the implementation with transformers and return its name."""
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    ALL_EXPERTS_FUNCTIONS[IMPLEMENTATION_NAME] = fast_experts_forward
    return IMPLEMENTATION_NAME
