"""CPU expert kernels (moelite/core/cpu_kernels.py) and checkpoint-dtype slots.

- The one-call kernels (native, compiled and eager) equal one F.linear pair per expert in float32, from float32 and from
  bf16 slots, for decode-sized and prefill-sized calls.
- A bf16 checkpoint gets bf16 slots by default; moelite then matches transformers run in float32 on the same
  (bf16-valued) weights, logits and greedy tokens, at every budget.
- With the dense weights kept 16-bit too (core/dense.py, forced onto the tiny model's small layers), the same holds
  (shared experts then run as one fused call), and the dense bytes the budget counts are halved.
- A CUDA kernel name on the CPU is refused at load, naming the choices.
"""

import functools

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import moelite
from conftest import native_act, swiglu_pairs_reference
from moelite.core import dense, native
from moelite.core.cpu_kernels import COMPILED_MAX_PAIRS, ResidentKernel, cpu_flags

needs_native = pytest.mark.skipif(not native.available(), reason="native CPU kernels unavailable here")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["auto", pytest.param("native", marks=needs_native), "eager"])
@pytest.mark.parametrize("tokens,pairs", [(1, 1), (1, 6), (3, 9), (40, COMPILED_MAX_PAIRS + 16)])
def test_resident_kernel_equals_per_expert_float32(dtype, kind, tokens, pairs):
    gen = torch.Generator().manual_seed(tokens * 100 + pairs)
    S, H, I = 10, 32, 24
    gu = (torch.randn(S, 2 * I, H, generator=gen) * 0.2).to(dtype)
    dn = (torch.randn(S, H, I, generator=gen) * 0.2).to(dtype)
    x = torch.randn(tokens, H, generator=gen)
    slots = torch.randint(0, S, (pairs,), generator=gen)
    tok = torch.randint(0, tokens, (pairs,), generator=gen)
    w = torch.rand(pairs, generator=gen)
    k = ResidentKernel(nn.SiLU(), kind)
    order = torch.argsort(slots, stable=True)  # the manager passes pairs grouped by slot
    slots, tok, w = slots[order], tok[order], w[order]
    keep = torch.tensor([i == 0 or (slots[i], tok[i]) != (slots[i - 1], tok[i - 1]) for i in range(pairs)])
    slots, tok, w = slots[keep], tok[keep], w[keep]  # a token picks an expert once
    got = k.run(gu, dn, x, slots, tok, w)
    assert got.dtype == torch.float32
    native_ran = k.kind == "native" and slots.numel() <= COMPILED_MAX_PAIRS
    want = swiglu_pairs_reference(gu, dn, x, slots, tok, w, act=lambda a: native_act(a, dtype) if native_ran else a)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    if kind == "eager":
        assert k.kind == "eager"


def test_auto_kernel_says_which_runs_and_why():
    k = ResidentKernel(nn.SiLU(), "auto")
    assert k.kind in ("native", "compiled", "eager") and k.why
    assert (k.kind == "native") == native.available()  # the native kernel wherever it runs
    if k.kind in ("native", "compiled"):
        assert "CPU flags" in k.why
    assert set(cpu_flags()) <= set(native._FLAGS)
    assert ResidentKernel(nn.GELU(), "auto").kind == "eager"  # not SwiGLU with SiLU: never compiled
    with pytest.raises(ValueError, match="expert_kernel"):
        ResidentKernel(nn.SiLU(), "triton")


@pytest.mark.parametrize("arch", ["qwen2_moe", "mixtral"])
@pytest.mark.parametrize("budget", ["25%", "100%"])
@pytest.mark.parametrize("dense16", [False, pytest.param(True, marks=needs_native)])
def test_bf16_slots_match_transformers(tiny, arch, budget, dense16, monkeypatch):
    path = tiny(arch, dtype=torch.bfloat16)
    if dense16:  # every dense matrix 16-bit, however small
        monkeypatch.setattr(dense, "SMALL_DENSE_BYTES", 0)
    eng = moelite.load(path, expert_budget=budget, expert_dtype="bfloat16")
    assert eng.pool.dtype == torch.bfloat16
    kinds = {type(m).__name__ for m in eng.model.modules()}
    assert ("Linear16" in kinds and "Embedding16" in kinds) == dense16
    assert eng.stats()["dense_dtype"] == ("bfloat16" if dense16 else "float32")
    fused = sum(isinstance(m.__dict__.get("forward"), functools.partial) for m in eng.model.modules())
    n = len(eng.layout.layers)  # one call for each shared expert (qwen2_moe) and each attention's q/k/v, 16-bit
    # or (small layers) float32
    assert fused == ((n if arch == "qwen2_moe" else 0) + 3 * n if native.available() else 0)
    if dense16:
        full = moelite.load(path, expert_budget=budget, expert_dtype="bfloat16", dense_dtype="float32")
        assert full.stats()["dense_dtype"] == "float32"
        assert eng.dense_bytes < 0.55 * full.dense_bytes  # norms and biases stay float32
    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    torch.manual_seed(3)
    ids = torch.randint(3, 128, (2, 9))
    with torch.no_grad():
        expected = ref(ids).logits
    assert (eng.logits(ids) - expected).abs().max().item() < 1e-4
    prompt = ids[0].tolist()
    want = ref.generate(ids[:1], max_new_tokens=12, do_sample=False, eos_token_id=None,
                        pad_token_id=0)[0, len(prompt):].tolist()
    eng.eos_ids = set()
    assert eng.generate(prompt, max_tokens=12, temperature=0).token_ids == want


def test_auto_slot_dtype_is_the_checkpoints_except_small_cpu_experts():
    from moelite.config import EngineConfig
    from moelite.core.device import SMALL_EXPERT_BYTES, slot_dtype

    cpu, cuda, auto = torch.device("cpu"), torch.device("cuda"), EngineConfig()
    big, small = SMALL_EXPERT_BYTES // 4, SMALL_EXPERT_BYTES // 4 - 1  # elements of one expert
    assert slot_dtype(auto, cpu, torch.bfloat16, big) == torch.bfloat16  # real-size experts: the checkpoint's
    assert slot_dtype(auto, cpu, torch.bfloat16, small) == torch.float32  # tiny experts on the CPU: float32
    assert slot_dtype(auto, cuda, torch.bfloat16, small) == torch.bfloat16
    assert slot_dtype(auto, cpu, torch.float16, None) == torch.float16
    assert slot_dtype(EngineConfig(expert_dtype="float32"), cpu, torch.bfloat16, big) == torch.float32


@pytest.mark.parametrize("kind", ["native", "compiled", "eager"])
def test_cpu_kernel_name_refused_on_cuda(kind):
    from moelite.config import EngineConfig

    with pytest.raises(ValueError, match=f"expert_kernel: '{kind}' is a CPU kernel; on CUDA use auto, triton or torch"):
        EngineConfig(device="cuda", expert_kernel=kind).validate()
    EngineConfig(device="cpu", expert_kernel=kind).validate()


def test_cuda_kernel_name_refused_on_cpu(tiny):
    with pytest.raises(ValueError, match="expert_kernel: 'triton' is a CUDA kernel"):
        moelite.load(tiny("qwen2_moe"), expert_kernel="triton")
