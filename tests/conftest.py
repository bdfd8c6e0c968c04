"""Shared fixtures: tiny checkpoints of every architecture, written once per test session by transformers."""

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moelite.core import loader
from moelite.tiny import ARCHS, make_tiny_checkpoint

torch.set_num_threads(min(2, os.cpu_count() or 1))
SHARED_DATA = Path(os.environ.get("MOELITE_DATA_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))


@pytest.fixture(scope="session", autouse=True)
def user_cache_untouched(tmp_path_factory):
    """$MOELITE_CACHE_DIR (compiled kernels, expert checksum manifests) in a temporary folder for the whole session,
    child processes included: the tests never read or write the user's ~/.cache/moelite."""
    old = os.environ.get("MOELITE_CACHE_DIR")
    os.environ["MOELITE_CACHE_DIR"] = str(tmp_path_factory.mktemp("moelite-cache"))
    yield Path(os.environ["MOELITE_CACHE_DIR"])
    if old is None:
        del os.environ["MOELITE_CACHE_DIR"]
    else:
        os.environ["MOELITE_CACHE_DIR"] = old


@pytest.fixture(autouse=True)
def background_reads_for_tiny_experts(monkeypatch):
    """The tiny checkpoints' experts would be read on the compute thread (core/loader.py INLINE_READ_BYTES): in
    this process the tests get the I/O threads they ask for, so the loader's paths stay covered
    (test_loader.py checks the inline rule itself)."""
    monkeypatch.setattr(loader, "INLINE_READ_BYTES", 0)


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """tiny(arch, **overrides) -> folder of a random checkpoint (cached per argument set)."""
    made: dict = {}
    root = tmp_path_factory.mktemp("ckpt")

    def make(arch: str, tokenizer: bool = False, **overrides) -> Path:
        key = (arch, tokenizer, tuple(sorted(overrides.items())))
        if key not in made:
            out = root / f"{arch}_{len(made)}"
            made[key] = make_tiny_checkpoint(arch, out, tokenizer=tokenizer, **overrides)
        return made[key]

    return make


@pytest.fixture(scope="session", params=ARCHS)
def arch(request):
    return request.param


@pytest.fixture
def one_thread():
    """One intra-op thread: on a small shared machine two threads spin against each other and the tests crawl."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def native_act(x, dtype):
    """x as the native kernels see it against `dtype` weights: rounded to bf16 for bf16 weights in the AVX-512 BF16
    build (native.bf16_activations()), else unchanged."""
    from moelite.core import native

    return x.bfloat16().float() if dtype == torch.bfloat16 and native.bf16_activations() else x


def swiglu_pairs_reference(gu, dn, x, slots, tok, w, act=lambda a: a):
    """SwiGLU experts one (token, expert) pair at a time with F.linear in float32: the reference the CPU kernels
    (tests/test_cpu_kernels.py, tests/test_native.py) are checked against. gu [S, 2I, H], dn [S, H, I], x [N, H].
    `act` rounds the inputs of each product as the kernel under test does (native_act for the native kernels)."""
    out = torch.zeros_like(x)
    for s, t, wt in zip(slots.tolist(), tok.tolist(), w.tolist()):
        g, u = F.linear(act(x[t:t + 1]), gu[s].float()).chunk(2, -1)
        out[t] += wt * F.linear(act(F.silu(g) * u), dn[s].float())[0]
    return out
