"""O_DIRECT expert reads (moelite.core.direct_io): the same bytes in the same places as a page-cache read, for any
alignment, split, segment order and file end; errors surface; engines with and without it give the same tokens."""

import os

import pytest
import torch

import moelite
from moelite.core import direct_io, expert_store
from moelite.core.direct_io import DirectIO


def _file(tmp_path, size: int):
    data = os.urandom(size)
    path = tmp_path / "shard.bin"
    path.write_bytes(data)
    return path, data


SIZE = 4096 * 40 - 7  # the file's last block is partial


@pytest.mark.parametrize("offset,segs", [
    (0, [(0, 3 * 4096)]),  # aligned, whole blocks
    (1234, [(0, 70_001)]),  # unaligned head and tail
    (777, [(50_000, 20_000), (0, 20_000), (20_000, 30_000)]),  # parts scattered in the slot (file order != slot)
    (SIZE - 10_000, [(0, 10_000)]),  # ends at the file's end: its part past the last whole block
    (4096 * 39 + 5, [(0, SIZE - 4096 * 39 - 5)]),  # all of it past the last whole block
])
@pytest.mark.parametrize("chunk,streams", [(1 << 20, 4), (8192, 3), (4096, 1)])
def test_direct_read_places_every_byte(tmp_path, monkeypatch, offset, segs, chunk, streams):
    monkeypatch.setattr(direct_io, "CHUNK", chunk)
    size = SIZE
    path, data = _file(tmp_path, size)
    nbytes = sum(n for _, n in segs)
    total = max(dp + n for dp, n in segs)
    raw = memoryview(bytearray(total))
    dio = DirectIO(streams)
    fdd = dio.open(path)
    if fdd is None:
        pytest.skip("this file system refuses O_DIRECT")
    fd = os.open(path, os.O_RDONLY)
    cached = dio.read(fdd, fd, offset, nbytes, segs, raw, size, expert_store.preadv_all)
    assert cached == (offset + nbytes > size - size % direct_io.BLOCK)  # its part past the last whole block
    at = offset
    for dp, n in segs:  # segs are in file order
        assert bytes(raw[dp:dp + n]) == data[at:at + n]
        at += n
    os.close(fd), os.close(fdd), dio.close()


def test_direct_read_error_is_raised_after_every_part_stopped(tmp_path, monkeypatch):
    monkeypatch.setattr(direct_io, "CHUNK", 4096)
    path, _ = _file(tmp_path, 4096 * 16)
    dio = DirectIO(4)
    fdd = dio.open(path)
    if fdd is None:
        pytest.skip("this file system refuses O_DIRECT")
    seen = []

    def failing(fd, view, offset):
        seen.append(offset)
        if offset == 4096 * 8:
            raise OSError(5, "Input/output error")
        expert_store.preadv_all(fd, view, offset)

    with pytest.raises(OSError, match="Input/output error"):
        dio.read(fdd, fdd, 0, 4096 * 16, [(0, 4096 * 16)], memoryview(bytearray(4096 * 16)), 4096 * 16, failing)
    assert len(seen) >= 3  # the other parts ran (and finished) too


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_engine_tokens_and_bytes_read_equal_with_and_without_direct_io(tiny, dtype):
    path = tiny("qwen2_moe", num_experts=16, num_experts_per_tok=4, num_hidden_layers=3, dtype=getattr(torch, dtype))
    out = []
    for direct in (True, False):
        eng = moelite.load(path, expert_budget="25%", direct_io=direct)
        assert (eng.reader.dio is not None) == direct
        eng.eos_ids = set()
        toks = eng.generate([5, 9, 14, 20], max_tokens=12, temperature=0).token_ids
        out.append((toks, eng.stats()["expert_bytes_read"], eng.stats()["expert_integrity_errors"]))
        assert eng.stats()["expert_reads_path"] == ("o_direct" if direct else "page cache, dropped")
    assert out[0] == out[1] and out[0][1] > 0 and out[0][2] == 0
