"""Checkpoint refusals: each names the file or field and what is allowed."""

import json
import os
import shutil
import struct

import pytest
import torch

import moelite
from moelite.tiny import edit_header
from moelite.core.arch import SUPPORTED
from moelite.core.checkpoint import Checkpoint, CheckpointError


@pytest.fixture
def ckpt_copy(tiny, tmp_path):
    src = tiny("qwen2_moe")
    dst = tmp_path / "model"
    shutil.copytree(src, dst)
    return dst


def test_reads_headers_and_locates_experts(tiny):
    ck = Checkpoint.open(tiny("qwen2_moe"))
    info = ck.tensors["model.layers.0.mlp.experts.3.gate_proj.weight"]
    assert info.shape == (32, 64) and info.dtype == torch.float32 and info.nbytes == 32 * 64 * 4
    with open(info.file, "rb") as fh:  # the offset really points at the tensor's bytes
        fh.seek(info.offset)
        raw = fh.read(info.nbytes)
    from safetensors import safe_open
    with safe_open(info.file, "pt") as f:
        assert torch.equal(torch.frombuffer(bytearray(raw), dtype=torch.float32).view(32, 64),
                           f.get_tensor(info.name))


def test_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint.open(tmp_path / "nope")


def test_missing_config(ckpt_copy):
    (ckpt_copy / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json is missing"):
        Checkpoint.open(ckpt_copy)


def test_missing_weights(ckpt_copy):
    (ckpt_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no weights .* expected model.safetensors"):
        Checkpoint.open(ckpt_copy)


def test_unsupported_architecture_lists_supported(ckpt_copy):
    cfg = json.loads((ckpt_copy / "config.json").read_text())
    cfg["model_type"] = "llama"
    (ckpt_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as err:
        moelite.load(ckpt_copy)
    msg = str(err.value)
    assert "'llama' is not supported" in msg and all(a in msg for a in SUPPORTED)


def _write_index(folder, shard_name):
    ck = Checkpoint.open(folder)
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": {n: shard_name for n in ck.tensors}}))


def test_shard_path_with_dotdot_refused(ckpt_copy):
    _write_index(ckpt_copy, "../model.safetensors")
    with pytest.raises(CheckpointError, match=r"leaves the model folder \('\.\.' is not allowed\)"):
        Checkpoint.open(ckpt_copy)


def test_absolute_shard_path_refused(ckpt_copy):
    _write_index(ckpt_copy, str(ckpt_copy / "model.safetensors"))
    with pytest.raises(CheckpointError, match="is absolute"):
        Checkpoint.open(ckpt_copy)


def test_symlink_outside_refused(ckpt_copy, tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    shutil.move(ckpt_copy / "model.safetensors", outside / "model.safetensors")
    os.symlink(outside / "model.safetensors", ckpt_copy / "model.safetensors")
    with pytest.raises(CheckpointError, match="symlink pointing outside the model folder"):
        Checkpoint.open(ckpt_copy)


def test_symlink_inside_allowed(ckpt_copy):
    (ckpt_copy / "model.safetensors").rename(ckpt_copy / "real.bin.safetensors")
    os.symlink("real.bin.safetensors", ckpt_copy / "model.safetensors")
    assert Checkpoint.open(ckpt_copy).tensors


def test_sharded_index_loads(tiny, tmp_path):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tiny("olmoe"))
    out = tmp_path / "sharded"
    model.save_pretrained(out, max_shard_size="100KB")
    assert (out / "model.safetensors.index.json").is_file()
    ck = Checkpoint.open(out)
    assert len(ck.weight_files) > 1
    ids = torch.randint(3, 100, (1, 9))
    eng = moelite.load(out, expert_budget="50%")
    with torch.no_grad():
        ref = model(ids).logits
    assert (eng.logits(ids) - ref).abs().max() < 1e-4


def test_index_naming_missing_shard(ckpt_copy):
    _write_index(ckpt_copy, "model-00001-of-00002.safetensors")
    with pytest.raises(CheckpointError, match="names shard 'model-00001-of-00002.safetensors', which is missing"):
        Checkpoint.open(ckpt_copy)


def test_pickle_refused_then_allowed(ckpt_copy, tmp_path, monkeypatch):
    from safetensors.torch import load_file
    state = load_file(ckpt_copy / "model.safetensors")
    (ckpt_copy / "model.safetensors").unlink()
    torch.save(state, ckpt_copy / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin: pickle weights are refused.*allow_pickle=True"):
        Checkpoint.open(ckpt_copy)
    monkeypatch.setenv("MOELITE_CACHE", str(tmp_path / "cache"))
    eng = moelite.load(ckpt_copy, allow_pickle=True)
    assert eng.generate([5, 6, 7], max_tokens=3, temperature=0).token_ids


def test_truncated_header(ckpt_copy):
    f = ckpt_copy / "model.safetensors"
    f.write_bytes(f.read_bytes()[:4])
    with pytest.raises(CheckpointError, match="model.safetensors: truncated safetensors file"):
        Checkpoint.open(ckpt_copy)


def test_header_length_beyond_file(ckpt_copy):
    f = ckpt_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(struct.pack("<Q", len(data) * 2) + data[8:])
    with pytest.raises(CheckpointError, match="corrupt or truncated safetensors header"):
        Checkpoint.open(ckpt_copy)


def test_corrupt_header_json(ckpt_copy):
    f = ckpt_copy / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[8:12] = b"\xff\xfe{["
    f.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt safetensors header"):
        Checkpoint.open(ckpt_copy)


def test_truncated_tensor_data(ckpt_copy):
    f = ckpt_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    with pytest.raises(CheckpointError, match="truncated safetensors file: tensor .* re-download"):
        Checkpoint.open(ckpt_copy)


def test_bad_config_json(ckpt_copy):
    (ckpt_copy / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json .* is not valid JSON"):
        Checkpoint.open(ckpt_copy)


def test_header_with_overlapping_tensors_is_refused(ckpt_copy):
    def overlap(h):
        a, b = sorted((n for n in h if n != "__metadata__"), key=lambda n: h[n]["data_offsets"][0])[:2]
        h[b]["data_offsets"] = [h[a]["data_offsets"][0], h[a]["data_offsets"][0] +
                                h[b]["data_offsets"][1] - h[b]["data_offsets"][0]]  # b now starts where a does
    edit_header(ckpt_copy / "model.safetensors", overlap)
    with pytest.raises(CheckpointError, match="model.safetensors: corrupt safetensors header: tensors .* overlap"):
        Checkpoint.open(ckpt_copy)


def test_header_with_non_integer_shape_is_refused(ckpt_copy):
    def floats(h):
        name = next(n for n in h if n != "__metadata__")
        h[name]["shape"] = [float(s) for s in h[name]["shape"]]
    edit_header(ckpt_copy / "model.safetensors", floats)
    with pytest.raises(CheckpointError, match="an integer shape"):
        Checkpoint.open(ckpt_copy)
