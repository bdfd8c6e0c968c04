"""Loader, prefetch and miss paths change speed only: tokens stay exact, the budget holds, metrics add up."""

import numpy as np
import pytest
import torch

import moelite
from moelite.core.traces import Trace, TraceRecorder, TraceReplay

CFG = dict(num_experts=16, num_experts_per_tok=4, num_hidden_layers=4)


@pytest.fixture(scope="module")
def exact_tokens(tiny):
    path = tiny("qwen2_moe", **CFG)
    eng = moelite.load(path, expert_budget="100%")
    eng.eos_ids = set()
    return eng.generate([5, 9, 14, 20], max_tokens=16, temperature=0).token_ids


@pytest.mark.parametrize("prefetch", [False, True])
@pytest.mark.parametrize("miss_policy", ["load", "direct", "hybrid"])
@pytest.mark.parametrize("io_threads", [0, 2])
def test_data_paths_are_exact(tiny, exact_tokens, prefetch, miss_policy, io_threads):
    eng = moelite.load(tiny("qwen2_moe", **CFG), expert_budget="25%", prefetch=prefetch, miss_policy=miss_policy,
                       io_threads=io_threads)
    eng.eos_ids = set()
    assert eng.generate([5, 9, 14, 20], max_tokens=16, temperature=0).token_ids == exact_tokens
    s = eng.stats()
    assert s["resident_expert_bytes_peak"] <= s["expert_budget_bytes"]
    assert s["misses_loaded"] + s["misses_direct"] == s["expert_misses"]
    if miss_policy == "direct":
        assert s["misses_loaded"] == 0
        if not prefetch:  # nothing ever enters the cache
            assert s["resident_expert_bytes_peak"] == 0
    if prefetch:
        assert s["prefetch_issued"] > 0
        assert 0 <= s["prefetch_precision"] <= 1 and 0 <= s["prefetch_recall"] <= 1
        assert s["prefetch_hits"] + s["prefetch_wasted"] <= s["prefetch_issued"]


def test_min_budget_with_prefetch_never_deadlocks(tiny, exact_tokens):
    path = tiny("qwen2_moe", **CFG)
    probe = moelite.load(path, expert_budget="100%")
    eng = moelite.load(path, expert_budget=probe.top_k * probe.pool.slot_bytes, prefetch=True, io_threads=2)
    eng.eos_ids = set()
    assert eng.generate([5, 9, 14, 20], max_tokens=16, temperature=0).token_ids == exact_tokens


def test_trace_record_load_and_replay(tiny, tmp_path):
    path = tiny("qwen2_moe", **CFG)
    eng = moelite.load(path, expert_budget="50%")
    rec = TraceRecorder(eng)
    with rec.recording(prompt="a"):
        eng.generate([5, 9, 14], max_tokens=6, temperature=0)
    with rec.recording(prompt="b"):
        eng.generate([7, 8], max_tokens=4, temperature=0)
    out = rec.save(tmp_path / "trace.npz")
    z = np.load(out)  # plain numpy opens it
    assert z["idx"].shape[1] == 4 and z["probs"].shape[1] == 16
    tr = Trace.load(out)
    assert tr.meta["requests"] == [{"prompt": "a"}, {"prompt": "b"}] and tr.meta["top_k"] == 4
    acc = list(tr.accesses(decode_only=True))
    assert len(acc) == (5 + 3) * 4  # decode steps x MoE layers
    assert np.allclose(tr.probs.astype(np.float32).sum(1), 1.0, atol=1e-2)

    # replay: another engine follows the recorded routing exactly
    eng2 = moelite.load(path, expert_budget="50%")
    eng2.manager.set_replay(TraceReplay(tr, eng2.layout.layers, decode_only=False))
    rec2 = TraceRecorder(eng2)
    with rec2.recording(prompt="a"):
        eng2.generate([5, 9, 14], max_tokens=6, temperature=0)
    first = tr.request == 0
    assert np.array_equal(np.concatenate(rec2.rows["idx"]), tr.idx[first])


def test_replay_prefetch_uses_recorded_predictions(tiny, tmp_path):
    path = tiny("qwen2_moe", **CFG)
    eng = moelite.load(path, expert_budget="100%")
    rec = TraceRecorder(eng)
    with rec.recording(prompt="a"):
        eng.generate([5, 9, 14], max_tokens=10, temperature=0)
    tr = Trace.load(rec.save(tmp_path / "t.npz"))
    assert tr.pred is not None and (tr.pred[tr.layer == max(tr.layers)] == -1).all()
    assert (tr.pred[tr.layer == min(tr.layers)] >= 0).all()
    eng2 = moelite.load(path, expert_budget="25%", prefetch=True)
    eng2.manager.set_replay(TraceReplay(tr, eng2.layout.layers, decode_only=True))
    eng2.generate([5, 9, 14], max_tokens=10, temperature=0)
    assert eng2.stats()["prefetch_issued"] > 0


def test_read_plan_coalesces_adjacent_parts_and_keeps_slot_order():
    from moelite.core.expert_store import read_plan

    # slot order gate | up | down (8 bytes each); on disk down, gate, up lie back to back
    plan = read_plan([("a", 108, 8), ("a", 116, 8), ("a", 100, 8)])
    assert plan == [("a", 100, 24, ((16, 8), (0, 8), (8, 8)))]
    # a gap or another file splits the read
    plan = read_plan([("a", 100, 8), ("a", 120, 8), ("b", 0, 8)])
    assert plan == [("a", 100, 8, ((0, 8),)), ("a", 120, 8, ((8, 8),)), ("b", 0, 8, ((16, 8),))]


def test_coalesced_reads_fill_slots_with_the_checkpoint_bytes(tiny):
    from safetensors import safe_open

    eng = moelite.load(tiny("mixtral"), expert_budget="100%", expert_dtype="float32")
    r = eng.reader
    layer = eng.layout.layers[1]
    buf = torch.empty(eng.layout.numel, dtype=eng.layout.disk_dtype)
    r.read_bytes((layer, 3), buf)
    t = eng.layout.experts[(layer, 3)]
    with safe_open(str(t.gate.file), "pt") as f:
        want = torch.cat([f.get_tensor(p.name).reshape(-1) for p in t.parts])
    assert torch.equal(buf, want)


def test_hybrid_on_the_cpu_loads_every_miss_a_free_slot_can_take(tiny):
    """A direct miss on the CPU reads the same bytes from the same disk as a load and leaves nothing cached: while
    free slots remain, the hybrid split loads; only misses that would evict are split by cost (SMoE Algorithm 2)."""
    eng = moelite.load(tiny("qwen2_moe", **CFG), expert_budget="50%", miss_policy="hybrid", io_threads=2)
    m = eng.manager
    layer = m.pool.layout.layers[0]
    for _ in range(10):  # direct measured as much cheaper than load: the balance alone would compute most directly
        m.cost_load.add(1.0)
        m.cost_direct.add(0.01)
    missing = [0, 1, 2, 3]
    free = len(m.cache.free[layer])
    assert free >= len(missing)
    assert m.split_misses(layer, missing, None) == (missing, [])
    taken = [m.cache.free[layer].pop() for _ in range(free - 1)]  # one free slot left
    load, direct = m.split_misses(layer, missing, None)
    assert load == [0] and direct == [1, 2, 3]
    m.cache.free[layer].extend(taken)


def test_small_experts_are_read_on_the_compute_thread(tiny, exact_tokens, monkeypatch):
    """On the CPU, experts of at most INLINE_READ_BYTES skip the I/O threads (a handoff costs more than their read);
    larger ones, or io_threads=0, behave as configured. Tokens stay exact either way."""
    from moelite.core import loader

    path = tiny("qwen2_moe", **CFG)
    monkeypatch.setattr(loader, "INLINE_READ_BYTES", 256 << 10)
    eng = moelite.load(path, expert_budget="25%", io_threads=2)
    assert eng.pool.slot_bytes <= 256 << 10 and eng.manager.loader is None
    eng.eos_ids = set()
    assert eng.generate([5, 9, 14, 20], max_tokens=16, temperature=0).token_ids == exact_tokens
    assert eng.stats()["expert_misses"] > 0
    monkeypatch.setattr(loader, "INLINE_READ_BYTES", eng.pool.slot_bytes - 1)
    assert moelite.load(path, expert_budget="25%", io_threads=2).manager.loader is not None
    assert moelite.load(path, expert_budget="25%", io_threads=0).manager.loader is None
