"""How much memory this process may use, and the expert budget that fills it (`expert_budget="auto"`).

Contract:
  - `available_memory(device)` -> (bytes, source). CPU: MemAvailable, capped by the memory cgroup's limit minus its
    usage where one applies (cgroup v2 or v1; the cgroup counts page cache too). CUDA: the device's free memory.
  - `auto_budget(...)` -> `AutoBudget`: available - dense weights - KV cache for the context - headroom, clamped to
    [0, every routed expert]. The engine uses it twice: as the budget of expert_budget="auto", and as the largest
    budget it accepts at load (a bigger one is refused before anything is read, with these numbers). Headroom is
    10% of what is available, at least 256 MiB, for activations, the allocator and the rest of the process. `note`
    says how the figure came about, for `moelite info` and the load message ("all experts resident" when the room
    holds every routed expert).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from moelite.config import format_bytes

#: context the KV-cache reservation assumes when the model's own is longer (tokens)
AUTO_CONTEXT = 4096
MIN_HEADROOM = 256 << 20


def _meminfo_available() -> int:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError):
        return 0


def _cgroup_room() -> int | None:
    """Limit minus usage of this process's memory cgroup, or None when no limit applies."""
    for limit_f, usage_f in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                             ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                              "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_f).read_text().strip()
            if limit == "max" or int(limit) >= (1 << 60):
                continue
            return max(0, int(limit) - int(Path(usage_f).read_text().strip()))
        except (OSError, ValueError):
            continue
    return None


def available_memory(device: torch.device | str = "cpu") -> tuple[int, str]:
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free), f"free memory of {torch.cuda.get_device_name(device)}"
    avail = _meminfo_available()
    room = _cgroup_room()
    if room is not None and room < avail:
        return room, "memory cgroup limit minus its usage"
    return avail, "MemAvailable"


def kv_cache_bytes(hf_config, dtype: torch.dtype, context: int) -> int:
    """Bytes of one sequence's KV cache over `context` tokens (keys and values of every layer)."""
    layers = int(getattr(hf_config, "num_hidden_layers", 0))
    heads = int(getattr(hf_config, "num_attention_heads", 1))
    kv_heads = int(getattr(hf_config, "num_key_value_heads", None) or heads)
    head_dim = int(getattr(hf_config, "head_dim", None) or getattr(hf_config, "hidden_size", 0) // max(heads, 1))
    if getattr(hf_config, "kv_lora_rank", None):  # DeepSeek MLA: transformers caches full keys and values
        head_dim = int(getattr(hf_config, "qk_nope_head_dim", 0)) + int(getattr(hf_config, "qk_rope_head_dim", 0))
        kv_heads = heads
    return 2 * layers * kv_heads * head_dim * context * dtype.itemsize


@dataclass
class AutoBudget:
    bytes: int
    available: int
    source: str
    dense: int
    kv_cache: int
    context: int
    headroom: int
    #: bytes of every routed expert (the budget never exceeds it)
    experts: int = 0

    @property
    def all_resident(self) -> bool:
        """Whether the room left holds every routed expert (the budget is then all of them, not the room)."""
        return self.experts > 0 and self.bytes >= self.experts

    @property
    def note(self) -> str:
        what = f"all experts resident ({format_bytes(self.experts)})" if self.all_resident \
            else format_bytes(self.bytes)
        return (f"expert_budget 'auto' = {what}: {format_bytes(self.available)} available "
                f"({self.source}) - {format_bytes(self.dense)} dense weights - {format_bytes(self.kv_cache)} KV cache "
                f"({self.context} tokens) - {format_bytes(self.headroom)} headroom")


def auto_budget(device, dense_bytes: int, hf_config, kv_dtype: torch.dtype, total_expert_bytes: int) -> AutoBudget:
    avail, source = available_memory(device)
    context = min(int(getattr(hf_config, "max_position_embeddings", AUTO_CONTEXT)), AUTO_CONTEXT)
    kv = kv_cache_bytes(hf_config, kv_dtype, context)
    headroom = max(MIN_HEADROOM, avail // 10)
    room = avail - dense_bytes - kv - headroom
    return AutoBudget(int(min(max(room, 0), total_expert_bytes)), avail, source, dense_bytes, kv, context, headroom,
                      int(total_expert_bytes))


def resident_note(value, budget_bytes: int, total_expert_bytes: int) -> str | None:
    """The load message for a budget that holds every routed expert (None for a smaller one): a budget beyond all
    the experts is reported as what it buys, all experts resident, not as the bytes asked for."""
    if budget_bytes < total_expert_bytes:
        return None
    return (f"expert_budget {value!r} = {format_bytes(budget_bytes)} covers every routed expert: all experts resident "
            f"({format_bytes(total_expert_bytes)})")
