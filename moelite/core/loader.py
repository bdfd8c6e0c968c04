"""Background expert loading.

Contract: `Loader.submit(key, slot)` queues a read of expert `key` into `slot` on a small pool of I/O threads and
returns a `Future` whose result is (CUDA event to wait on or None on CPU, seconds the read itself took on its thread). At most `max_pending` reads are queued;
`Future.cancel()` drops a read that has not started (mispredicted prefetches). Positional reads release the GIL,
so I/O overlaps with compute on the main thread. All cache bookkeeping stays on the main thread.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor

from moelite.core.expert_store import ExpertReader


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
