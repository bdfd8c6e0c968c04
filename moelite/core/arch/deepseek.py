"""DeepSeek-V2 and -V3 routing; both add shared experts and keep the first `first_k_dense_replace` layers dense.

V2: softmax scores; top-k greedy or group-limited (only experts of the `topk_group` groups with the highest
    max score compete); weights = scores * routed_scaling_factor (no renormalisation).
V3: sigmoid scores; ranking adds `e_score_correction_bias`; groups ranked by the sum of their top-2 biased scores;
    weights = unbiased scores, renormalised if `norm_topk_prob`, times routed_scaling_factor."""

import torch
import torch.nn.functional as F

from moelite.core.arch.base import ArchAdapter, normalise


def _group_mask(group_scores: torch.Tensor, topk_group: int, n_group: int, n_experts: int) -> torch.Tensor:
    # group_scores [N, G] -> bool mask [N, E] of experts in the best `topk_group` groups
    keep = torch.topk(group_scores, k=topk_group, dim=-1).indices
    mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
    return mask.unsqueeze(-1).expand(-1, n_group, n_experts // n_group).reshape(-1, n_experts)


class DeepseekV2Adapter(ArchAdapter):
    model_types = ("deepseek_v2",)

    def num_experts(self, config) -> int:
        return int(config.n_routed_experts)

    def logits(self, block, x):
        return F.linear(x.float(), block.gate.weight.float())

    def scores(self, block, x):
        gate = block.gate
        probs = self.logits(block, x).softmax(dim=-1, dtype=torch.float32)
        if gate.topk_method != "group_limited_greedy":
            return probs, probs
        n, e = probs.shape
        group_scores = probs.view(n, gate.num_group, e // gate.num_group).max(dim=-1).values
        mask = _group_mask(group_scores, gate.topk_group, gate.num_group, e)
        return probs, probs.masked_fill(~mask, 0.0)

    def weigh(self, block, probs, idx):
        return probs.gather(1, idx) * block.gate.routed_scaling_factor

    def shared(self, block, x):
        return block.shared_experts(x)


class DeepseekV3Adapter(DeepseekV2Adapter):
    model_types = ("deepseek_v3",)

    def scores(self, block, x):
        gate = block.gate
        probs = self.logits(block, x).sigmoid()
        biased = probs + gate.e_score_correction_bias
        n, e = probs.shape
        group_scores = biased.view(n, gate.num_group, e // gate.num_group).topk(2, dim=-1)[0].sum(dim=-1)
        mask = _group_mask(group_scores, gate.topk_group, gate.num_group, e)
        return probs, biased.masked_fill(~mask, float("-inf"))

    def weigh(self, block, probs, idx):
        w = probs.gather(1, idx)
        if block.gate.norm_topk_prob:
            w = normalise(w, 1e-20)
        return w * block.gate.routed_scaling_factor
