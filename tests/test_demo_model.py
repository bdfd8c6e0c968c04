"""The shipped demo model: a standard checkpoint that transformers loads and moelite reproduces exactly."""

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import moelite
from moelite.demo import SHIPPED

pytestmark = pytest.mark.skipif(not (SHIPPED / "config.json").is_file(), reason="demo model not built")


@pytest.fixture(scope="module")
def ref():
    return AutoModelForCausalLM.from_pretrained(SHIPPED, dtype=torch.float32)


@pytest.mark.parametrize("budget", ["min", "25%", "100%"])
def test_demo_model_matches_transformers(ref, budget):
    tok = AutoTokenizer.from_pretrained(SHIPPED)
    ids = torch.tensor([tok.encode("ROMEO.\nBut soft, what light through yonder window breaks?")])
    if budget == "min":
        probe = moelite.load(None, expert_budget="100%")
        budget = probe.top_k * probe.pool.slot_bytes
    eng = moelite.load(None, expert_budget=budget)
    assert eng.path == SHIPPED and eng.num_experts >= 32 and eng.top_k >= 4
    with torch.no_grad():
        expected = ref(ids).logits
    assert (eng.logits(ids) - expected).abs().max().item() < 1e-4
    eng.eos_ids = set()
    ref_ids = ref.generate(ids, max_new_tokens=32, do_sample=False, eos_token_id=None,
                           pad_token_id=tok.eos_token_id)[0, ids.shape[1]:].tolist()
    assert eng.generate(ids[0].tolist(), max_tokens=32, temperature=0).token_ids == ref_ids
    s = eng.stats()
    assert s["resident_expert_bytes_peak"] <= s["expert_budget_bytes"]
