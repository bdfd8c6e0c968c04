"""Real-shape synthetic checkpoints for I/O-realistic benchmarks.

Contract: `make_realshape(out, preset, layers)` writes a standard Hugging Face Qwen2-MoE checkpoint (config.json,
sharded *.safetensors + index, optional tokenizer copied from another model) whose routed experts have the shapes
of a real model (e.g. Qwen3-30B-A3B's hidden 2048 / expert intermediate 768) but fewer layers and random weights.
Random routing is meaningless, so benchmarks run these with `TraceReplay` (routing of the trained demo model).
Weights are slices of one random pool (content does not matter for I/O; values stay finite and small).

CLI: moelite realshape OUT [--preset qwen3-30b-a3b-64e] [--layers 8] [--tokenizer-from DIR] [--force]
(moelite/cli/realshape.py; it refuses a non-empty OUT unless --force).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM, Qwen2MoeConfig

from moelite.core.integrity import forget

PRESETS = {
    # Qwen3-30B-A3B expert shapes with the demo model's 64 experts / top-8 / one shared expert
    "qwen3-30b-a3b-64e": dict(hidden_size=2048, moe_intermediate_size=768, num_experts=64, num_experts_per_tok=8,
                              shared_expert_intermediate_size=768, intermediate_size=6144, num_attention_heads=16,
                              num_key_value_heads=4),
    # Qwen3-30B-A3B routed experts as they are: 128 experts, top-8
    "qwen3-30b-a3b": dict(hidden_size=2048, moe_intermediate_size=768, num_experts=128, num_experts_per_tok=8,
                          shared_expert_intermediate_size=768, intermediate_size=6144, num_attention_heads=16,
                          num_key_value_heads=4),
}
SHARD_BYTES = 1 << 30


def make_realshape(out: str | Path, preset: str = "qwen3-30b-a3b-64e", layers: int = 8, vocab_size: int = 4096,
                   dtype: torch.dtype = torch.bfloat16, tokenizer_from: str | Path | None = None, seed: int = 0,
                   progress: bool = True, **overrides) -> Path:
    if preset not in PRESETS:
        raise ValueError(f"preset: {preset!r} is not one of {', '.join(PRESETS)}")
    if layers < 1:
        raise ValueError(f"layers: {layers} must be >= 1")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_from is not None:
        vocab_size = json.loads((Path(tokenizer_from) / "config.json").read_text())["vocab_size"]
    cfg = Qwen2MoeConfig(vocab_size=vocab_size, num_hidden_layers=layers, max_position_embeddings=4096,
                         norm_topk_prob=False, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                         **{**PRESETS[preset], **overrides})
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(cfg)
    gen = torch.Generator().manual_seed(seed)
    pool = (torch.randn(1 << 24, generator=gen) * 0.02).to(dtype)  # 16M random values, sliced per tensor

    def tensor(shape) -> torch.Tensor:
        n = 1
        for s in shape:
            n *= s
        start = int(torch.randint(0, pool.numel(), (1,), generator=gen))
        reps = -(-(start + n) // pool.numel())
        flat = pool.repeat(reps)[start:start + n] if reps > 1 else pool[start:start + n]
        return flat.reshape(shape).clone()

    names: list[tuple[str, tuple]] = []
    for name, p in skeleton.named_parameters():
        if ".mlp.experts." in name:
            continue
        shape = tuple(p.shape)
        names.append((name, shape))
    for layer in range(layers):
        for e in range(cfg.num_experts):
            for proj, shape in (("gate_proj", (cfg.moe_intermediate_size, cfg.hidden_size)),
                                ("up_proj", (cfg.moe_intermediate_size, cfg.hidden_size)),
                                ("down_proj", (cfg.hidden_size, cfg.moe_intermediate_size))):
                names.append((f"model.layers.{layer}.mlp.experts.{e}.{proj}.weight", shape))

    shards: list[list[tuple[str, tuple]]] = [[]]
    size = 0
    for name, shape in names:
        nbytes = dtype.itemsize
        for s in shape:
            nbytes *= s
        if size + nbytes > SHARD_BYTES and shards[-1]:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    weight_map = {}
    total = len(shards)
    for i, shard in enumerate(tqdm(shards, desc="writing shards", disable=not progress)):
        fname = f"model-{i + 1:05d}-of-{total:05d}.safetensors"
        state = {}
        for name, shape in shard:
            t = tensor(shape)
            if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                t = torch.ones(shape, dtype=dtype)
            state[name] = t
            weight_map[name] = fname
        save_file(state, str(out / fname), metadata={"format": "pt"})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}, indent=1))
    cfg.dtype = str(dtype).replace("torch.", "")
    cfg.save_pretrained(out)
    if tokenizer_from is not None:
        for f in Path(tokenizer_from).iterdir():
            if f.name.startswith(("tokenizer", "special_tokens", "generation_config")):
                shutil.copy(f, out / f.name)
    forget(out)  # written on purpose (perhaps over an earlier one, --force): its checksums are recorded anew
    return out

