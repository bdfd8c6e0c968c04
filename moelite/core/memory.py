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


def _cgroup_dirs(proc_cgroup: str, root: Path) -> list[tuple[Path, str, str]]:
    """(folder, limit file, usage file) of this process's memory cgroup and each of its ancestors, innermost first,
    from /proc/self/cgroup's text: cgroup v1's memory controller, and cgroup v2's unified hierarchy."""
    out = []
    for line in proc_cgroup.splitlines():
        hid, _, rest = line.partition(":")
        controllers, _, rel = rest.partition(":")
        if "memory" in controllers.split(","):
            base, files = root / "memory", ("memory.limit_in_bytes", "memory.usage_in_bytes")
        elif hid == "0" and controllers == "":
            base = root / "unified" if (root / "unified" / "cgroup.controllers").exists() else root
            files = ("memory.max", "memory.current")
        else:
            continue
        parts = [q for q in rel.strip().split("/") if q]
        for k in range(len(parts), -1, -1):
            out.append((base.joinpath(*parts[:k]), *files))
    return out


def _cgroup_room(proc_cgroup: str | None = None, root: Path = Path("/sys/fs/cgroup")) -> int | None:
    """Limit minus usage of this process's memory cgroup, or None when no limit applies: the tightest over the
    process's own cgroup and its ancestors (a limit anywhere above applies too)."""
    if proc_cgroup is None:
        try:
            proc_cgroup = Path("/proc/self/cgroup").read_text()
        except OSError:
            proc_cgroup = ""
    room = None
    for folder, limit_f, usage_f in _cgroup_dirs(proc_cgroup, root):
        try:
            limit = (folder / limit_f).read_text().strip()
            if limit == "max" or int(limit) >= (1 << 60):
                continue
            r = max(0, int(limit) - int((folder / usage_f).read_text().strip()))
        except (OSError, ValueError):
            continue
        room = r if room is None else min(room, r)
    return room


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
