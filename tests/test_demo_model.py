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


def test_default_prompt_continues_as_a_play(capsys):
    """`moelite generate --prompt "ROMEO:"` with the CLI's default sampling writes a play, not code: over five
    seeds, no Python: the speech starts on the next line, as after the corpus' NAME: speaker lines."""
    import json
    import re

    from moelite.cli import main

    for seed in range(5):
        assert main(["generate", "--prompt", "ROMEO:", "--seed", str(seed), "--max-tokens", "48", "--json"]) == 0
        text = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["text"]
        assert re.match(r"\n['A-Z]", text), text
        assert not re.search(r"\b(def|import|self|return|class|None)\b|[=(]\s*\w+\)|    ", text), text
