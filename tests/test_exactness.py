"""With substitution off, moelite equals transformers for every architecture and budget."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import moelite

BUDGETS = ("min", "25%", "100%")


def _budget(eng_cls_budget, path):
    if eng_cls_budget != "min":
        return eng_cls_budget
    probe = moelite.load(path, expert_budget="100%")
    return probe.top_k * probe.pool.slot_bytes  # exactly one layer's top-k


@pytest.mark.parametrize("budget", BUDGETS)
def test_logits_and_greedy_match_transformers(tiny, arch, budget):
    path = tiny(arch)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    eng = moelite.load(path, expert_budget=_budget(budget, path))
    torch.manual_seed(1)
    ids = torch.randint(3, 128, (2, 10))
    with torch.no_grad():
        expected = ref(ids).logits
    got = eng.logits(ids)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max().item() < 1e-4

    prompt = ids[0].tolist()
    ref_ids = ref.generate(ids[:1], max_new_tokens=32, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, len(prompt):].tolist()
    eng.eos_ids = set()  # compare all 32 tokens like transformers with eos disabled
    gen = eng.generate(prompt, max_tokens=32, temperature=0)
    assert gen.token_ids == ref_ids
    s = eng.stats()
    assert s["resident_expert_bytes_peak"] <= s["expert_budget_bytes"]


@pytest.mark.parametrize("norm", [True, False])
def test_qwen3_norm_topk_prob(tiny, norm):
    path = tiny("qwen3_moe", norm_topk_prob=norm)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(3, 128, (1, 12))
    with torch.no_grad():
        expected = ref(ids).logits
    assert (moelite.load(path, expert_budget="25%").logits(ids) - expected).abs().max() < 1e-4


def test_deepseek_v2_greedy_topk(tiny):
    path = tiny("deepseek_v2", topk_method="greedy")
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ids = torch.randint(3, 128, (1, 12))
    with torch.no_grad():
        expected = ref(ids).logits
    assert (moelite.load(path).logits(ids) - expected).abs().max() < 1e-4


def test_bf16_checkpoint_upcast_on_cpu(tiny):
    path = tiny("qwen2_moe", dtype=torch.bfloat16)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    eng = moelite.load(path, expert_budget="25%", expert_dtype="float32")  # asked for: bf16 read, float32 slots
    assert eng.pool.dtype == torch.float32 and eng.layout.disk_dtype == torch.bfloat16
    ids = torch.randint(3, 128, (1, 12))
    with torch.no_grad():
        expected = ref(ids).logits
    assert (eng.logits(ids) - expected).abs().max() < 1e-4
    assert eng.stats()["expert_bytes_read"] % eng.layout.disk_bytes == 0  # read at disk size (bf16)
