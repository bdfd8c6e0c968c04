"""Tiny random checkpoints of every supported architecture, written by transformers itself.

Used by the tests, by `moelite generate` before a trained demo model exists, and by benchmarks. Each is a standard
Hugging Face folder (config.json + model.safetensors [+ tokenizer]) made with `from_config` + `save_pretrained`.
`edit_header(file, edit)` rewrites a safetensors file's JSON header through `edit(header)` (the fault tests and
benchmarks/faults.py damage headers with it).
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (AutoModelForCausalLM, DeepseekV2Config, DeepseekV3Config, MixtralConfig, OlmoeConfig,
                          PreTrainedTokenizerFast, Qwen2MoeConfig, Qwen3MoeConfig)

def edit_header(f: Path, edit) -> None:
    """Rewrite safetensors file `f`'s JSON header through `edit(header)` (in place), keeping its tensor bytes."""
    data = Path(f).read_bytes()
    (hlen,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + hlen])
    edit(header)
    raw = json.dumps(header).encode()
    Path(f).write_bytes(struct.pack("<Q", len(raw)) + raw + data[8 + hlen:])


ARCHS = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3")


def tiny_config(arch: str, **overrides):
    common = dict(vocab_size=128, hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, num_experts_per_tok=2, bos_token_id=1, eos_token_id=2,
                  pad_token_id=0, tie_word_embeddings=False)
    if arch == "mixtral":
        cfg = dict(common, intermediate_size=32, num_local_experts=8)
        cls = MixtralConfig
    elif arch == "qwen2_moe":
        cfg = dict(common, intermediate_size=96, moe_intermediate_size=32, shared_expert_intermediate_size=48,
                   num_experts=8, norm_topk_prob=False)
        cls = Qwen2MoeConfig
    elif arch == "qwen3_moe":
        cfg = dict(common, intermediate_size=96, moe_intermediate_size=32, num_experts=8, head_dim=16,
                   norm_topk_prob=True)
        cls = Qwen3MoeConfig
    elif arch == "olmoe":
        cfg = dict(common, intermediate_size=32, num_experts=8, norm_topk_prob=False)
        cls = OlmoeConfig
    elif arch in ("deepseek_v2", "deepseek_v3"):
        cfg = dict(common, num_key_value_heads=4, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
                   n_shared_experts=1, kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16,
                   first_k_dense_replace=1, n_group=4, topk_group=2, routed_scaling_factor=2.5)
        if arch == "deepseek_v2":
            cfg.update(q_lora_rank=None, topk_method="group_limited_greedy")
            cls = DeepseekV2Config
        else:
            cfg.update(q_lora_rank=24, norm_topk_prob=True)
            cls = DeepseekV3Config
    else:
        raise ValueError(f"arch: {arch!r} is not one of {', '.join(ARCHS)}")
    cfg.update(overrides)
    return cls(**cfg)


def make_tiny_checkpoint(arch: str, out: str | Path, seed: int = 0, dtype=torch.float32, tokenizer: bool = False,
                         **overrides) -> Path:
    """Write a random `arch` checkpoint to `out`; weights scaled up so routing is decisive, not uniform."""
    out = Path(out)
    torch.manual_seed(seed)
    cfg = tiny_config(arch, **overrides)
    model = AutoModelForCausalLM.from_config(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.08)
            if name.endswith("gate.weight") and p.dim() == 2:
                p.normal_(0.0, 0.5)  # sharp router so top-k choices differ per token
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.uniform_(-0.05, 0.05)
    model.to(dtype).save_pretrained(out)
    if tokenizer:
        write_byte_tokenizer(out, cfg.vocab_size)
    return out


def write_byte_tokenizer(out: Path, vocab_size: int) -> None:
    """A byte-level BPE tokenizer with no merges beyond what fits `vocab_size` (for text I/O on random models)."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    specials = ["<pad>", "<s>", "</s>"]
    vocab = {t: i for i, t in enumerate(specials)}
    for ch in sorted(alphabet):
        if len(vocab) >= vocab_size:
            break
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(str(out))
