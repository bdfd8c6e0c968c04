"""Expert cache: each policy's victim, the protection shield, partitions and the fixed capacity."""

import pytest
import torch

import moelite
from moelite.core import native
from moelite.core.expert_cache import ExpertCache, make_policy


def _cache(policy: str, slots: int = 3, scope: str = "global", layers=(0, 1)) -> ExpertCache:
    return ExpertCache(slots, 100, make_policy(policy), list(layers), scope)


def _insert(cache: ExpertCache, key) -> int:
    slot = cache.acquire(key)
    cache.commit(key, slot)
    return slot


@pytest.mark.parametrize("policy,victim,kept", [
    ("lru", (0, 1), (0, 0)),  # the reused expert 0 is kept; the least recently used goes
    ("fifo", (0, 0), (0, 1)),  # reuse does not matter: the first in goes
])
def test_lru_and_fifo_victims_after_a_reuse(policy, victim, kept):
    c = _cache(policy)
    for e in range(3):
        _insert(c, (0, e))
    c.lookup((0, 0))
    _insert(c, (0, 3))
    assert c.last_evicted == victim and not c.resident(victim) and c.resident(kept)


def test_lfu_keeps_frequent():
    c = _cache("lfu")
    for e in range(3):
        _insert(c, (0, e))
    for _ in range(3):
        c.lookup((0, 0)), c.lookup((0, 2))
    _insert(c, (0, 3))
    assert c.last_evicted == (0, 1)


def test_score_policy_evicts_lowest_window_mean():
    c = _cache("score", slots=3)
    for e in range(3):
        _insert(c, (0, e))
    pol = c.policy
    pol.observe_scores(0, torch.tensor([0.5, 0.1, 0.4, 0.0]))
    pol.observe_scores(0, torch.tensor([0.0, 0.3, 0.4, 0.3]))  # means: 0.25, 0.2, 0.4
    c.lookup((0, 1))  # recency does not save a low-score expert
    _insert(c, (0, 3))
    assert c.last_evicted == (0, 1)
    # the window forgets: after `window` more observations only they count
    for _ in range(pol.window):
        pol.observe_scores(0, torch.tensor([0.0, 0.9, 0.9, 0.9]))
    _insert(c, (0, 1))
    assert c.last_evicted == (0, 0)


def test_score_policy_without_observations_falls_back_to_lru():
    c = _cache("score", slots=2)
    _insert(c, (1, 0)), _insert(c, (1, 1))
    c.lookup((1, 0))
    _insert(c, (1, 2))
    assert c.last_evicted == (1, 1)


@pytest.mark.parametrize("policy", ["lru", "lfu", "fifo", "score"])
def test_shield_pinned_slots_are_never_evicted(policy):
    c = _cache(policy, slots=2)
    a, b = _insert(c, (0, 0)), _insert(c, (0, 1))
    c.pin(a), c.pin(b)
    assert not c.can_acquire(0)
    with pytest.raises(RuntimeError, match="pinned"):
        c.acquire((0, 2))
    c.unpin(a)
    assert c.can_acquire(0)
    _insert(c, (0, 2))
    assert c.last_evicted == (0, 0) and c.resident((0, 1))
    assert c.resident_peak <= c.n_slots * c.slot_bytes


def test_layer_scope_partitions_slots():
    c = _cache("lru", slots=4, scope="layer")
    _insert(c, (0, 0)), _insert(c, (0, 1))
    _insert(c, (1, 0)), _insert(c, (1, 1))
    _insert(c, (0, 2))  # layer 0 evicts its own, never layer 1's
    assert c.last_evicted[0] == 0 and c.resident((1, 0)) and c.resident((1, 1))


def test_grouped_forward_matches_one_expert_at_a_time(tiny, monkeypatch):
    import moelite.core.moe_layer as ml

    eng = moelite.load(tiny("qwen3_moe"), expert_budget="100%", warm_start=True)
    m = eng.manager
    layer = eng.layout.layers[0]
    x = torch.randn(1, eng.hf_config.hidden_size, generator=torch.Generator().manual_seed(0))
    slots = [m.cache.slot((layer, e)) for e in (0, 3, 5)]
    w = torch.tensor([0.5, 0.3, 0.2])
    want = sum(wj * m.expert_forward(m.pool.gate_up(s), m.pool.down(s), x) for wj, s in zip(w, slots))
    torch.testing.assert_close(m.grouped_forward(slots, x, w), want, rtol=1e-5, atol=1e-6)
    # run() takes the grouped path for one token; forcing the per-expert loop gives the same output
    idx, wk = torch.tensor([[0, 3]]), torch.tensor([[0.6, 0.4]])
    grouped = m.run(layer, x, idx, wk)
    monkeypatch.setattr(ml, "GROUPED_MAX_BYTES", 0)
    torch.testing.assert_close(m.run(layer, x, idx, wk), grouped, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_grouped_forward_sums_like_the_per_expert_path(tiny, monkeypatch, dtype):
    """bf16 slots: products in bf16, outputs summed in the activation dtype on both paths; an expert listed twice
    for the token counts with both of its weights."""
    import moelite.core.moe_layer as ml

    eng = moelite.load(tiny("qwen3_moe"), expert_budget="100%", warm_start=True, expert_dtype=dtype)
    m = eng.manager
    layer = eng.layout.layers[0]
    x = torch.randn(1, eng.hf_config.hidden_size, generator=torch.Generator().manual_seed(1))
    idx, wk = torch.tensor([[3, 3, 0]]), torch.tensor([[0.5, 0.3, 0.2]])
    grouped = m.run(layer, x, idx, wk)
    monkeypatch.setattr(ml, "GROUPED_MAX_BYTES", 0)
    # the AVX-512 native kernel rounds the activations of bf16 products to bf16; the per-expert path does not
    tol = (1e-2, 1e-3) if dtype == "bfloat16" and native.bf16_activations() else (1e-5, 1e-6)
    torch.testing.assert_close(grouped, m.run(layer, x, idx, wk), rtol=tol[0], atol=tol[1])


def test_resident_count_follows_commits_and_evictions():
    from moelite.core.expert_cache import ExpertCache, LRUPolicy

    cache = ExpertCache(3, 10, LRUPolicy(), [0, 1])
    for key in [(0, 1), (0, 2), (1, 5)]:
        cache.commit(key, cache.acquire(key))
    assert (cache.resident_count(0), cache.resident_count(1)) == (2, 1)
    cache.commit((0, 1), cache.slot((0, 1)))  # committed again: still one
    assert cache.resident_count(0) == 2
    cache.commit((1, 6), cache.acquire((1, 6)))  # evicts the least recent, (0, 2)
    assert (cache.resident_count(0), cache.resident_count(1)) == (1, 2)
    assert cache.resident_count(0) == len(cache.resident_experts(0))
