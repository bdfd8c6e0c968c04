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
    if miss_policy == "direct":
        assert s["misses_direct"] > 0 and s["cpu_computed_experts"] + s["graph_misses_loaded"] >= 0
    assert s["misses_loaded"] + s["misses_direct"] == s["expert_misses"]
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


def _reference(path):
    ref = moelite.load(path, expert_budget="100%", expert_dtype="float32")
    ref.eos_ids = set()
    return ref


def test_cuda_slot_reuse_waits_for_last_reader(tiny):
    """The smallest budget (one layer's top-k): every layer refills the slots the previous layer's kernels read.
    A copy that did not wait for those kernels would change their inputs under them."""
    path = tiny("qwen2_moe", num_experts=16, num_experts_per_tok=4, num_hidden_layers=6, hidden_size=256,
                moe_intermediate_size=512)
    # the reference is the same device with every expert resident. Misses the CPU computes round differently
    # from the GPU (about 1e-4 here); a slot overwritten under its kernel gives errors of order 1
    ref = moelite.load(path, device="cuda", expert_budget="100%", expert_dtype="float32")
    eng = moelite.load(path, device="cuda", expert_budget=4 * 3 * 256 * 512 * 4, expert_dtype="float32")
    assert eng.pool.n_slots == 4 and eng.manager.cuda is not None
    for seed in range(3):
        ids = torch.randint(3, 128, (3, 16), generator=torch.Generator().manual_seed(seed))
        assert (eng.logits(ids) - ref.logits(ids)).abs().max() < 1e-3
    assert eng.manager.cuda.copies > 0 and eng.stats()["expert_evictions"] > 0


@pytest.mark.parametrize("io_threads", [0, 2])
def test_cuda_staging_buffer_not_overwritten_in_flight(tiny, io_threads):
    """No host tier: misses are read from SSD into a pinned staging buffer and copied asynchronously; the next read
    must not overwrite the buffer before its copy has finished."""
    path = tiny("qwen2_moe", num_experts=16, num_experts_per_tok=4, num_hidden_layers=4, hidden_size=256,
                moe_intermediate_size=512)
    ref = _reference(path)
    eng = moelite.load(path, device="cuda", expert_budget="25%", expert_dtype="float32", host_budget=0,
                       io_threads=io_threads)
    assert eng.manager.cuda is None and eng.host is None
    ids = torch.randint(3, 128, (2, 16))
    assert (eng.logits(ids) - ref.logits(ids)).abs().max() < 1e-4
    assert eng.stats()["expert_bytes_read"] > 0


@pytest.mark.parametrize("io_threads", [0, 2])
def test_cuda_direct_miss_waits_for_the_staging_copy(tiny, monkeypatch, io_threads):
    """Pins: no host tier, miss_policy "hybrid": a loaded miss goes through this thread's pinned staging buffer and
    an asynchronous copy into its slot; a direct miss read next into the same buffer must wait for that copy. On
    commit 164b6cf (io_threads=0) it overwrote the buffer while the copy was still queued, so the loaded expert's
    slot received the direct expert's bytes. A GPU sleep queued on the copy stream before every copy holds the
    copies back, so that any overwrite lands under a queued copy."""
    from moelite.core.expert_store import ExpertReader

    path = tiny("qwen2_moe", num_experts=16, num_experts_per_tok=4, num_hidden_layers=4, hidden_size=256,
                moe_intermediate_size=512)
    ref = _reference(path)
    eng = moelite.load(path, device="cuda", expert_budget="25%", expert_dtype="float32", host_budget=0,
                       io_threads=io_threads, miss_policy="hybrid")
    real = ExpertReader.read_bytes

    def read_then_hold_the_copy_stream(self, key, dest):
        real(self, key, dest)
        if self.copy_stream is not None:
            with torch.cuda.stream(self.copy_stream):
                torch.cuda._sleep(20_000_000)  # the copy queued after this read starts ~10 ms later

    monkeypatch.setattr(ExpertReader, "read_bytes", read_then_hold_the_copy_stream)
    for seed in range(2):
        ids = torch.randint(3, 128, (2, 16), generator=torch.Generator().manual_seed(seed))
        assert (eng.logits(ids) - ref.logits(ids)).abs().max() < 1e-3
    s = eng.stats()
    assert s["misses_loaded"] > 0 and s["misses_direct"] > 0  # both paths ran in the same layers


def test_cuda_partial_host_tier_reads_the_rest_from_ssd(tiny):
    path = tiny("qwen2_moe", num_experts=16, num_experts_per_tok=4, num_hidden_layers=4)
    ref = _reference(path)
    eng = moelite.load(path, device="cuda", expert_budget="25%", expert_dtype="float32", host_budget="50%")
    assert 0 < len(eng.host) < len(eng.layout.experts)
    ids = torch.randint(3, 128, (2, 12))
    assert (eng.logits(ids) - ref.logits(ids)).abs().max() < 1e-4
    want = ref.generate([5, 9, 14, 20], max_tokens=16, temperature=0).token_ids
    eng.eos_ids = set()
    assert eng.generate([5, 9, 14, 20], max_tokens=16, temperature=0).token_ids == want
    s = eng.stats()
    assert s["expert_bytes_read"] > 0 and s["h2d_copies"] > 0
    assert s["resident_expert_bytes_peak"] <= s["expert_budget_bytes"]


@pytest.mark.parametrize("budget,miss_policy", [("100%", "load"), ("25%", "load"), ("25%", "direct"),
                                                ("25%", "hybrid")])
def test_cuda_graph_decode_matches_eager(tiny, budget, miss_policy):
    """Graph steps read misses zero-copy from the pinned host tier; output equals the exact CPU model's."""
    path = tiny("qwen2_moe", num_experts=16, num_experts_per_tok=4, num_hidden_layers=4)
    want = _reference(path).generate([5, 9, 14, 20], max_tokens=24, temperature=0).token_ids
    for graphs in (True, False):
        eng = moelite.load(path, device="cuda", expert_budget=budget, expert_dtype="float32", cuda_graphs=graphs,
                           miss_policy=miss_policy)
        eng.eos_ids = set()
        assert eng.generate([5, 9, 14, 20], max_tokens=24, temperature=0).token_ids == want
        s = eng.stats()
        if graphs:
            assert s["graph_steps"] == 23 and s["graph_redone"] == 0 and s["eager_steps"] == 0
            if budget == "25%":
                assert s["expert_misses"] > 0
                assert (s["graph_misses_loaded"] > 0) == (miss_policy != "direct")
        else:
            assert s["graph_steps"] == 0
        assert s["resident_expert_bytes_peak"] <= s["expert_budget_bytes"]


def test_cuda_graph_cache_router_substitutes(tiny):
    path = tiny("qwen2_moe", num_experts=16, num_experts_per_tok=4, num_hidden_layers=4)
    eng = moelite.load(path, device="cuda", expert_budget="25%", expert_dtype="float32", miss_policy="direct")
    eng.eos_ids = set()
    exact = eng.generate([5, 9, 14, 20], max_tokens=24, temperature=0, substitution_alpha=0.0)
    assert eng.stats()["expert_substitutions"] == 0
    sub = eng.generate([5, 9, 14, 20], max_tokens=24, temperature=0, substitution_alpha=0.9)
    s = eng.stats()
    assert s["expert_substitutions"] > 0 and s["graph_steps"] >= 46 and s["graph_redone"] == 0
    again = eng.generate([5, 9, 14, 20], max_tokens=24, temperature=0, substitution_alpha=0.0)
    assert again.token_ids == exact.token_ids  # alpha back to 0: the exact graph again
    assert len(sub.token_ids) == 24


@pytest.mark.parametrize("kernel", ["triton", "torch"])
def test_cuda_generate_batch_matches_alone(tiny, kernel):
    path = tiny("qwen2_moe", num_experts=16, num_experts_per_tok=4, num_hidden_layers=4)
    eng = moelite.load(path, device="cuda", expert_budget="100%", expert_dtype="float32", expert_kernel=kernel)
    eng.eos_ids = set()
    prompts = [[5, 9, 14, 20], [7, 8], [40, 41, 42], [3, 4, 5, 6, 7, 8]]
    alone = [eng.generate(p, max_tokens=12, temperature=0).token_ids for p in prompts]
    batch = eng.generate_batch(prompts, max_tokens=12, temperature=0)
    assert [g.token_ids for g in batch] == alone
    assert eng.stats()["graph_steps"] > 0


def test_cuda_compile_decode_matches_eager(tiny):
    path = tiny("qwen2_moe", num_experts=16, num_experts_per_tok=4, num_hidden_layers=4)
    want = _reference(path).generate([5, 9, 14, 20], max_tokens=16, temperature=0).token_ids
    eng = moelite.load(path, device="cuda", expert_budget="25%", expert_dtype="float32", compile_decode=True)
    eng.eos_ids = set()
    assert eng.generate([5, 9, 14, 20], max_tokens=16, temperature=0).token_ids == want
    assert eng.generate([7, 8], max_tokens=16, temperature=0).token_ids  # another prompt length: no failure
    assert eng._compiled and eng.stats()["graph_steps"] >= 15
