"""Read faults: a failed expert read fails that request with a clear error, leaves nothing pinned or queued, and
the engine works again once the file is good; a transient error is retried once."""

import errno
import re
import shutil

import pytest
import torch

import moelite
from moelite.core import expert_store
from moelite.core.expert_store import ExpertReadError


@pytest.mark.parametrize("io_threads", [0, 2])
def test_failed_read_fails_the_request_and_the_engine_recovers(tiny, tmp_path, one_thread, io_threads):
    src = tiny("qwen2_moe", num_experts=16, num_experts_per_tok=4, num_hidden_layers=3)
    path = tmp_path / "model"
    shutil.copytree(src, path)
    shards = sorted(path.glob("*.safetensors"))
    good = {s: s.read_bytes() for s in shards}
    eng = moelite.load(path, expert_budget="25%", io_threads=io_threads)
    eng.eos_ids = set()
    eng.generate([5, 9, 14, 20], max_tokens=8, temperature=0)
    for s in shards:  # cut every shard in half: experts in the second half can no longer be read
        s.write_bytes(good[s][: len(good[s]) // 2])
    names = "|".join(re.escape(s.name) for s in shards)
    with pytest.raises(ExpertReadError, match=rf"expert \d+ of layer \d+: reading \d+ bytes of .* from '({names})' "
                                              r"at offset \d+ failed twice .* restore it"):
        for seed in range(20):
            eng.generate(torch.randint(3, 120, (12,), generator=torch.Generator().manual_seed(seed)).tolist(),
                         max_tokens=8, temperature=0)
    m = eng.manager
    assert m.cache.pins == {} and m.inflight == {}  # nothing left pinned or queued
    assert eng.stats()["expert_read_errors"] >= 1
    assert eng.reader.last_error and "expert" in eng.reader.last_error and str(tmp_path) not in eng.reader.last_error
    for s in shards:
        s.write_bytes(good[s])
    fresh = moelite.load(path, expert_budget="25%", io_threads=io_threads)
    fresh.eos_ids = set()
    for seed in range(3):  # no garbage was cached: the same tokens as an engine that never saw the fault
        ids = torch.randint(3, 120, (12,), generator=torch.Generator().manual_seed(100 + seed)).tolist()
        assert eng.generate(ids, max_tokens=8, temperature=0).token_ids == \
            fresh.generate(ids, max_tokens=8, temperature=0).token_ids
    s = eng.stats()
    assert s["resident_expert_bytes_peak"] <= s["expert_budget_bytes"]
    for key in list(eng.reader.failing):  # each failed expert, read again now that the file is good
        eng.reader.read_bytes(key, eng.reader.staging())
    assert eng.reader.last_error is None  # (/health is ok again)


def test_transient_read_error_is_retried_once(tiny, monkeypatch, one_thread):
    path = tiny("qwen2_moe", num_experts=16, num_experts_per_tok=4, num_hidden_layers=3)
    eng = moelite.load(path, expert_budget="25%", io_threads=0)
    ref = moelite.load(path, expert_budget="100%")
    eng.eos_ids = ref.eos_ids = set()
    want = ref.generate([5, 9, 14, 20], max_tokens=8, temperature=0).token_ids
    real, calls = expert_store.preadv_all, {"n": 0}

    def flaky(fd, views, offset):  # every other call fails once, as a transient EIO would
        calls["n"] += 1
        if calls["n"] % 2 == 1:
            raise OSError(errno.EIO, "Input/output error")
        return real(fd, views, offset)

    monkeypatch.setattr(expert_store, "preadv_all", flaky)
    assert eng.generate([5, 9, 14, 20], max_tokens=8, temperature=0).token_ids == want
    assert calls["n"] > 0 and calls["n"] % 2 == 0 and eng.stats()["expert_misses"] > 0


def test_top_k_above_the_expert_count_is_refused_at_load(tiny, tmp_path):
    import json

    path = tmp_path / "model"
    shutil.copytree(tiny("qwen2_moe", num_experts=16, num_experts_per_tok=4), path)
    cfg = json.loads((path / "config.json").read_text())
    cfg["num_experts_per_tok"] = 17
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(moelite.core.checkpoint.CheckpointError, match=r"num_experts_per_tok = 17 .* \(16\)"):
        moelite.load(path)


def test_tokenizer_symlink_leaving_the_folder_is_refused(tiny, tmp_path):
    path = tmp_path / "model"
    shutil.copytree(tiny("qwen2_moe", tokenizer=True), path)
    outside = tmp_path / "elsewhere.json"
    shutil.move(path / "tokenizer.json", outside)
    (path / "tokenizer.json").symlink_to(outside)
    with pytest.raises(moelite.core.checkpoint.CheckpointError, match="tokenizer.json: a symlink pointing outside"):
        moelite.load(path)
    (path / "tokenizer.json").unlink()
    shutil.move(outside, path / "tokenizer.json")
    inside = path / "tok-copy.json"  # a symlink that stays inside the folder is fine
    shutil.copy(path / "tokenizer.json", inside)
    (path / "tokenizer.json").unlink()
    (path / "tokenizer.json").symlink_to(inside)
    assert moelite.load(path).tokenizer is not None
