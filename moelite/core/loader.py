"""Background expert loading.

Contract: `background_io(device, expert bytes, io_threads)` says whether reads go to a loader at all (small experts on
the CPU are read on the compute thread). `Loader.submit(key, slot)` queues a read of expert `key` into `slot` on a small pool of I/O threads and
returns a `Future` whose result is (CUDA event to wait on or None on CPU, seconds the read itself took on its thread). At most `max_pending` reads are queued;
`Future.cancel()` drops a read that has not started (mispredicted prefetches). Positional reads release the GIL,
so I/O overlaps with compute on the main thread. All cache bookkeeping stays on the main thread.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from moelite.core.expert_store import ExpertReader

#: on the CPU, experts of at most this many bytes are read on the compute thread whatever io_threads says: handing
#: a read to an I/O thread and waking the compute thread when it lands costs more than the read itself (the demo
#: model's 24 KiB experts at a 25% budget decoded at about 170 tok/s with io_threads=0 against 125-165 with 2, cold;
#: 210-263 against 165-183 from the page cache; 2-core EPYC VM, 2026-11-26)
INLINE_READ_BYTES = 256 << 10


def background_io(device_type: str, expert_bytes: int, io_threads: int) -> bool:
    """Whether expert reads go to a `Loader` of `io_threads` threads (else they run on the compute thread)."""
    return io_threads > 0 and not (device_type == "cpu" and expert_bytes <= INLINE_READ_BYTES)


def timed_read(reader: ExpertReader, key, slot: int):
    """(event or None, seconds): the read's own duration, without the time it waited in the queue."""
    t0 = time.perf_counter()
    event = reader.read_into(key, slot)
    return event, time.perf_counter() - t0


class Loader:
    def __init__(self, reader: ExpertReader, io_threads: int = 2, max_pending: int = 256):
        self.reader = reader
        self.pool = ThreadPoolExecutor(max_workers=io_threads, thread_name_prefix="moelite-io")
        self.slots = threading.BoundedSemaphore(max_pending)

    def submit(self, key, slot: int) -> Future:
        if not self.slots.acquire(timeout=60):
            raise RuntimeError("expert loader queue is full")
        fut = self.pool.submit(timed_read, self.reader, key, slot)
        fut.add_done_callback(lambda _f: self.slots.release())
        return fut

    def shutdown(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)
