"""OLMoE: softmax over all experts, top-k, renormalised only if `norm_topk_prob`; no shared expert."""

from moelite.core.arch.base import ArchAdapter, normalise


class OlmoeAdapter(ArchAdapter):
    model_types = ("olmoe",)

    def weigh(self, block, probs, idx):
        w = probs.gather(1, idx)
        return normalise(w) if block.gate.norm_topk_prob else w
