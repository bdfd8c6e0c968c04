"""Engine behaviour: budgets, generation parameters, streaming, stats."""

import pytest
import torch
from transformers import AutoModelForCausalLM

import moelite
from moelite.config import EngineConfig, parse_budget


def test_parse_budget_forms():
    assert parse_budget("25%") == ("fraction", 0.25)
    assert parse_budget("2GiB") == ("bytes", 2 * 1024**3)
    assert parse_budget(1000) == ("bytes", 1000.0)
    assert parse_budget("512 MB") == ("bytes", 512e6)
    for bad in ("0%", "150%", "lots", -5, 0, True, "3 parsecs"):
        with pytest.raises(ValueError, match="expert_budget"):
            parse_budget(bad)


def test_config_validation_messages():
    with pytest.raises(ValueError, match="cache_policy: 'mru' is not one of lru, lfu, score, fifo"):
        EngineConfig(cache_policy="mru").validate()
    with pytest.raises(ValueError, match="device: 'tpu' is not"):
        EngineConfig(device="tpu").validate()
    with pytest.raises(ValueError, match=r"substitution_alpha: 1.5 must be a number in \[0, 1\)"):
        EngineConfig(substitution_alpha=1.5).validate()
    with pytest.raises(ValueError, match="unknown option"):
        moelite.load(None, bogus=1)


def test_budget_below_topk_refused_with_numbers(tiny):
    path = tiny("mixtral")
    with pytest.raises(ValueError) as err:
        moelite.load(path, expert_budget=1000)
    msg = str(err.value)
    assert "holds 0 expert slots" in msg and "top-k needs 2" in msg and "raise the budget" in msg
    with pytest.raises(ValueError, match="x 2 layers|x 3 layers"):
        moelite.load(path, expert_budget="10%", cache_scope="layer")


def test_experts_4x_budget_generate_correctly(tiny):
    """Routed experts >= 4x the budget: output still exact, peak resident bytes within the budget."""
    path = tiny("qwen2_moe", num_experts=16, num_experts_per_tok=4, num_hidden_layers=4)
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    eng = moelite.load(path, expert_budget="20%")
    s = eng.stats()
    assert s["routed_expert_bytes"] >= 4 * s["expert_budget_bytes"]
    ids = torch.randint(3, 128, (1, 8))
    ref_ids = ref.generate(ids, max_new_tokens=24, do_sample=False, eos_token_id=None,
                           pad_token_id=0)[0, 8:].tolist()
    eng.eos_ids = set()
    gen = eng.generate(ids[0].tolist(), max_tokens=24, temperature=0)
    assert gen.token_ids == ref_ids
    s = eng.stats()
    assert s["expert_misses"] > 0 and s["expert_evictions"] > 0
    assert 0 < s["resident_expert_bytes_peak"] <= s["expert_budget_bytes"]
    assert s["expert_bytes_read"] == s["expert_misses"] * eng.layout.disk_bytes


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "score"])
def test_every_policy_gives_exact_tokens(tiny, policy):
    path = tiny("qwen2_moe", num_experts=16, num_experts_per_tok=4, num_hidden_layers=4)
    exact = moelite.load(path, expert_budget="100%").generate([5, 9, 14], max_tokens=12, temperature=0)
    eng = moelite.load(path, expert_budget="25%", cache_policy=policy)
    assert eng.generate([5, 9, 14], max_tokens=12, temperature=0).token_ids == exact.token_ids


def test_generate_text_stream_stop_and_seed(tiny):
    eng = moelite.load(tiny("olmoe", tokenizer=True), expert_budget="50%")
    a = eng.generate("hello", max_tokens=20, temperature=1.0, seed=7)
    b = eng.generate("hello", max_tokens=20, temperature=1.0, seed=7)
    assert a.token_ids == b.token_ids and a.text == b.text
    pieces = list(eng.stream("hello", max_tokens=20, temperature=1.0, seed=7))
    assert "".join(pieces) == a.text
    stats = a.stats
    for key in ("ttft_s", "decode_tok_s", "expert_hits", "expert_misses", "expert_bytes_read", "prompt_tokens"):
        assert key in stats
    if len(a.text) > 3:
        stop = a.text[2:4]
        c = eng.generate("hello", max_tokens=20, temperature=1.0, seed=7, stop=[stop])
        assert c.finish_reason == "stop" and stop not in c.text and a.text.startswith(c.text)


def test_generation_param_errors(tiny):
    eng = moelite.load(tiny("olmoe", tokenizer=True))
    with pytest.raises(ValueError, match="top_p"):
        eng.generate("hi", top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        eng.generate("hi", temperature=float("nan"))
    with pytest.raises(ValueError, match="max_tokens"):
        eng.generate("hi", max_tokens=0)
    with pytest.raises(ValueError, match="exceeds the model context of 256"):
        eng.generate("hi", max_tokens=1000)
    with pytest.raises(ValueError, match="prompt: empty"):
        eng.generate("")
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 128\)"):
        eng.logits(torch.tensor([[1, 500]]))


def test_stats_keys(tiny):
    eng = moelite.load(tiny("mixtral"), expert_budget="50%")
    eng.logits(torch.tensor([[3, 4, 5]]))
    s = eng.stats()
    for key in ("expert_budget_bytes", "resident_expert_bytes_peak", "expert_hits", "expert_misses",
                "expert_bytes_read"):
        assert key in s
    assert s["expert_misses"] > 0 and s["per_layer"]


def test_request_alpha_does_not_leak_into_later_calls(tiny, one_thread):
    path = tiny("qwen2_moe", num_experts=16, num_experts_per_tok=4, num_hidden_layers=3)
    eng = moelite.load(path, expert_budget="25%")
    ref = moelite.load(path, expert_budget="100%")
    eng.eos_ids = set()
    for _ in eng.stream([5, 9, 14, 20], max_tokens=6, temperature=0, substitution_alpha=0.9):
        pass
    assert eng.manager.alpha == eng.config.substitution_alpha == 0.0
    ids = torch.tensor([[7]])  # one position: a decode-shaped forward, still exact
    assert (eng.logits(ids) - ref.logits(ids)).abs().max() < 1e-5
    before = eng.stats()["expert_substitutions"]
    eng.generate([5, 9], max_tokens=6, temperature=0)
    assert eng.stats()["expert_substitutions"] == before


def test_one_token_prompt_prefill_is_not_counted_as_decode(tiny, one_thread):
    path = tiny("qwen2_moe", num_experts=16, num_experts_per_tok=4, num_hidden_layers=3)
    counts = []
    for prompt in ([5], [5, 9, 14]):
        eng = moelite.load(path, expert_budget="25%")
        eng.eos_ids = set()
        eng.generate(prompt, max_tokens=4, temperature=0)
        m = eng.manager
        counts.append(m.decode_hits + m.decode_misses)
    assert counts[0] == counts[1] == 3 * 4 * len(eng.layout.layers)  # 3 decode steps x top-4 x MoE layers
