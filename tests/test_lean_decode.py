"""Lean decode (core/lean_decode.py) computes what transformers' forward computes, batched or not, and counts what
the full path counts."""

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import moelite
from moelite.core import lean_decode


def _hf_steps(ref, prompt, tokens):
    """transformers' logits [V] after the prompt and after each fed token."""
    cache = DynamicCache(config=ref.config)
    with torch.no_grad():
        out = [ref(torch.tensor([prompt]), past_key_values=cache, use_cache=True).logits[0, -1]]
        for t in tokens:
            out.append(ref(torch.tensor([[t]]), past_key_values=cache, use_cache=True).logits[0, -1])
    return out


def _prefill(eng, prompt):
    cache = DynamicCache(config=eng.hf_config)
    with torch.inference_mode():
        logits = eng.model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True).logits[0, -1]
    return cache, logits


def test_lean_step_equals_transformers(tiny, arch, one_thread):
    path = tiny(arch)
    eng = moelite.load(path, expert_budget="25%")
    if arch.startswith("deepseek"):  # latent attention: transformers' forward decodes
        assert eng.lean is None and "model_type" in eng.lean_why
        return
    assert eng.lean is not None and eng.lean_why == "on" and eng.stats()["lean_decode"] == "on"
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    prompt, fed = [5, 9, 14, 30, 2], [7, 44, 3, 100, 12, 8]
    want = _hf_steps(ref, prompt, fed)
    cache, _ = _prefill(eng, prompt)
    for i, t in enumerate(fed):
        got = eng.lean.step([t], [cache])
        assert got.shape == (1, eng.hf_config.vocab_size) and got.dtype == torch.float32
        assert (got[0] - want[i + 1]).abs().max().item() < 1e-4, f"step {i}"
    assert cache.get_seq_length() == len(prompt) + len(fed)


@pytest.mark.parametrize("arch", ["qwen3_moe", "olmoe"])
def test_lean_batch_rows_equal_each_sequence_alone(tiny, arch, one_thread):
    """Sequences of different lengths in one step: each row is that sequence's own decode."""
    kw = {"clip_qkv": 0.05} if arch == "olmoe" else {}  # OLMoE's clipping, at a value that bites
    eng = moelite.load(tiny(arch, **kw), expert_budget="100%")
    prompts = [[5, 9, 14], [3, 8, 21, 40, 2, 11, 6], [17]]
    caches = [_prefill(eng, p)[0] for p in prompts]
    alone = [_prefill(eng, p)[0] for p in prompts]
    for step in range(3):
        toks = [10 + step, 20 + step, 30 + step]
        batch = eng.lean.step(toks, caches)
        for i, (t, c) in enumerate(zip(toks, alone)):
            assert (batch[i] - eng.lean.step([t], [c])[0]).abs().max().item() < 1e-5, f"row {i}, step {step}"
    assert [c.get_seq_length() for c in caches] == [len(p) + 3 for p in prompts]


def test_olmoe_clip_matches_transformers(tiny, one_thread):
    path = tiny("olmoe", clip_qkv=0.05)
    eng = moelite.load(path, expert_budget="100%")
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    want = _hf_steps(ref, [4, 8, 15], [16, 23, 42])
    cache, _ = _prefill(eng, [4, 8, 15])
    for i, t in enumerate([16, 23, 42]):
        assert (eng.lean.step([t], [cache])[0] - want[i + 1]).abs().max().item() < 1e-4


@pytest.mark.parametrize("budget", ["25%", "100%"])
def test_lean_and_full_path_generate_and_count_the_same(tiny, budget, one_thread):
    """Same tokens, same hits, misses and policy accesses with and without lean decode (the all-resident lane of
    the expert manager included: at 100% every decode layer takes it)."""
    path = tiny("qwen2_moe")
    runs = []
    for lean in (True, False):
        eng = moelite.load(path, expert_budget=budget, lean_decode=lean, warm_start=budget == "100%")
        eng.eos_ids = set()
        g = eng.generate([5, 9, 14, 3], max_tokens=12, temperature=0)
        s = eng.stats()
        runs.append((g.token_ids, s["decode_exact_hit_rate"], s["expert_bytes_read"], s["exact_hit_rate"],
                     sorted(eng.manager.cache.slot_of)))
    assert runs[0] == runs[1]


def test_why_not_names_the_reason(tiny):
    eng = moelite.load(tiny("qwen3_moe"), expert_budget="25%")
    assert lean_decode.why_not(eng.model, eng.hf_config, torch.device("cuda")).startswith("lean decode runs on the CPU")
    eng.hf_config._attn_implementation = "eager"
    assert "'eager'" in lean_decode.why_not(eng.model, eng.hf_config, torch.device("cpu"))


def test_a_module_hook_sends_the_step_through_transformers(tiny, one_thread):
    eng = moelite.load(tiny("mixtral"), expert_budget="100%")
    eng.eos_ids = set()
    want = eng.generate([5, 9, 14], max_tokens=6, temperature=0).token_ids
    seen = []
    handle = eng.model.model.layers[1].self_attn.register_forward_hook(lambda m, a, out: seen.append(1))
    try:
        assert eng.lean.hooked()
        assert eng.generate([5, 9, 14], max_tokens=6, temperature=0).token_ids == want
    finally:
        handle.remove()
    assert len(seen) == 6 and not eng.lean.hooked()  # the prefill and 5 decode steps
