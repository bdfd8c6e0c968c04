"""The fused expert computation (torch reference everywhere, Triton kernels in the interpreter when Triton is
installed) and the static-cache lock-step decoder, on the CPU."""

import os
import subprocess
import sys

import pytest
import torch

import moelite
from moelite.core.fused_moe import SKIP, fused_experts, plan_blocks, triton_available


def _pool(s, h, i, dtype=torch.float32, seed=0):
    g = torch.Generator().manual_seed(seed)
    buf = torch.randn((s, 3 * h * i), generator=g).mul_(0.1).to(dtype)
    return buf, buf[:, : 2 * i * h].view(s, 2 * i, h), buf[:, 2 * i * h:].view(s, h, i)


def _call(x, buf, h, i, slots, w, backend, host=None):
    offs = None
    if host is not None:  # host rows addressed from the pool's base, as the CUDA path does with pinned memory
        size = buf.element_size()
        offs = torch.tensor([(host[r].data_ptr() - buf.data_ptr()) // size for r in range(host.shape[0])])
    return fused_experts(x, buf, h, i, slots, w, backend, host_offsets=offs)


def _dense(x, gu, dn, slots, w):
    """Float64 loop over (token, choice): the function the fused call must compute."""
    out = torch.zeros(x.shape, dtype=torch.float64)
    for n in range(x.shape[0]):
        for j in range(slots.shape[1]):
            s = int(slots[n, j])
            if s < 0:
                continue
            g, u = (gu[s].double() @ x[n].double()).chunk(2)
            out[n] += w[n, j].double() * (dn[s].double() @ (torch.nn.functional.silu(g) * u))
    return out


def test_plan_blocks_groups_pairs_by_slot():
    slots = torch.tensor([[2, 0], [0, -1], [2, 1]])
    order, rows, bslot = plan_blocks(slots, block_m=2)
    assert order.shape == (6,) and rows.shape == (6, 2) and bslot.shape == (6,)
    flat = slots.reshape(-1)
    seen = []
    for b in range(6):
        members = [int(order[r]) for r in rows[b].tolist() if r >= 0]
        if int(bslot[b]) == SKIP:  # unused block, or the block of skipped pairs
            assert all(int(flat[p]) < 0 for p in members)
            continue
        assert members and all(int(flat[p]) == int(bslot[b]) for p in members)
        seen += members
    assert sorted(seen) == [p for p in range(6) if int(flat[p]) >= 0]  # every valid pair exactly once


def _check_against_dense(backend):
    s, h, i, n, k = 7, 40, 24, 5, 3  # sizes that are not multiples of the tiles
    buf, gu, dn = _pool(s, h, i)
    x = torch.randn(n, h)
    slots = torch.randint(0, s, (n, k))
    slots[1, 2] = -1
    slots[3] = torch.tensor([4, 4, -1])  # an expert listed twice for a token: its weights add up
    w = torch.rand(n, k)
    out = _call(x, buf, h, i, slots, w, backend)
    want = _dense(x, gu, dn, slots, w)
    assert torch.isfinite(out).all()
    assert (out.double() - want).abs().max() < 1e-5
    none = _call(x, buf, h, i, torch.full_like(slots, -1), w, backend)
    assert none.abs().max() == 0  # every pair skipped: nothing added
    for n_tok in (1, n):  # one token takes its own block plan
        one = _call(x[:n_tok], buf, h, i, slots[:n_tok], w[:n_tok], backend)
        assert (one.double() - want[:n_tok]).abs().max() < 1e-5
    if backend == "triton":  # codes <= -2: rows of another allocation (pinned host memory on CUDA)
        host, hgu, hdn = _pool(3, h, i, seed=1)
        codes = torch.tensor([[-2, 0, -4], [1, -3, -1], [-2, -2, 2], [5, 6, -4], [-1, -1, -1]])
        out = _call(x, buf, h, i, codes, w, backend, host=host)
        all_gu, all_dn = torch.cat([gu, hgu]), torch.cat([dn, hdn])
        as_slots = torch.where(codes <= -2, s + (-codes - 2), codes)
        assert (out.double() - _dense(x, all_gu, all_dn, as_slots, w)).abs().max() < 1e-5


def test_fused_experts_torch_matches_dense_loop():
    _check_against_dense("torch")


def test_fused_experts_triton_kernels_in_interpreter():
    """The Triton kernels themselves, run by Triton's CPU interpreter (which must be chosen before import, hence a
    subprocess)."""
    if not triton_available():
        pytest.skip("Triton is not installed (CUDA machines carry it with torch)")
    code = ("import sys; sys.path.insert(0, %r); import test_fused_moe as t; t._check_against_dense('triton'); "
            "print('ok')" % os.path.dirname(__file__))
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and res.stdout.strip().endswith("ok"), res.stderr[-3000:]


def test_fused_experts_bf16_weights_close_to_fp64():
    buf, gu, dn = _pool(4, 32, 16, dtype=torch.bfloat16)
    x = torch.randn(3, 32)
    slots = torch.tensor([[0, 1], [2, 3], [1, 1]])
    w = torch.rand(3, 2)
    out = _call(x, buf, 32, 16, slots, w, "torch")
    want = _dense(x, gu.float(), dn.float(), slots, w)
    assert ((out.double() - want).norm() / want.norm()) < 1e-2


def test_generate_batch_matches_generate_alone(tiny, one_thread):
    path = tiny("qwen2_moe", num_experts=16, num_experts_per_tok=4, num_hidden_layers=3)
    eng = moelite.load(path, expert_budget="50%", io_threads=0)
    eng.eos_ids = set()
    prompts = [[5, 9, 14, 20, 33], [7, 8], [40, 41, 42]]  # different lengths: left padding
    alone = [eng.generate(p, max_tokens=10, temperature=0).token_ids for p in prompts]
    batch = eng.generate_batch(prompts, max_tokens=10, temperature=0)
    assert [g.token_ids for g in batch] == alone
    st = batch[0].stats
    assert st["batch_size"] == 3 and st["decode_steps"] == 9 and st["batch_decode_tok_s"] > 0
    s = eng.stats()
    assert s["resident_expert_bytes_peak"] <= s["expert_budget_bytes"]


def test_generate_batch_rejects_bad_input(tiny):
    eng = moelite.load(tiny("qwen2_moe"), expert_budget="50%")
    with pytest.raises(ValueError, match="prompts: empty"):
        eng.generate_batch([])
    with pytest.raises(ValueError, match="list of prompts"):
        eng.generate_batch("one prompt as a string")
    with pytest.raises(ValueError, match=r"prompts\[1\]"):
        eng.generate_batch([[1, 2], [10 ** 7]])
    with pytest.raises(ValueError, match="max_tokens"):
        eng.generate_batch([[1, 2]], max_tokens=10 ** 6)


def test_host_budget_and_kernel_validated():
    with pytest.raises(ValueError, match="host_budget"):
        moelite.EngineConfig(host_budget="lots").validate()
    with pytest.raises(ValueError, match="expert_kernel"):
        moelite.EngineConfig(expert_kernel="cublas").validate()
    assert moelite.EngineConfig(host_budget="8GiB").validate().host_budget == "8GiB"


def test_generate_batch_on_sliding_window_model_stays_in_window(tiny, one_thread):
    path = tiny("mixtral", num_hidden_layers=2, sliding_window=12)
    eng = moelite.load(path, expert_budget="100%")
    eng.eos_ids = set()
    with pytest.raises(ValueError, match="window of 12"):
        eng.generate_batch([[5, 9, 14, 20]], max_tokens=10)
    prompts = [[5, 9, 14, 20], [7, 8, 9]]
    alone = [eng.generate(p, max_tokens=6, temperature=0).token_ids for p in prompts]
    assert [g.token_ids for g in eng.generate_batch(prompts, max_tokens=6, temperature=0)] == alone
