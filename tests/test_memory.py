"""expert_budget="auto": the memory this process may use, minus dense weights, KV cache and headroom."""

import pytest
import torch
from transformers import AutoConfig

import moelite
from moelite.core import memory


def test_cgroup_limit_caps_available_memory(monkeypatch):
    monkeypatch.setattr(memory, "_meminfo_available", lambda: 20 << 30)
    monkeypatch.setattr(memory, "_cgroup_room", lambda: 300 << 20)
    assert memory.available_memory("cpu") == (300 << 20, "memory cgroup limit minus its usage")
    monkeypatch.setattr(memory, "_cgroup_room", lambda: None)
    assert memory.available_memory("cpu") == (20 << 30, "MemAvailable")


def test_kv_cache_bytes_counts_keys_and_values_of_every_layer(tiny):
    cfg = AutoConfig.from_pretrained(str(tiny("qwen2_moe")))
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    want = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 100 * 4
    assert memory.kv_cache_bytes(cfg, torch.float32, 100) == want


def test_auto_budget_fills_what_is_left(tiny, monkeypatch):
    path = tiny("qwen2_moe", num_experts=16, num_experts_per_tok=4, num_hidden_layers=3)
    full = moelite.load(path, expert_budget="100%")
    slot, dense = full.pool.slot_bytes, full.dense_bytes
    kv = memory.kv_cache_bytes(full.hf_config, torch.float32, min(full.max_context, memory.AUTO_CONTEXT))
    avail = dense + kv + memory.MIN_HEADROOM + 7 * slot + slot // 2  # room for 7.5 slots after the reservations
    monkeypatch.setattr(memory, "available_memory", lambda device="cpu": (avail, "test"))
    eng = moelite.load(path, expert_budget="auto")
    assert eng.pool.n_slots == 7 and eng.budget_bytes == 7 * slot + slot // 2
    note = eng.stats()["expert_budget_note"]
    assert note.startswith("expert_budget 'auto'") and "(test)" in note
    ids = [5, 9, 14, 20]
    eng.eos_ids = full.eos_ids = set()
    assert eng.generate(ids, max_tokens=8, temperature=0).token_ids == \
        full.generate(ids, max_tokens=8, temperature=0).token_ids
    # more memory than the experts need: every expert, no more
    monkeypatch.setattr(memory, "available_memory", lambda device="cpu": (1 << 40, "test"))
    every = moelite.load(path, expert_budget="auto")
    assert every.pool.n_slots == full.pool.n_slots
    # ... read at load: the first request finds every expert resident (a partial auto budget starts empty)
    cache = every.manager.cache
    assert sum(len(cache.resident_experts(layer)) for layer in every.layout.layers) == len(every.layout.experts)
    every.eos_ids = set()
    before = every.counters()
    every.generate(ids, max_tokens=4, temperature=0)
    assert (every.counters() - before).total.misses == 0
    assert eng.counters().total.misses > 0


def test_auto_budget_too_small_is_refused_before_loading(tiny, monkeypatch):
    path = tiny("qwen2_moe", num_experts=16, num_experts_per_tok=4)
    monkeypatch.setattr(memory, "available_memory", lambda device="cpu": (64 << 20, "test"))
    with pytest.raises(ValueError, match=r"expert_budget 'auto'.*below one layer's top-4.*free memory"):
        moelite.load(path, expert_budget="auto")


def test_budget_strings_name_auto():
    assert moelite.EngineConfig(expert_budget="auto").validate().expert_budget == "auto"
    with pytest.raises(ValueError, match="'auto'"):
        moelite.EngineConfig(expert_budget="automatic").validate()


def test_budget_that_cannot_fit_is_refused_at_load_with_the_largest_that_fits(tiny, monkeypatch):
    path = tiny("qwen2_moe", num_experts=16, num_experts_per_tok=4, num_hidden_layers=3)
    full = moelite.load(path, expert_budget="100%")
    slot, dense = full.pool.slot_bytes, full.dense_bytes
    kv = memory.kv_cache_bytes(full.hf_config, torch.float32, min(full.max_context, memory.AUTO_CONTEXT))
    avail = dense + kv + memory.MIN_HEADROOM + 10 * slot  # room for 10 of the 48 experts
    monkeypatch.setattr(memory, "available_memory", lambda device="cpu": (avail, "test"))
    with pytest.raises(ValueError, match=r"expert_budget: '50%' = 24 expert slots .* does not fit.*\(test\).*give at "
                                         r"most that, or expert_budget='auto'"):
        moelite.load(path, expert_budget="50%")
    assert moelite.load(path, expert_budget=10 * slot).pool.n_slots == 10  # exactly what fits is accepted


def test_cgroup_room_reads_this_process_cgroup_and_its_ancestors(tmp_path):
    """The limit of the process's own cgroup (not the hierarchy's root) counts, and so does a tighter ancestor's."""
    v1 = tmp_path / "v1"
    for rel, limit, usage in (("", 1 << 62, 5 << 30), ("bench", 4 << 30, 1 << 30), ("bench/job", 1 << 62, 1 << 30)):
        d = v1 / "memory" / rel
        d.mkdir(parents=True, exist_ok=True)
        (d / "memory.limit_in_bytes").write_text(f"{limit}\n")
        (d / "memory.usage_in_bytes").write_text(f"{usage}\n")
    text = "4:memory:/bench/job\n3:cpuset:/\n"
    assert memory._cgroup_room(text, v1) == 3 << 30  # the parent's 4 GiB limit minus its usage
    assert memory._cgroup_room("4:memory:/\n", v1) is None  # the root has no limit
    v2 = tmp_path / "v2"
    (v2 / "svc").mkdir(parents=True)
    (v2 / "svc" / "memory.max").write_text("max\n")
    (v2 / "svc" / "memory.current").write_text("100\n")
    (v2 / "memory.max").write_text(f"{2 << 30}\n")
    (v2 / "memory.current").write_text(f"{1 << 30}\n")
    assert memory._cgroup_room("0::/svc\n", v2) == 1 << 30


def test_budget_beyond_every_expert_reports_what_it_holds(tiny):
    import moelite

    eng = moelite.load(tiny("qwen2_moe"), expert_budget="40GiB")
    total = eng.layout.total_bytes if hasattr(eng.layout, "total_bytes") else eng.pool.n_slots * eng.pool.slot_bytes
    assert eng.pool.n_slots == len(eng.layout.experts)
    assert eng.stats()["expert_budget_bytes"] == total < (40 << 30)


def test_the_default_budget_is_auto_and_a_model_that_fits_is_resident_from_load(tiny):
    """Without a budget moelite takes what this machine has room for (as llama.cpp's page cache does): a model that
    fits is read whole at load, and decoding reads nothing more."""
    eng = moelite.load(tiny("qwen2_moe", num_experts=16, num_experts_per_tok=4))
    s = eng.stats()
    assert eng.config.expert_budget == "auto" and s["expert_slots"] == len(eng.layout.experts)
    assert s["resident_expert_bytes"] == s["routed_expert_bytes"]
    before = s["expert_bytes_read"]
    eng.generate([5, 9, 14], max_tokens=4, temperature=0)
    assert eng.stats()["expert_misses"] == 0 and eng.stats()["expert_bytes_read"] == before
