"""Expert reads that bypass the OS page cache (O_DIRECT), each range split over a few threads.

Why. Reading through the page cache under a memory cap costs twice: every page is allocated and charged to the
cgroup (which must first reclaim others when it is full) and copied out by the kernel, then dropped again
(`drop_page_cache`). With O_DIRECT the device writes into an aligned bounce buffer and only the copy into the slot
remains. One O_DIRECT stream is slower than the page cache's own readahead, so a range is split into `streams`
parts read at once: on the 2-core EPYC VM of the benchmarks (virtio disk), a 9.4 MB expert took 8.90 ms cold with
4 streams of 1 MiB reads against 10.77 ms through the page cache (medians of 120, benchmarks/read_latency.py,
benchmarks/results/odirect/).

Contract:
  - `DirectIO(streams)`; `open(path)` -> an O_DIRECT descriptor, or None where the file system refuses O_DIRECT
    (tmpfs, some network file systems): the caller then reads through the page cache as before.
  - `read(fd_direct, fd, offset, nbytes, segs, raw, file_size, pread)` fills the bytes of the file range [offset,
    offset + nbytes) into the writable buffer `raw` at the positions `segs` ((slot position, bytes), ... in file
    order, as `expert_store.read_plan` gives them). Whole BLOCK-aligned blocks are read with O_DIRECT in CHUNK
    pieces into per-thread bounce buffers (page-aligned anonymous memory, allocated once per thread) and copied
    out; the part of the range past the file's last whole block is read through `fd` (the page cache), and `read`
    returns whether there was such a part (the caller drops its pages). `pread(fd,
    view, offset)` is the positional read used for every piece (expert_store.preadv_all, so the reader's retry and
    fault injection apply); an OSError of any part is raised after all parts stopped. Parts run on a pool of
    helper threads shared by all callers (never waiting on each other, so callers from several threads cannot
    deadlock); the caller reads the first part itself.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import threading
from concurrent.futures import ThreadPoolExecutor

#: alignment of O_DIRECT offsets, lengths and buffers (the largest logical block size in common use)
BLOCK = 4096
#: bytes per O_DIRECT read (one bounce buffer)
CHUNK = 1 << 20
#: parts a range is read in at once (see the module docstring for the measurement)
STREAMS = 4


class DirectIO:
    def __init__(self, streams: int = STREAMS):
        self.streams = max(1, streams)
        self._local = threading.local()
        self._helpers: ThreadPoolExecutor | None = None
        self._lock = threading.Lock()

    @staticmethod
    def open(path) -> int | None:
        flag = getattr(os, "O_DIRECT", 0)
        if not flag:
            return None
        try:
            return os.open(path, os.O_RDONLY | flag)
        except OSError:  # EINVAL: this file system does not do O_DIRECT
            return None

    def _bounce(self) -> tuple[mmap.mmap, memoryview, int]:
        b = getattr(self._local, "bounce", None)
        if b is None:
            buf = mmap.mmap(-1, CHUNK)  # page-aligned
            b = self._local.bounce = (buf, memoryview(buf), ctypes.addressof(ctypes.c_char.from_buffer(buf)))
        return b

    def _pool(self) -> ThreadPoolExecutor:
        if self._helpers is None:
            with self._lock:
                if self._helpers is None:
                    self._helpers = ThreadPoolExecutor(max_workers=2 * (self.streams - 1) or 1,
                                                       thread_name_prefix="moelite-dio")
        return self._helpers

    def read(self, fd_direct: int, fd: int, offset: int, nbytes: int, segs, raw: memoryview, file_size: int,
             pread) -> bool:
        end = offset + nbytes
        base = ctypes.addressof(ctypes.c_char.from_buffer(raw))
        runs, r = [], offset  # (file start, file end, slot position) of each seg
        for dp, n in segs:
            runs.append((r, r + n, dp))
            r += n
        a0 = offset - offset % BLOCK
        a1 = min(-(-end // BLOCK) * BLOCK, file_size - file_size % BLOCK)  # whole blocks only
        tail = max(a1, offset)
        cached = tail < end  # a part past the file's last whole block: read through the page cache
        if cached:
            buf = bytearray(end - tail)
            pread(fd, memoryview(buf), tail)
            src = ctypes.addressof(ctypes.c_char.from_buffer(buf))
            self._copy(runs, tail, end, src, base)
        if a1 <= a0:
            return cached
        chunks = -(-(a1 - a0) // CHUNK)
        parts = min(self.streams, chunks)
        per = -(-chunks // parts) * CHUNK
        bounds = [(a0 + k * per, min(a0 + (k + 1) * per, a1)) for k in range(parts)]
        bounds = [b for b in bounds if b[0] < b[1]]
        futures = [self._pool().submit(self._part, fd_direct, lo, hi, runs, base, pread) for lo, hi in bounds[1:]]
        error = None
        try:
            self._part(fd_direct, *bounds[0], runs, base, pread)
        except OSError as exc:
            error = exc
        for f in futures:  # every part has stopped before the caller may reuse or give back the buffer
            try:
                f.result()
            except OSError as exc:
                error = error or exc
        if error is not None:
            raise error
        return cached

    def _part(self, fd_direct: int, lo: int, hi: int, runs, base: int, pread) -> None:
        _, view, addr = self._bounce()
        for a in range(lo, hi, CHUNK):
            m = min(CHUNK, hi - a)
            pread(fd_direct, view[:m], a)
            self._copy(runs, a, a + m, addr, base, a)

    @staticmethod
    def _copy(runs, lo: int, hi: int, src: int, base: int, src_at: int | None = None) -> None:
        """Copy file bytes [lo, hi) (held at address `src`, which holds file position `src_at`, default lo) to
        their slot positions."""
        src_at = lo if src_at is None else src_at
        for f0, f1, dp in runs:
            s, e = max(f0, lo), min(f1, hi)
            if s < e:
                ctypes.memmove(base + dp + (s - f0), src + (s - src_at), e - s)

    def close(self) -> None:
        if self._helpers is not None:
            self._helpers.shutdown(wait=False)
