"""The embedded default model: the trained demo checkpoint shipped in `moelite/demo_model/` when present,
otherwise a small random Qwen2-MoE checkpoint built once in the user cache (so a fresh install always runs)."""

from __future__ import annotations

import os
from pathlib import Path

from moelite.tiny import make_tiny_checkpoint

SHIPPED = Path(__file__).with_name("demo_model")


def demo_model_path() -> Path:
    if (SHIPPED / "config.json").is_file() and any(SHIPPED.glob("*.safetensors")):
        return SHIPPED
    cache = Path(os.environ.get("MOELITE_CACHE", Path.home() / ".cache" / "moelite")) / "tiny-qwen2-moe"
    if not (cache / "config.json").is_file():
        make_tiny_checkpoint("qwen2_moe", cache, tokenizer=True, vocab_size=300, num_experts=16,
                             num_experts_per_tok=4, hidden_size=128, num_hidden_layers=4)
    return cache
