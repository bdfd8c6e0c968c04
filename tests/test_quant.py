"""Weight-only quantized experts and dense layers (moelite/core/quant.py, moelite/quantize.py, native kernels).

- The packing is compressed-tensors' pack-quantized layout, checked on hand-made values (element i at bit
  i * bits, stored as q + 2^(bits-1)), and against compressed-tensors itself where it is installed.
- The native int8/int4 kernels equal float32 math over the dequantized weights and the int8-quantized activations
  (blocks of 32), for 1-8 rows, groups of 32 / 128 / per-channel, accumulate mode, and split slot groups.
- `moelite quantize` output loads: prefill logits (the dequantizing path) equal transformers over the same weights
  dequantized; decode (the native path) stays within activation-quantization error; every expert budget gives the
  same tokens (misses read packed bytes); --dense swaps the dense linear layers; bad input is refused.
"""

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

import moelite
from moelite.core import native, quant
from moelite.core.checkpoint import CheckpointError
from moelite.quantize import quantize_checkpoint

needs_native = pytest.mark.skipif(not native.available(), reason=f"native CPU kernels unavailable: {native.status()}")


def test_packing_layout_by_hand():
    q4 = torch.tensor([[-8, -7, 0, 1, 2, 3, 6, 7]], dtype=torch.int8)
    # unsigned values 0 1 8 9 10 11 14 15, element i at bits 4i of one little-endian int32
    want = sum(v << (4 * i) for i, v in enumerate([0, 1, 8, 9, 10, 11, 14, 15]))
    assert quant.pack(q4, 4).item() == want - (1 << 32)
    q8 = torch.tensor([[-128, -1, 0, 127]], dtype=torch.int8)
    want8 = sum(v << (8 * i) for i, v in enumerate([0, 127, 128, 255]))
    assert quant.pack(q8, 8).item() == want8 - (1 << 32)
    for q, bits in ((q4, 4), (q8, 8)):
        assert torch.equal(quant.unpack(quant.pack(q, bits), bits), q)


def test_packing_matches_compressed_tensors():
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    gen = torch.Generator().manual_seed(0)
    for bits in (4, 8):
        q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (6, 64), generator=gen).to(torch.int8)
        assert torch.equal(quant.pack(q, bits), helpers.pack_to_int32(q, bits))
        assert torch.equal(helpers.unpack_from_int32(quant.pack(q, bits), bits, q.shape), q)


def _qw(o, i, bits, group, seed=0, dtype=torch.bfloat16):
    w = torch.randn(o, i, generator=torch.Generator().manual_seed(seed)).to(dtype)
    packed, scale = quant.quantize(w, bits, group)
    return w, quant.QWeight(packed.view(torch.uint8), scale, bits, group or i)


def _qact(x):
    """The kernels' activation quantization: int8 per block of 32, scale max|x| / 127, round half to even."""
    xb = x.reshape(*x.shape[:-1], -1, 32)
    d = xb.abs().amax(-1, keepdim=True) / 127
    q = torch.round(xb / torch.where(d > 0, d, torch.ones_like(d)))
    return (q * d).reshape(x.shape)


def test_quantize_error_is_bounded():
    for bits in (4, 8):
        w, qw = _qw(64, 256, bits, 32)
        err = (quant.dequantize(qw) - w.float()).abs()
        step = qw.scale.float().repeat_interleave(32, dim=1)
        assert (err <= step / 2 + 1e-6).all()  # round to nearest: at most half a step


@needs_native
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [32, 128, None])
@pytest.mark.parametrize("rows", [1, 2, 5, 8])
# the AVX-512 loop takes 4-bit blocks four at a time and scales sixteen at a time: 96 (three blocks: none in that
# loop), 256 (two steps), 288 (and one block alone), 1184 (two whole scale chunks, a partial one, one block alone)
@pytest.mark.parametrize("i", [96, 256, 288, 1184])
@pytest.mark.parametrize("scale_dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_qgemv_equals_dequantized(bits, group, rows, i, scale_dtype):
    if group and i % group:
        pytest.skip("the group does not divide the input size")
    _, qw = _qw(45, i, bits, group, seed=rows, dtype=scale_dtype)
    gen = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, i, generator=gen)
    want = F.linear(_qact(x), quant.dequantize(qw))
    torch.testing.assert_close(native.qgemv(x, qw), want, rtol=1e-4, atol=1e-4)
    out, alpha = torch.randn(rows, 45, generator=gen), torch.rand(rows, generator=gen)
    expected = out + alpha[:, None] * want
    native.qgemv(x, qw, out=out, alpha=alpha)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
    assert (native.qgemv(x, qw) - F.linear(x, quant.dequantize(qw))).abs().max() > 0  # activations are quantized


@needs_native
@pytest.mark.parametrize("bits", [4, 8])
def test_activation_rounding_ties_go_to_even(bits):
    """Activations whose scaled values fall exactly halfway (max |x| = 127, so the scale is 1): 2.5 -> 2, -3.5 -> -4,
    0.5 -> 0, as llama.cpp's and torch's round-half-to-even; each element checked through one-hot weight rows."""
    x = torch.tensor([[127.0, 2.5, -3.5, 0.5, -0.5, 1.5, 126.5, -126.5] * 4])
    w = torch.eye(32).bfloat16()  # row k picks element k
    packed, scale = quant.quantize(w, bits, 32)
    qw = quant.QWeight(packed.view(torch.uint8), scale, bits, 32)
    got = native.qgemv(x, qw) / quant.dequantize(qw).diagonal()
    torch.testing.assert_close(got, torch.round(x), rtol=0, atol=1e-4)
    assert got[0, 1].item() == pytest.approx(2.0) and got[0, 2].item() == pytest.approx(-4.0)


@needs_native
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("h,e", [(96, 64), (544, 160)])  # and 17 and 5 blocks: whole steps of the AVX-512 loop too
def test_swiglu_pairs_quantized(bits, h, e):
    S, H, E, N = 5, h, e, 12
    gen = torch.Generator().manual_seed(bits)
    stacks = []
    for shape in ((2 * E, H), (H, E)):
        ws = [quant.quantize((torch.randn(*shape, generator=gen) * 0.2).bfloat16(), bits, 32) for _ in range(S)]
        stacks.append(quant.QWeight(torch.stack([p.view(torch.uint8) for p, _ in ws]), torch.stack([s for _, s in ws]),
                                    bits, 32))
    gu, dn = stacks
    x = torch.randn(N, H, generator=gen)
    slots = torch.tensor([0] + [2] * 11 + [4])  # slot 2 serves 11 tokens: two groups
    tok = torch.tensor([3] + list(range(11)) + [7])
    w = torch.rand(len(slots), generator=gen)
    out = native.swiglu_pairs(gu, dn, x, slots, tok, w, torch.zeros(N, H))
    gud, dnd = quant.dequantize(gu), quant.dequantize(dn)
    want = torch.zeros(N, H)
    for s, t, wt in zip(slots.tolist(), tok.tolist(), w.tolist()):
        g, u = F.linear(_qact(x[t]), gud[s]).chunk(2)
        want[t] += wt * F.linear(_qact(F.silu(g) * u), dnd[s])
    torch.testing.assert_close(out, want, rtol=1e-4, atol=1e-4)
    assert out[11].abs().max() == 0


def _fake_quant(src, dst, bits, group, dense):
    """The float checkpoint whose expert (and dense) weights are the quantized ones, dequantized: the reference."""
    from moelite.core.arch import adapter_for
    from moelite.core.checkpoint import Checkpoint
    from moelite.core.expert_store import ExpertLayout
    from moelite.quantize import _dense_targets
    from transformers import AutoConfig

    ckpt = Checkpoint.open(src)
    adapter = adapter_for(ckpt.model_type)
    cfg = AutoConfig.from_pretrained(src)
    layout = ExpertLayout.build(ckpt, adapter, adapter.num_experts(cfg))
    names = layout.expert_tensor_names() | (set(_dense_targets(ckpt, adapter, cfg, layout, group)) if dense else set())
    dst.mkdir()
    for f in src.glob("*.safetensors"):
        state = load_file(f)
        for n, t in state.items():
            if n in names:
                mats = t.view(-1, *t.shape[-2:])
                qd = [quant.dequantize(quant.QWeight(p.view(torch.uint8), s, bits, group or m.shape[-1]))
                      for m in mats for p, s in [quant.quantize(m, bits, group)]]
                state[n] = torch.stack(qd).view(t.shape).to(t.dtype)
        save_file(state, str(dst / f.name), metadata={"format": "pt"})
    for f in src.iterdir():
        if f.suffix == ".json":
            (dst / f.name).write_text(f.read_text())
    return dst


@pytest.mark.parametrize("bits,dense", [(8, False), (4, True)])
def test_quantized_checkpoint_equals_dequantized_reference(tiny, tmp_path, bits, dense):
    src = tiny("qwen2_moe")
    out = quantize_checkpoint(src, tmp_path / "q", bits, 32, dense=dense, progress=False)
    cfg = json.loads((out / "config.json").read_text())["quantization_config"]
    assert cfg["quant_method"] == "compressed-tensors" and cfg["config_groups"]["group_0"]["weights"]["num_bits"] == bits
    ref = AutoModelForCausalLM.from_pretrained(_fake_quant(src, tmp_path / "ref", bits, 32, dense), dtype=torch.float32)
    eng = moelite.load(out, expert_budget="100%")
    s = eng.stats()
    assert s["expert_quant"] == f"int{bits} g32" and s["expert_slot_dtype"] == "uint8"
    assert s["expert_slot_bytes"] == 3 * 64 * 32 * bits // 8 + 3 * 64 * 4  # packed bytes + float32 scales
    assert (s["dense_quantized_layers"] > 0) == dense
    ids = torch.randint(3, 128, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = ref(ids).logits
    got = eng.logits(ids)
    # only the int8 quantization of activations (native kernels, up to 8 tokens per expert) separates the two (and,
    # rarely, a router near a tie that it tips: a few positions); a wrong layout or scale gives errors of the logits'
    # own size everywhere
    tol = 0.02 if native.available() else 1e-4
    per_position = (got - want).abs().amax(-1)
    assert (per_position > tol * want.abs().max()).float().mean().item() <= 0.05
    assert (got.argmax(-1) == want.argmax(-1)).float().mean() > 0.9
    step = eng.logits(ids[:1, :1])
    with torch.no_grad():
        ref_step = ref(ids[:1, :1]).logits
    assert (step - ref_step).abs().max().item() < tol * ref_step.abs().max().item()


def test_quantized_budgets_agree(tiny, tmp_path):
    out = quantize_checkpoint(tiny("qwen2_moe"), tmp_path / "q", 8, 32, progress=False)
    prompt = list(range(5, 17))
    runs = []
    for budget in ("100%", "25%"):
        eng = moelite.load(out, expert_budget=budget)
        eng.eos_ids = set()
        runs.append(eng.generate(prompt, max_tokens=12, temperature=0).token_ids)
        s = eng.stats()
        assert s["resident_expert_bytes_peak"] <= s["expert_budget_bytes"]
    assert runs[0] == runs[1]
    assert eng.stats()["expert_misses"] > 0 and eng.stats()["expert_bytes_read"] > 0


def test_bad_quantization_is_refused(tiny, tmp_path):
    src = tiny("qwen2_moe")
    out = quantize_checkpoint(src, tmp_path / "q", 8, 32, progress=False)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_checkpoint(out, tmp_path / "q2", 8, 32, progress=False)
    with pytest.raises(ValueError, match="not an empty folder"):
        quantize_checkpoint(src, out, 8, 32, progress=False)
    with pytest.raises(ValueError, match="multiple of 32"):
        quantize_checkpoint(src, tmp_path / "q3", 8, 48, progress=False)
    with pytest.raises(ValueError, match="not a multiple of 128"):
        quantize_checkpoint(src, tmp_path / "q4", 8, 128, progress=False)  # expert intermediate 32
    cfg = json.loads((out / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = False
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="asymmetric"):
        moelite.load(out)
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["symmetric"] = True
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="quantized"):
        moelite.load(out, expert_dtype="float32")


def test_quantize_command(tiny, tmp_path, capsys):
    from moelite.cli import main

    src = tiny("qwen2_moe")
    assert main(["quantize", str(src), str(tmp_path / "q"), "--bits", "4", "--group-size", "channel", "--dense",
                 "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["bits"] == 4 and res["group_size"] is None and res["dst_bytes"] < res["src_bytes"]
    assert moelite.load(tmp_path / "q").stats()["expert_quant"] == "int4 per-channel"
    for bad, why in ((["--bits", "3"], "invalid choice"), (["--bits", "8", "--group-size", "48"], "multiple of 32")):
        assert main(["quantize", str(src), str(tmp_path / "bad"), *bad]) == 2
        err = capsys.readouterr().err
        assert err.startswith("moelite: error:") and why in err and "Traceback" not in err
    assert not (tmp_path / "bad").exists()  # refused before anything is written
    assert main(["quantize", "--help"]) == 0
    assert "(default: 32)" in capsys.readouterr().out
