"""moelite's native CPU kernels (moelite/core/native.py, native/gemv.c) against torch in float32.

In the AVX-512 build, bf16 weights multiply bf16-rounded activations: the reference rounds them the same way
(conftest.native_act). Where this CPU runs the AVX-512 build, the AVX2 build is checked too (this file again in a
subprocess with MOELITE_NATIVE=avx2).

- `gemv` equals x @ w.T for float32, bf16 and fp16 weights, 1 to 8 rows, output and input sizes that are not
  multiples of the kernel's blocks, strided input rows, and in accumulate mode (out += alpha * x @ w.T).
- `swiglu_pairs` equals SwiGLU experts computed one pair at a time, with a slot used by more tokens than one group
  holds (groups split), and leaves untouched the rows of tokens no pair names.
- Bad arguments are refused with the reason; `MOELITE_NATIVE=0` turns the kernels off (checked in a subprocess).
- `Linear16` equals a float32 nn.Linear over the same weights at decode and at prefill sizes (both kernels).
"""

import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from conftest import native_act, swiglu_pairs_reference
from moelite.core import dense, native

pytestmark = pytest.mark.skipif(not native.available(), reason=f"native CPU kernels unavailable: {native.status()}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 8])
@pytest.mark.parametrize("o,i", [(37, 70), (64, 2048), (5, 8)])
def test_gemv_equals_torch(dtype, rows, o, i):
    gen = torch.Generator().manual_seed(rows * 1000 + o + i)
    w = torch.randn(o, i, generator=gen).to(dtype)
    wide = torch.randn(rows, i + 5, generator=gen)
    x = wide[:, 2:i + 2]  # strided rows, each contiguous
    want = F.linear(native_act(x, dtype), w.float())
    torch.testing.assert_close(native.gemv(x, w), want, rtol=1e-5, atol=1e-4)
    out = torch.randn(rows, o, generator=gen)
    alpha = torch.rand(rows, generator=gen)
    expected = out + alpha[:, None] * want
    native.gemv(x, w, out=out, alpha=alpha)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_swiglu_pairs_equals_per_pair(dtype):
    gen = torch.Generator().manual_seed(7)
    S, H, E, N = 6, 40, 24, 12
    gu = (torch.randn(S, 2 * E, H, generator=gen) * 0.2).to(dtype)
    dn = (torch.randn(S, H, E, generator=gen) * 0.2).to(dtype)
    x = torch.randn(N, H, generator=gen)
    # slot 2 serves 11 of the 12 tokens (two groups), slots 0 and 5 one token each; token 11 has no pair
    slots = torch.tensor([0] + [2] * 11 + [5])
    tok = torch.tensor([3] + list(range(11)) + [7])
    w = torch.rand(len(slots), generator=gen)
    out = native.swiglu_pairs(gu, dn, x, slots, tok, w, torch.zeros(N, H))
    want = swiglu_pairs_reference(gu, dn, x, slots, tok, w, act=lambda a: native_act(a, dtype))
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-5)
    assert out[11].abs().max() == 0


@pytest.mark.skipif(native.variant() != "avx512", reason="this CPU runs the AVX2 build only (tested above)")
def test_avx2_build_on_an_avx512_cpu():
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          "not avx2_build"], capture_output=True, text=True,
                         env={**os.environ, "MOELITE_NATIVE": "avx2"}, cwd=os.path.dirname(__file__))
    assert res.returncode == 0, res.stdout[-2000:]
    assert "passed" in res.stdout


def test_variant_is_reported():
    assert native.status().startswith("AVX-512" if native.variant() == "avx512" else "AVX2")
    assert native.bf16_activations() == (native.variant() == "avx512")


def test_bad_arguments_are_refused():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="N<= 8"):
        native.gemv(torch.randn(9, 8), w)
    with pytest.raises(ValueError, match="gemv"):
        native.gemv(torch.randn(1, 8), torch.randn(4, 16))
    with pytest.raises(TypeError, match="float32/bfloat16/float16"):
        native.gemv(torch.randn(1, 8), w.to(torch.float64))


def test_off_switch():
    code = "from moelite.core import native; print(native.available(), native.status())"
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={**os.environ, "MOELITE_NATIVE": "0"}, check=True)
    assert res.stdout.strip() == "False off (MOELITE_NATIVE=0)"


@pytest.mark.parametrize("rows", [1, 3, 8, 9, 40])
@pytest.mark.parametrize("bias", [False, True])
def test_linear16_equals_float32_linear(rows, bias, monkeypatch):
    monkeypatch.setattr(native, "BLOCK", 16)  # several conversion blocks at prefill sizes
    gen = torch.Generator().manual_seed(rows)
    lin = torch.nn.Linear(48, 50, bias=bias)
    with torch.no_grad():
        lin.weight.copy_(lin.weight.to(torch.bfloat16).float())
    mod = dense.Linear16(48, 50, bias, torch.bfloat16)
    with torch.no_grad():
        mod.weight.copy_(lin.weight)
        if bias:
            mod.bias.copy_(lin.bias)
    x = torch.randn(2, rows, 48, generator=gen)
    decode = x.shape[0] * x.shape[1] <= native.MAX_ROWS  # the GEMV kernel; more rows: widened weights, torch.mm
    torch.testing.assert_close(mod(x), lin(native_act(x, torch.bfloat16) if decode else x), rtol=1e-5, atol=1e-5)


class _Attn(torch.nn.Module):
    def __init__(self, make):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj = make(64, 96), make(64, 32), make(64, 32)

    def forward(self, x):
        return self.q_proj(x), self.k_proj(x), self.v_proj(x)


def _linear16(i, o):
    m = dense.Linear16(i, o, True, torch.bfloat16)
    with torch.no_grad():
        m.weight.copy_(torch.randn(o, i))
        m.bias.copy_(torch.randn(o))
    return m


def _linearq(i, o):
    from moelite.core import quant

    packed, scale = quant.quantize(torch.randn(o, i).bfloat16(), 8, 32)
    m = quant.LinearQ(i, o, False, 8, 32, torch.bfloat16)
    with torch.no_grad():
        m.weight_packed.copy_(packed)
        m.weight_scale.copy_(scale)
    return m


@pytest.mark.parametrize("make", [_linear16, _linearq])
@pytest.mark.parametrize("rows", [1, 3, 12])
def test_fused_qkv_equals_separate_projections(make, rows):
    torch.manual_seed(rows)
    attn = _Attn(make)
    x = torch.randn(1, rows, 64)
    want = [t.clone() for t in attn(x)]
    assert dense.fuse_projections(attn) == 1
    fused = attn.q_proj.forward.func.__self__
    calls, decode = [], fused.decode
    fused.decode = lambda x2: (calls.append(x2.shape[0]), decode(x2))[1]
    for got, exp in zip(attn(x), want):
        torch.testing.assert_close(got, exp)
    assert calls == ([rows] if rows <= native.MAX_ROWS else [])  # one native call for the three at decode
    y = torch.randn(1, rows, 64)  # k alone, on another input: its own part, not the kept one
    k_alone = attn.k_proj(y)
    attn2 = _Attn(make)
    attn2.load_state_dict(attn.state_dict())
    torch.testing.assert_close(k_alone, attn2.k_proj(y))


class _Mlp(torch.nn.Module):
    def __init__(self, make):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = make(64, 96), make(64, 96), make(96, 64)
        self.act_fn = torch.nn.SiLU()

    def forward(self, x):
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


@pytest.mark.parametrize("rows", [1, 3, 12])
def test_fused_quantized_swiglu_equals_three_projections(rows):
    torch.manual_seed(rows)
    mlp = _Mlp(_linearq)
    x = torch.randn(1, rows, 64)
    want = mlp(x).clone()
    assert dense.fuse_swiglu(mlp) == 1 and "forward" in mlp.__dict__
    # the one-call kernel quantizes the SwiGLU activations to int8 per block as the separate down_proj call does
    torch.testing.assert_close(mlp(x), want, rtol=2e-2, atol=2e-2)
