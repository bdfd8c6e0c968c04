"""Token sampling: `sample(logits, params, generator)` picks the next token under `SamplingParams` (temperature 0 =
greedy, then top-k, then top-p). `SamplingParams` (defined and validated in moelite.config, torch-free, so the CLI
checks sampling flags before loading anything) is re-exported here."""

from __future__ import annotations

import torch

from moelite.config import SamplingParams

__all__ = ["SamplingParams", "sample"]


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Pick the next token from logits [V] (float32)."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    scores = logits.float() / params.temperature
    if params.top_k and params.top_k < scores.numel():
        kth = torch.topk(scores, params.top_k).values[-1]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    if params.top_p < 1.0:
        sorted_p, sorted_i = torch.sort(probs, descending=True)
        cum = torch.cumsum(sorted_p, 0)
        drop = cum - sorted_p > params.top_p  # keep the smallest prefix reaching top_p
        sorted_p = sorted_p.masked_fill(drop, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, sorted_i, sorted_p)
    return int(torch.multinomial(probs, 1, generator=generator))
