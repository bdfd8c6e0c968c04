"""Shared fixtures: tiny checkpoints of every architecture, written once per test session by transformers."""

import os
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from moelite.tiny import ARCHS, make_tiny_checkpoint

torch.set_num_threads(min(2, os.cpu_count() or 1))
SHARED_DATA = Path(os.environ.get("MOELITE_DATA_DIR", Path(__file__).resolve().parents[1] / ".." / "shared" / "data"))


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


def swiglu_pairs_reference(gu, dn, x, slots, tok, w):
    """SwiGLU experts one (token, expert) pair at a time with F.linear in float32: the reference the CPU kernels
    (tests/test_cpu_kernels.py, tests/test_native.py) are checked against. gu [S, 2I, H], dn [S, H, I], x [N, H]."""
    out = torch.zeros_like(x)
    for s, t, wt in zip(slots.tolist(), tok.tolist(), w.tolist()):
        g, u = F.linear(x[t:t + 1], gu[s].float()).chunk(2, -1)
        out[t] += wt * F.linear(F.silu(g) * u, dn[s].float())[0]
    return out
