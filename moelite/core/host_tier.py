"""The host tier on CUDA: routed experts in pinned host RAM, under the VRAM slot cache, above the SSD.

Contract:
  - `HostTier(layout, reader, dtype, budget_bytes)` reads as many routed experts as `budget_bytes` holds (in layer
    order, so that whole layers stay together) from the checkpoint into page-locked host memory, once, at load,
    with a progress bar, in the slot dtype; these reads are not counted (they serve no request). Experts beyond
    the budget stay on SSD and are read on a miss as before.
  - `row(key)` is the pinned [numel] tensor of a resident expert (None when it lives on SSD). A miss copies it
    into a VRAM slot with one asynchronous host-to-device copy (no staging copy); the CPU can also compute on it
    directly (SMoE Algorithm 2).
  - Memory is allocated in chunks of at most 1 GiB, because the CUDA host allocator rounds each request up to a
    power of two; one chunk per request would waste up to half of a large tier.
"""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import torch
from tqdm.auto import tqdm

from moelite.core.expert_store import ExpertLayout, ExpertReader

Key = tuple[int, int]
CHUNK_BYTES = 1 << 30


class HostTier:
    def __init__(self, layout: ExpertLayout, reader: ExpertReader, dtype: torch.dtype, budget_bytes: int,
                 progress: bool = True, threads: int = 8):
        self.layout, self.dtype = layout, dtype
        self.row_bytes = layout.numel * dtype.itemsize
        keys = sorted(layout.experts)
        n = min(len(keys), int(budget_bytes // self.row_bytes))
        per_chunk = max(1, CHUNK_BYTES // self.row_bytes)
        self.chunks: list[torch.Tensor] = []
        left = n
        while left > 0:
            rows = min(per_chunk, left)
            self.chunks.append(torch.empty((rows, layout.numel), dtype=dtype, pin_memory=True))
            left -= rows
        self.per_chunk = per_chunk
        self.row_of: dict[Key, int] = {key: i for i, key in enumerate(keys[:n])}
        self.nbytes = n * self.row_bytes
        t0 = time.perf_counter()

        def load(item):
            key, i = item
            dest = self.row_by_index(i)
            if dtype == layout.disk_dtype:
                reader.read_bytes(key, dest, count=False)
            else:  # convert once here, so that misses never convert
                stage = reader.staging()
                reader.read_bytes(key, stage, count=False)
                dest.copy_(stage)

        with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="moelite-host") as pool:
            for _ in tqdm(pool.map(load, self.row_of.items()), total=n, desc="experts to pinned host RAM",
                          unit="expert", disable=not progress or n == 0, leave=False):
                pass
        self.load_seconds = time.perf_counter() - t0

    def row_by_index(self, i: int) -> torch.Tensor:
        return self.chunks[i // self.per_chunk][i % self.per_chunk]

    def row(self, key: Key) -> torch.Tensor | None:
        i = self.row_of.get(key)
        return None if i is None else self.row_by_index(i)

    def __len__(self) -> int:
        return len(self.row_of)
