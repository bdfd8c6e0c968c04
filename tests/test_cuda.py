"""CUDA path (slots in GPU memory, pinned staging, copy stream): runs wherever a CUDA GPU is available."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import moelite

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU on this machine")


@pytest.mark.parametrize("prefetch", [False, True])
def test_cuda_matches_transformers(tiny, arch, prefetch):
    path = tiny(arch)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    eng = moelite.load(path, device="cuda", expert_budget="25%", expert_dtype="float32", prefetch=prefetch)
    assert eng.pool.buffer.is_cuda
    ids = torch.randint(3, 128, (2, 10))
    with torch.no_grad():
        expected = ref(ids).logits
    assert (eng.logits(ids) - expected).abs().max() < 1e-4
    eng.eos_ids = set()
    ref_ids = ref.generate(ids[:1], max_new_tokens=16, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, 10:].tolist()
    assert eng.generate(ids[0].tolist(), max_tokens=16, temperature=0).token_ids == ref_ids
    s = eng.stats()
    assert s["resident_expert_bytes_peak"] <= s["expert_budget_bytes"]


@pytest.mark.parametrize("miss_policy", ["direct", "hybrid"])
def test_cuda_direct_misses_compute_on_host_exactly(tiny, miss_policy):
    path = tiny("qwen2_moe", num_experts=16, num_experts_per_tok=4, num_hidden_layers=4)
    ref = moelite.load(path, expert_budget="100%", expert_dtype="float32")
    eng = moelite.load(path, device="cuda", expert_budget="25%", expert_dtype="float32", miss_policy=miss_policy)
    ids = torch.randint(3, 128, (2, 12))
    assert (eng.logits(ids).cpu() - ref.logits(ids)).abs().max() < 1e-4
    ref.eos_ids = eng.eos_ids = set()
    want = ref.generate([5, 9, 14, 20], max_tokens=16, temperature=0).token_ids
    assert eng.generate([5, 9, 14, 20], max_tokens=16, temperature=0).token_ids == want
    s = eng.stats()
    assert s["misses_direct"] > 0 and s["misses_loaded"] + s["misses_direct"] == s["expert_misses"]
    assert s["resident_expert_bytes_peak"] <= s["expert_budget_bytes"]


def test_cuda_bf16_slots_and_substitution(tiny):
    path = tiny("qwen2_moe", num_experts=16, num_experts_per_tok=4, num_hidden_layers=4)
    eng = moelite.load(path, device="cuda", expert_budget="25%", expert_dtype="bfloat16", prefetch=True,
                       cache_policy="score")
    assert eng.pool.buffer.dtype == torch.bfloat16
    eng.eos_ids = set()
    exact = eng.generate([5, 9, 14, 20], max_tokens=24, temperature=0, substitution_alpha=0.0)
    again = eng.generate([5, 9, 14, 20], max_tokens=24, temperature=0, substitution_alpha=0.0)
    assert exact.token_ids == again.token_ids and exact.stats["expert_substitutions"] == 0
    sub = eng.generate([5, 9, 14, 20], max_tokens=24, temperature=0, substitution_alpha=0.9)
    assert sub.stats["expert_substitutions"] > 0
    s = eng.stats()
    assert s["resident_expert_bytes_peak"] <= s["expert_budget_bytes"]
