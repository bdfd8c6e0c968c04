"""Cache simulation (Belady's bound), real-shape checkpoints with trace replay, and `moelite bench` end to end."""

import json
import subprocess
import sys

import pytest
import torch

import moelite
from moelite.eval.realshape import make_realshape
from moelite.eval.simulate import simulate
from moelite.core.traces import Trace, TraceRecorder, TraceReplay

CFG = dict(num_experts=16, num_experts_per_tok=4, num_hidden_layers=4)


@pytest.fixture(scope="module")
def trace_file(tiny, tmp_path_factory):
    eng = moelite.load(tiny("qwen2_moe", tokenizer=True, **CFG), expert_budget="100%")
    rec = TraceRecorder(eng, include_prefill=True)
    for i in range(4):
        with rec.recording(prompt=str(i)):
            eng.generate([5 + i, 9, 14], max_tokens=12, temperature=1.0, seed=i)
    return rec.save(tmp_path_factory.mktemp("tr") / "t.npz")


def test_belady_bounds_every_online_policy(trace_file):
    tr = Trace.load(trace_file)
    for slots in (4, 8, 16, 32):
        bel = simulate(tr, slots, "belady")["hit_rate"]
        for p in ("lru", "lfu", "fifo", "score"):
            assert simulate(tr, slots, p)["hit_rate"] <= bel + 1e-9
    assert simulate(tr, 64, "lru")["hit_rate"] == simulate(tr, 64, "belady")["hit_rate"]  # everything fits


def test_simulator_matches_engine_lru(tiny):
    """The simulator runs the engine's cache semantics: same trace, same slots, same LRU decode hit rate."""
    path = tiny("qwen2_moe", tokenizer=True, **CFG)
    eng = moelite.load(path, expert_budget="25%", io_threads=0)
    rec = TraceRecorder(eng, include_prefill=True)
    for i in range(3):
        with rec.recording(prompt=str(i)):
            eng.generate([5 + i, 9, 14], max_tokens=10, temperature=1.0, seed=i)
    tr = Trace(rec.requests, *(__import__("numpy").concatenate(rec.rows[k]) for k in
                               ("request", "step", "layer", "token", "idx", "probs")))
    sim = simulate(tr, eng.pool.n_slots, "lru")["hit_rate"]
    assert abs(sim - eng.stats()["decode_exact_hit_rate"]) < 0.02


def test_realshape_checkpoint_replays_trace(tmp_path, trace_file):
    out = make_realshape(tmp_path / "rs", layers=2, hidden_size=64, moe_intermediate_size=32, num_experts=16,
                         num_experts_per_tok=4, shared_expert_intermediate_size=32, intermediate_size=128,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=300, progress=False)
    from transformers import AutoModelForCausalLM
    ref = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    ids = torch.randint(3, 300, (1, 6))
    eng = moelite.load(out, expert_budget="25%", expert_dtype="float32")
    with torch.no_grad():
        assert (eng.logits(ids) - ref(ids).logits).abs().max() < 1e-4  # a standard checkpoint
    eng.manager.set_replay(TraceReplay(Trace.load(trace_file), eng.layout.layers, decode_only=True))
    eng.generate(ids[0].tolist(), max_tokens=5, temperature=0)
    s = eng.stats()
    assert s["expert_misses"] > 0 and s["resident_expert_bytes_peak"] <= s["expert_budget_bytes"]


def test_bench_cli_end_to_end(tiny, tmp_path):
    path = tiny("qwen2_moe", tokenizer=True, **CFG)
    r = subprocess.run([sys.executable, "-m", "moelite.cli", "bench", "--model", str(path), "--expert-budget", "25%",
                        "--cache-policy", "lru", "--n-prompts", "2", "--max-tokens", "4", "--no-prefetch-row",
                        "--out", str(tmp_path / "b")], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr
    last = json.loads(r.stdout.strip().splitlines()[-1])
    assert last["summary"]["budget_never_exceeded"] is True
    assert last["summary"]["25%"]["belady_hit_rate"] >= last["summary"]["25%"]["best_online_hit_rate"] - 1e-9
    assert (tmp_path / "b" / "hit_rate.png").is_file() and (tmp_path / "b" / "decode.png").is_file()


def test_roofline_bound_counts_dense_but_embedding_plus_active_experts(tiny):
    from moelite.eval.bench import bytes_per_token, roofline

    eng = moelite.load(tiny("qwen2_moe"), expert_budget="100%")
    t = eng.checkpoint.tensors
    experts = eng.layout.expert_tensor_names()
    emb = t["model.embed_tokens.weight"].nbytes
    dense = sum(v.nbytes for n, v in t.items() if n not in experts)
    want = dense - emb + eng.top_k * len(eng.layout.layers) * eng.layout.disk_bytes
    assert bytes_per_token(eng) == want
    r = roofline(eng, decode_tok_s=10.0)
    assert r["bytes_per_token"] == want and r["bound_tok_s"] > 0
    assert abs(r["roofline_ratio"] - 10.0 / r["bound_tok_s"]) < 1e-12
    assert set(r["read_gbps_by_threads"]) <= {"1", "2"} and all(v > 0 for v in r["read_gbps_by_threads"].values())
