"""Mixtral: softmax over all experts, top-k, weights renormalised over the top-k; no shared expert.

On disk: model.layers.L.block_sparse_moe.experts.E.{w1 (gate), w3 (up), w2 (down)}.weight."""

import re

from moelite.core.arch.base import ArchAdapter, normalise


class MixtralAdapter(ArchAdapter):
    model_types = ("mixtral",)
    expert_key = re.compile(r"^model\.layers\.(\d+)\.(?:block_sparse_moe|mlp)\.experts\.(\d+)\.(w1|w2|w3)\.weight$")
    proj_names = {"w1": "gate", "w3": "up", "w2": "down"}
    renames = ((".block_sparse_moe.", ".mlp."),)

    def num_experts(self, config) -> int:
        return int(config.num_local_experts)

    def weigh(self, block, probs, idx):
        return normalise(probs.gather(1, idx))
