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
