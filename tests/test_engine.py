"""Engine behaviour: budgets, generation parameters, streaming, stats; generate, stream, generate_batch and
teacher forcing all run through the batcher's one step."""

import gc

import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

import moelite
from moelite.config import EngineConfig, parse_budget
from moelite.serve.batching import Batcher
from moelite.serve.runner import DynamicRunner


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
        d = eng.counters().decode
        counts.append(d.hits + d.misses + d.in_flight + d.substitutions)
    assert counts[0] == counts[1] == 3 * 4 * len(eng.layout.layers)  # 3 decode steps x top-4 x MoE layers


# ---- one decode loop -----------------------------------------------------------------------------------------
@torch.inference_mode()
def _greedy_reference(eng, prompt: list[int], n: int) -> list[int]:
    """Greedy decode as a plain loop over the model: prefill, then one forward per token (the engine's own loop
    before it became a batch of one)."""
    cache, out = DynamicCache(config=eng.hf_config), []
    with eng.manager.prefilling():
        logits = eng.model(input_ids=torch.tensor([prompt]), past_key_values=cache, use_cache=True).logits[0, -1]
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = eng.model(input_ids=torch.tensor([[out[-1]]]), past_key_values=cache, use_cache=True).logits[0, -1]
    return out


@pytest.fixture
def count_steps(monkeypatch):
    calls = []
    step = Batcher.step

    def counting(self):
        calls.append(type(self.runner).__name__)
        return step(self)
    monkeypatch.setattr(Batcher, "step", counting)
    return calls


def test_generate_stream_and_batch_are_steps_of_the_batcher(tiny, one_thread, count_steps):
    path = tiny("olmoe", tokenizer=True)
    eng = moelite.load(path, expert_budget="25%")
    eng.eos_ids = set()
    prompt = eng.encode("hello there")
    want = _greedy_reference(moelite.load(path, expert_budget="100%"), prompt, 12)
    g = eng.generate(prompt, max_tokens=12, temperature=0)
    assert g.token_ids == want and g.text == eng.decode(want) and g.finish_reason == "length"
    assert count_steps == ["DynamicRunner"] * 11  # step 1: prefill + first token + a decode step; then one each
    count_steps.clear()
    assert "".join(eng.stream(prompt, max_tokens=12, temperature=0)) == g.text and len(count_steps) == 11
    count_steps.clear()
    batch = eng.generate_batch([prompt, prompt[:2]], max_tokens=6, temperature=0)
    assert batch[0].token_ids == want[:6] and batch[0].stats["decode_steps"] == 5
    assert count_steps == ["StaticRunner"] * 5
    count_steps.clear()
    before = eng.counters()
    for bad in (dict(prompt=[1, 10 ** 6]), dict(prompt=prompt, max_tokens=10 ** 4), dict(prompt=[])):
        with pytest.raises(ValueError, match="prompt|max_tokens"):
            eng.generate(**bad)
    assert count_steps == [] and (eng.counters() - before).total.evaluations == 0  # refused before model work


def test_batch_one_decode_is_the_plain_forward(tiny, one_thread, monkeypatch):
    """Without lean decode, one running sequence decodes with one plain model call per token (no per-layer walk)."""
    eng = moelite.load(tiny("qwen2_moe"), expert_budget="50%", lean_decode=False)
    assert eng.lean is None and eng.lean_why == "off"
    eng.eos_ids = set()
    calls = []
    forward = type(eng.model).forward

    def counting(self, *a, **kw):
        calls.append(kw["input_ids"].shape)
        return forward(self, *a, **kw)
    monkeypatch.setattr(type(eng.model), "forward", counting)
    eng.generate([5, 9, 14], max_tokens=5, temperature=0)
    assert calls == [(1, 3)] + [(1, 1)] * 4


def test_failed_prefill_raises_its_error_and_leaves_the_engine_usable(tiny, one_thread, monkeypatch):
    eng = moelite.load(tiny("mixtral"), expert_budget="50%")
    eng.eos_ids = set()
    want = eng.generate([5, 9], max_tokens=4, temperature=0).token_ids

    def boom(self, seqs):
        raise RuntimeError("boom in prefill")
    with monkeypatch.context() as mp:
        mp.setattr(DynamicRunner, "prefill", boom)
        with pytest.raises(RuntimeError, match="boom in prefill"):
            eng.generate([5, 9], max_tokens=4, temperature=0, substitution_alpha=0.5)
    assert eng.manager.alpha == 0.0 and eng.lock.acquire(blocking=False)
    eng.lock.release()
    assert eng.generate([5, 9], max_tokens=4, temperature=0).token_ids == want


@torch.inference_mode()
def _forced_reference(eng, ids, start):
    """The teacher-forced decode path as a plain loop: prefill ids[:start-1], feed ids[start-1:-1] one by one."""
    cache, rows = DynamicCache(config=eng.hf_config), []
    if start > 1:
        with eng.manager.prefilling():
            eng.model(input_ids=torch.tensor([ids[:start - 1]]), past_key_values=cache, use_cache=True)
    for t in range(start - 1, len(ids) - 1):
        rows.append(eng.model(input_ids=torch.tensor([[ids[t]]]), past_key_values=cache, use_cache=True).logits[0, -1])
    return torch.stack(rows).float()


def test_teacher_force_is_a_forced_sequence_with_a_per_call_alpha(tiny, one_thread, count_steps):
    path = tiny("qwen2_moe", num_experts=16, num_experts_per_tok=4, num_hidden_layers=3)
    ids = torch.randint(3, 128, (14,), generator=torch.Generator().manual_seed(3)).tolist()
    ref = moelite.load(path, expert_budget="100%")
    for start in (1, 5):
        want = _forced_reference(ref, ids, start)
        got = moelite.load(path, expert_budget="25%").teacher_force(ids, start)
        assert got.shape == (len(ids) - start, 128) and (got - want).abs().max() < 1e-5
    assert count_steps and set(count_steps) == {"DynamicRunner"}
    eng = moelite.load(path, expert_budget="25%")
    before = eng.counters()
    sub = eng.teacher_force(ids, 1, substitution_alpha=0.7)
    spent = (eng.counters() - before)
    assert spent.decode.substitutions > 0 and spent.prefill.evaluations == 0  # start=1: every row is a decode step
    assert eng.manager.alpha == 0.0 and (sub - _forced_reference(ref, ids, 1)).abs().max() > 1e-4
    exact = eng.teacher_force(ids, 1)  # the alpha ended with the call that set it
    assert (exact - _forced_reference(ref, ids, 1)).abs().max() < 1e-5
    assert eng.stats()["requests"] == 0  # scoring is not a request
    with pytest.raises(ValueError, match="start"):
        eng.teacher_force(ids, len(ids))


def test_load_ends_with_the_garbage_collector_settled(tiny):
    """Loading leaves its long-lived objects (modules, parameters, a tokenizer's vocabulary) counted towards Python's
    next full collection, which on the real-shape checkpoint took 0.1 s and landed in the first request's decode
    steps. Load ends with that collection done: every generation's count is back near zero."""
    eng = moelite.load(tiny("qwen3_moe"), expert_budget="50%")
    count = gc.get_count()
    assert count[1:] == (0, 0), count
    eng.close()
