"""Qwen2-MoE and Qwen3-MoE: softmax over all experts, top-k, renormalised only if `norm_topk_prob`.

Qwen2-MoE adds a shared expert scaled by sigmoid(shared_expert_gate(x)); Qwen3-MoE has none."""

import torch

from moelite.core.arch.base import ArchAdapter, normalise


class Qwen2MoeAdapter(ArchAdapter):
    model_types = ("qwen2_moe",)

    def weigh(self, block, probs, idx):
        w = probs.gather(1, idx)
        return normalise(w) if block.gate.norm_topk_prob else w

    def shared(self, block, x):
        return torch.sigmoid(block.shared_expert_gate(x)) * block.shared_expert(x)


class Qwen3MoeAdapter(Qwen2MoeAdapter):
    model_types = ("qwen3_moe",)

    def shared(self, block, x):
        return None
