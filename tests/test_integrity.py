"""Faults never poison the engine: expert bytes that change after their checksums were recorded are an integrity
error naming the expert (never output, never cached); changed shards are checked against the old checksums, not
re-trusted; `moelite verify` checks a checkpoint in full; relabelled header dtypes are refused at load; NaN / inf
logits end their request with a clear error and the engine goes on."""

import json
import os
import shutil
import struct

import pytest
import torch

import moelite
from moelite.tiny import edit_header
from moelite.cli import main
from moelite.core import integrity
from moelite.core.checkpoint import CheckpointError
from moelite.core.expert_store import ExpertIntegrityError
from moelite.core.integrity import NonFiniteOutputError, manifest_path, verify_checkpoint
from moelite.serve.batching import Batcher
from moelite.serve.sequence import Sequence

SHAPE = dict(num_experts=16, num_experts_per_tok=4, num_hidden_layers=3)
IDS = [5, 9, 14, 20, 33, 41]


def _copy(tiny, tmp_path, **kw):
    path = tmp_path / "model"
    shutil.copytree(tiny("qwen2_moe", **SHAPE, **kw), path)
    return path


def _corrupt(layout, key, kind: str):
    """Overwrite the first 64 bytes of expert `key`'s gate weights in its shard; returns a function restoring them."""
    info = layout.experts[key].gate
    with open(info.file, "r+b") as f:
        f.seek(info.offset)
        good = f.read(64)
        if kind == "zeros":
            bad = bytes(64)
        elif kind == "random":
            bad = torch.randint(0, 256, (64,), generator=torch.Generator().manual_seed(7), dtype=torch.uint8).numpy()
            bad = bad.tobytes()
        else:  # a NaN in every weight of the span, in the shard's own dtype
            nan = struct.pack("<H", 0x7FC0) if info.dtype == torch.bfloat16 else struct.pack("<f", float("nan"))
            bad = nan * (64 // len(nan))
        assert bad != good
        f.seek(info.offset)
        f.write(bad)

    def restore():
        with open(info.file, "r+b") as f:
            f.seek(info.offset)
            f.write(good)
    return restore


def _used_and_evicted(eng, ids, max_tokens=8):
    """Generate once; return (the generation, an expert it used that is no longer resident): the same generation
    again must read that expert from disk."""
    used = set()

    def observe(layer, routing, phase):
        used.update((layer, e) for e in routing.idx.flatten().tolist())
    eng.manager.add_observer(observe)
    try:
        ref = eng.generate(ids, max_tokens=max_tokens, temperature=0)
    finally:
        eng.manager.remove_observer(observe)
    return ref, next(k for k in sorted(used) if eng.manager.slot(k) is None)


@pytest.mark.parametrize("kind,dtype,io_threads", [("zeros", torch.float32, 2), ("random", torch.float32, 0),
                                                   ("nan", torch.bfloat16, 2)])
def test_expert_corrupted_after_load_is_an_integrity_error_and_never_cached(tiny, tmp_path, one_thread, kind, dtype,
                                                                           io_threads):
    path = _copy(tiny, tmp_path, dtype=dtype)
    eng = moelite.load(path, expert_budget="25%", io_threads=io_threads)
    eng.eos_ids = set()
    ref, key = _used_and_evicted(eng, IDS)
    restore = _corrupt(eng.layout, key, kind)
    with pytest.raises(ExpertIntegrityError, match=rf"expert {key[1]} of layer {key[0]}: its bytes \(.* in "
                                                   r"'model.safetensors' at offset \d+\) do not match the checksum "
                                                   r"recorded .*moelite verify.*--rehash") as err:
        eng.generate(IDS, max_tokens=8, temperature=0)
    assert err.value.keys == [key] and str(tmp_path) not in str(err.value)
    m = eng.manager
    assert m.slot(key) is None and m.cache.pins == {} and m.inflight == {}  # nothing garbage stays cached
    s = eng.stats()
    assert s["expert_integrity_errors"] == 1 and s["expert_read_errors"] == 1
    assert eng.reader.last_error and f"expert {key[1]} of layer {key[0]}" in eng.reader.last_error  # /health
    restore()
    assert eng.generate(IDS, max_tokens=8, temperature=0).token_ids == ref.token_ids
    assert eng.reader.last_error is None


def test_preload_and_warm_up_reads_are_checked_and_keep_no_slot(tiny, tmp_path, one_thread):
    path = _copy(tiny, tmp_path)
    eng = moelite.load(path, expert_budget="25%")
    n_slots, first = eng.pool.n_slots, eng.layout.layers[0]
    restore = _corrupt(eng.layout, (first, 0), "random")
    with pytest.raises(ExpertIntegrityError, match=f"expert 0 of layer {first}: its bytes"):
        eng.preload([(first, 0)])
    with pytest.raises(ExpertIntegrityError, match=f"expert 0 of layer {first}: its bytes"):
        eng.warm_up()  # fills slots in layer order, expert 0 first
    assert eng.manager.slot((first, 0)) is None and eng.manager.inflight == {}
    restore()
    assert eng.warm_up() == n_slots  # every slot still usable: a failed read gave its slot back


def test_checksums_do_not_depend_on_the_read_chunk(tiny, tmp_path, monkeypatch, one_thread):
    from moelite.core import expert_store

    path = _copy(tiny, tmp_path)
    eng = moelite.load(path, expert_budget="25%")
    eng.eos_ids = set()
    want = eng.generate(IDS, max_tokens=6, temperature=0).token_ids
    monkeypatch.setattr(expert_store, "READ_CHUNK", 1000)  # many chunks per expert, the last ones partial
    assert verify_checkpoint(path, progress=False).ok  # the same checksums, read 1000 bytes at a time
    other = moelite.load(path, expert_budget="25%")
    other.eos_ids = set()
    assert other.generate(IDS, max_tokens=6, temperature=0).token_ids == want
    assert other.stats()["expert_misses"] > 0 and other.stats()["expert_integrity_errors"] == 0


def test_with_verification_off_the_corrupted_read_goes_unnoticed(tiny, tmp_path, one_thread):
    path = _copy(tiny, tmp_path)
    eng = moelite.load(path, expert_budget="25%", verify_checksums=False)
    eng.eos_ids = set()
    _, key = _used_and_evicted(eng, IDS)
    _corrupt(eng.layout, key, "zeros")
    eng.generate(IDS, max_tokens=8, temperature=0)  # garbage in, no error: what verify_checksums=True prevents
    assert eng.stats()["expert_integrity_errors"] == 0 and not eng.stats()["verify_checksums"]
    assert eng.manifest is None and not manifest_path(eng.checkpoint).exists()


def test_manifest_is_written_at_first_load_and_reused(tiny, tmp_path, monkeypatch, user_cache_untouched):
    path = _copy(tiny, tmp_path)
    eng = moelite.load(path, expert_budget="25%")
    mp = manifest_path(eng.checkpoint)
    assert eng.manifest.computed and mp.is_file() and mp.parent == user_cache_untouched / "manifests"
    body = json.loads(mp.read_text())
    assert body["algorithm"] == "xxh3_64" and body["folder"] == str(path.resolve())
    assert len(body["experts"]) == 3 * 16 and all(len(h) == 16 for h in body["experts"].values())
    st = (path / "model.safetensors").stat()
    assert body["shards"] == {"model.safetensors": {"size": st.st_size, "mtime_ns": st.st_mtime_ns}}

    def no_reads(*a, **k):
        raise AssertionError("the checksums were recomputed")
    monkeypatch.setattr(integrity, "scan_experts", no_reads)
    again = moelite.load(path, expert_budget="25%")
    assert not again.manifest.computed and again.manifest.checksums == eng.manifest.checksums
    assert again.generate(IDS, max_tokens=4, temperature=0).token_ids


def test_changed_shard_is_checked_against_the_old_checksums_not_retrusted(tiny, tmp_path):
    path = _copy(tiny, tmp_path)
    eng = moelite.load(path, expert_budget="25%")
    mp = manifest_path(eng.checkpoint)
    recorded = mp.read_text()
    key = (eng.layout.layers[1], 3)
    restore = _corrupt(eng.layout, key, "zeros")  # the shard's mtime changes with its bytes
    with pytest.raises(ExpertIntegrityError, match=rf"'model.safetensors' changed on disk .* 1 of its 48 routed "
                                                   rf"experts no longer match them: expert 3 of layer {key[0]} "
                                                   r"\(model.safetensors at offset \d+\).*--rehash") as err:
        moelite.load(path, expert_budget="25%")
    assert err.value.keys == [key] and mp.read_text() == recorded  # the old checksums stay the truth
    restore()  # the same bytes again (a new mtime): re-checked, then the shard's new size and mtime are recorded
    eng = moelite.load(path, expert_budget="25%")
    assert eng.manifest.rechecked == ["model.safetensors"]
    body = json.loads(mp.read_text())
    assert body["shards"]["model.safetensors"]["mtime_ns"] == (path / "model.safetensors").stat().st_mtime_ns
    assert body["experts"] == json.loads(recorded)["experts"]
    os.utime(path / "model.safetensors")  # only touched: the same
    assert moelite.load(path, expert_budget="25%").manifest.rechecked == ["model.safetensors"]


def test_verify_command(tiny, tmp_path, capsys):
    path = _copy(tiny, tmp_path, dtype=torch.bfloat16)
    assert main(["verify", str(path), "--json"]) == 0  # no manifest yet: recorded now
    rep = json.loads(capsys.readouterr().out)
    assert rep["ok"] and rep["recorded"] and rep["experts"] == 48 and rep["mismatches"] == []
    assert main(["verify", str(path)]) == 0
    out = capsys.readouterr().out
    assert "48 routed experts in 3 layers" in out and "ok: every routed expert matches" in out
    _, layout = integrity.open_layout(path)
    key = (layout.layers[2], 11)
    _corrupt(layout, key, "random")
    assert main(["verify", str(path)]) == 1
    out = capsys.readouterr().out
    assert f"MISMATCH   expert 11 of layer {key[0]}: model.layers.{key[0]}.mlp.experts.11.gate_proj.weight" in out
    assert "'model.safetensors' at offset" in out and "FAILED: 1 experts differ" in out and "--rehash" in out
    assert main(["verify", str(path), "--json"]) == 1
    rep = json.loads(capsys.readouterr().out)
    assert not rep["ok"] and rep["changed_shards"] == ["model.safetensors"]
    assert [(d["layer"], d["expert"], d["shards"]) for d in rep["mismatches"]] == [(key[0], 11, ["model.safetensors"])]
    with pytest.raises(ExpertIntegrityError):  # the engine refuses it too
        moelite.load(path)
    assert main(["verify", str(path), "--rehash", "--json"]) == 0  # changed on purpose: recorded anew
    rep = json.loads(capsys.readouterr().out)
    assert rep["recorded"] and [(d["layer"], d["expert"]) for d in rep["rehash_changed"]] == [key]
    assert main(["verify", str(path), "--json"]) == 0 and json.loads(capsys.readouterr().out)["ok"]
    moelite.load(path)
    _corrupt(layout, (layout.layers[0], 2), "nan")
    assert main(["verify", str(path), "--rehash"]) == 1  # recorded, but NaN weights are still a finding
    assert f"NON-FINITE expert 2 of layer {layout.layers[0]}" in capsys.readouterr().out


def test_verify_reads_quantized_checkpoints(tiny, tmp_path):
    from moelite.quantize import quantize_checkpoint

    out = quantize_checkpoint(tiny("qwen2_moe"), tmp_path / "q", 4, 32, dense=True, progress=False)
    rep = verify_checkpoint(out, progress=False)
    assert rep.ok and rep.recorded and rep.experts == 3 * 8
    assert moelite.load(out, expert_budget="25%").manifest.checksums == \
        {tuple(int(v) for v in k.split(".")): int(h, 16)
         for k, h in json.loads(manifest_path(integrity.open_layout(out)[0]).read_text())["experts"].items()}


def test_relabelled_header_dtype_is_refused_at_load(tiny, tmp_path):
    path = _copy(tiny, tmp_path, dtype=torch.bfloat16)
    name = "model.layers.1.mlp.experts.5.up_proj.weight"

    def relabel(h):
        assert h[name]["dtype"] == "BF16"
        h[name]["dtype"] = "F16"  # same byte count: only the number format changes
    edit_header(path / "model.safetensors", relabel)
    with pytest.raises(CheckpointError, match=rf"model.safetensors: tensor '{name}' is F16 in the safetensors header, "
                                              r"but config.json declares dtype 'bfloat16'.*relabelled.*re-download"):
        moelite.load(path)
    with pytest.raises(CheckpointError, match="is F16 in the safetensors header"):  # moelite verify: the same check
        verify_checkpoint(path, progress=False)


def test_expert_dtype_other_than_the_declared_one_is_refused(tiny, tmp_path):
    path = _copy(tiny, tmp_path, dtype=torch.bfloat16)
    cfg = json.loads((path / "config.json").read_text())
    cfg["dtype"] = "float32"
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"routed expert tensor 'model.layers.0.mlp.experts.0.gate_proj.weight' "
                                              r"is BF16 in the safetensors header, but config.json declares dtype "
                                              r"'float32'"):
        moelite.load(path)
    cfg["dtype"] = "float16"  # a 16-bit dtype of the other kind: every BF16 tensor is suspect
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="is BF16 in the safetensors header, but config.json declares dtype "
                                              "'float16'"):
        moelite.load(path)


def test_nonfinite_logits_end_the_request_with_an_error_and_the_engine_recovers(tiny, tmp_path, one_thread):
    path = _copy(tiny, tmp_path)
    eng = moelite.load(path, expert_budget="25%", verify_checksums=False)  # NaN weights reach the compute
    eng.eos_ids = set()
    ref, key = _used_and_evicted(eng, IDS)
    restore = _corrupt(eng.layout, key, "nan")
    with pytest.raises(NonFiniteOutputError, match=r"non-finite logits \(NaN or inf\) at .* of this request.*"
                                                   r"moelite verify"):
        eng.generate(IDS, max_tokens=8, temperature=0)
    restore()
    assert eng.generate(IDS, max_tokens=8, temperature=0).token_ids == ref.token_ids


def test_nonfinite_row_fails_only_its_sequence(tiny):
    eng = moelite.load(tiny("qwen2_moe"), expert_budget="100%")
    eng.eos_ids = set()
    b = Batcher(eng, max_batch=2)
    real, steps = b.runner.decode, {"n": 0}

    def decode(seqs):
        out = real(seqs).clone()
        steps["n"] += 1
        if steps["n"] == 2:
            assert len(seqs) == 2
            out[0, 7] = float("inf")  # the first sequence's row, at the second decode step
        return out
    b.runner.decode = decode
    events = {0: [], 1: []}
    params = eng.sampling_params(max_tokens=6, temperature=0)
    seqs = [Sequence([5, 6, 7 + i], params, lambda ev, i=i: events[i].append(ev)) for i in range(2)]
    for s in seqs:
        b.submit(s)
    while b.step() or b.queue_depth():
        pass
    kind, status, msg, _ = events[0][-1]
    assert (kind, status) == ("error", 500) and "non-finite logits (NaN or inf) at decode step 2" in msg
    assert isinstance(seqs[0].error, NonFiniteOutputError) and seqs[0].finish is None
    assert events[1][-1][0] == "done" and events[1][-1][1]["finish_reason"] == "length"
    assert eng.generate([5, 6, 8], max_tokens=6, temperature=0).token_ids == events[1][-1][1]["token_ids"]
