"""Where routed experts live on disk, and the fixed pool of slots they are read into.

Contract:
  - `ExpertLayout.build(checkpoint, adapter, config)` finds every routed expert's gate/up/down tensors (per-expert
    keys, or rows of fused 3D tensors) and checks their shapes agree, and that their float dtype (a quantized
    layout's scales') is the one config.json declares.
  - `SlotPool` is one preallocated byte buffer of `n_slots` expert slots on the compute device. A slot holds
    [gate (I*H) | up (I*H) | down (H*I)] in the slot dtype; `gate_up(s)` is a [2I, H] view, `down(s)` a [H, I] view.
    Nothing is allocated per fetch.
  - `ExpertReader.read_into(key, slot)` fills a slot with positional reads (os.preadv; an expert's parts that lie
    next to each other in a shard are one contiguous range, `read_plan`, read in chunks of READ_CHUNK) from the
    shard files,
    straight into the slot when dtypes agree, otherwise through a preallocated staging buffer; on CUDA through
    pinned staging memory and a separate copy stream. A thread's staging buffer is never overwritten while an
    asynchronous copy out of it may still be running: `staging()` waits for that copy first. With
    `drop_page_cache` the file pages just read are dropped (posix_fadvise DONTNEED) so the OS page cache is not a
    hidden second expert cache, and the kernel reads no further than asked: the shard files are opened for random
    access (no readahead of its own, which had fetched about twice the expert bytes from disk) and each range is
    announced with WILLNEED before its chunks are read, so the device reads it in one go. No file is mmapped. A read
    that fails is tried once more, then raises `ExpertReadError` naming the expert, its tensors, file and offset.
  - An expert's checksum is xxh3_64 (`CHECKSUM`) of its bytes in file order (its `read_plan`: shard, offset).
    With `checksums` set ({key: checksum}, recorded at first load by moelite.core.integrity), every read is checked
    before it returns, so before the slot it filled is committed to the cache: each chunk is hashed as it lands,
    in place (no copy; still in the CPU's cache). A mismatch is read once more (a transient fault); if it persists
    the read raises `ExpertIntegrityError` (an `ExpertReadError`, so the callers give the slot back as for any
    failed read) naming expert, tensors, shard files and offset, and what to do. `checksum(key, dest)` reads and
    returns the checksum without checking it (the manifest's own hashing).
  - The reader adds its totals (bytes read, reads, read errors, seconds reading) to `counters`, the engine's one
    `Counters` object (moelite.core.counters), under its lock: reads run on several I/O threads.
"""

from __future__ import annotations

import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import xxhash

from moelite.core.checkpoint import HEADER_NAMES, Checkpoint, CheckpointError, TensorInfo
from moelite.core.counters import Counters
from moelite.core.direct_io import DirectIO
from moelite.core.quant import QuantSpec, QWeight

Key = tuple[int, int]  # (layer index, expert index)


@dataclass(frozen=True)
class ExpertTensors:
    gate: TensorInfo  # [I, H] (quantized: packed int32 [I, H * bits / 32])
    up: TensorInfo  # [I, H]
    down: TensorInfo  # [H, I]
    scales: tuple[TensorInfo, ...] = ()  # quantized: gate, up, down scales [I, H / G], [I, H / G], [H, I / G]

    @property
    def parts(self) -> tuple[TensorInfo, ...]:
        """In slot order: gate, up, down (and their scales when quantized)."""
        return (self.gate, self.up, self.down, *self.scales)


@dataclass
class ExpertLayout:
    experts: dict[Key, ExpertTensors]
    layers: list[int]  # MoE layer indices, ascending
    num_experts: int
    hidden: int
    intermediate: int
    disk_dtype: torch.dtype  # quantized: uint8 (a slot is the expert's bytes)
    quant: QuantSpec | None = None

    @property
    def numel(self) -> int:
        """Elements of one expert's slot (quantized: bytes of packed weights and scales)."""
        if self.quant is None:
            return 3 * self.hidden * self.intermediate
        return sum(p.nbytes for p in next(iter(self.experts.values())).parts)

    @property
    def float_dtype(self) -> torch.dtype:
        """The checkpoint's float dtype: the experts' own, or for packed experts their scales' (the model's)."""
        return next(iter(self.experts.values())).scales[0].dtype if self.quant is not None else self.disk_dtype

    @property
    def disk_bytes(self) -> int:
        return self.numel * self.disk_dtype.itemsize

    @property
    def total_disk_bytes(self) -> int:
        return self.disk_bytes * len(self.experts)

    def expert_tensor_names(self) -> set[str]:
        names = {p.name.split("[")[0] for t in self.experts.values() for p in t.parts}
        if self.quant is not None:  # the packed weights' shape records belong to the experts too
            names |= {n.replace(".weight_packed", ".weight_shape") for n in names if n.endswith(".weight_packed")}
        return names

    @classmethod
    def build(cls, ckpt: Checkpoint, adapter, n_experts: int, quant: QuantSpec | None = None) -> "ExpertLayout":
        found: dict[Key, dict[str, TensorInfo]] = {}
        for name, info in ckpt.tensors.items():
            base, _, suffix = name.rpartition(".")
            if suffix in ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point", "weight_g_idx"):
                m = adapter.expert_key.match(base + ".weight")  # a quantized expert weight (core/quant.py)
                if m:
                    if suffix in ("weight_zero_point", "weight_g_idx"):
                        raise CheckpointError(f"{name}: asymmetric or act-ordered quantization; moelite reads "
                                              "symmetric pack-quantized weights (write them with `moelite quantize`)")
                    part = adapter.proj_names[m.group(3)] + ("" if suffix == "weight_packed" else "_" + suffix)
                    found.setdefault((int(m.group(1)), int(m.group(2))), {})[part] = info
                continue
            m = adapter.expert_key.match(name)
            if m:
                layer, expert, proj = int(m.group(1)), int(m.group(2)), adapter.proj_names[m.group(3)]
                found.setdefault((layer, expert), {})[proj] = info
                continue
            m = adapter.fused_key.match(name)
            if m:  # fused [E, 2I, H] gate_up / [E, H, I] down: expert e is a contiguous run of rows
                layer, kind = int(m.group(1)), m.group(2)
                for e in range(info.shape[0]):
                    sl = info.slice_rows(e, 1)
                    if kind == "down_proj":
                        found.setdefault((layer, e), {})["down"] = TensorInfo(sl.name, sl.file, sl.offset, sl.nbytes,
                                                                              sl.dtype, info.shape[1:])
                    else:
                        inter = info.shape[1] // 2
                        half = sl.nbytes // 2
                        found.setdefault((layer, e), {})["gate"] = TensorInfo(
                            sl.name + ".gate", sl.file, sl.offset, half, sl.dtype, (inter, info.shape[2]))
                        found.setdefault((layer, e), {})["up"] = TensorInfo(
                            sl.name + ".up", sl.file, sl.offset + half, half, sl.dtype, (inter, info.shape[2]))
        if not found:
            raise CheckpointError(f"no routed-expert tensors found in {ckpt.folder.name!r} for model_type "
                                  f"{ckpt.model_type!r} (expected keys like 'model.layers.0.mlp.experts.0.gate_proj.weight')")
        packed = any("gate_weight_scale" in parts for parts in found.values())
        if packed and quant is None:
            raise CheckpointError("the routed experts are stored packed (weight_packed / weight_scale), but config.json "
                                  "has no quantization_config")
        experts: dict[Key, ExpertTensors] = {}
        for key, parts in sorted(found.items()):
            want = ("gate", "up", "down") + (("gate_weight_scale", "up_weight_scale", "down_weight_scale") if packed
                                             else ())
            missing = [p for p in want if p not in parts]
            if missing:
                raise CheckpointError(f"expert {key[1]} of layer {key[0]}: missing {', '.join(missing)} tensors in "
                                      "the checkpoint")
            scales = tuple(parts[p] for p in want[3:])
            experts[key] = ExpertTensors(parts["gate"], parts["up"], parts["down"], scales)
        layers = sorted({k[0] for k in experts})
        for layer in layers:
            have = sorted(e for (l_, e) in experts if l_ == layer)
            if have != list(range(n_experts)):
                raise CheckpointError(f"layer {layer}: checkpoint holds experts {have[:3]}..{have[-3:]} "
                                      f"({len(have)}), config.json says {n_experts}")
        first = next(iter(experts.values()))
        _check_declared(ckpt, first.scales[0] if packed else first.gate)
        if packed:
            return cls._build_quantized(experts, layers, n_experts, quant)
        inter, hidden = first.gate.shape
        dtype = first.gate.dtype
        for key, t in experts.items():
            if t.gate.shape != (inter, hidden) or t.up.shape != (inter, hidden) or t.down.shape != (hidden, inter):
                raise CheckpointError(f"expert {key[1]} of layer {key[0]}: shapes gate{list(t.gate.shape)} "
                                      f"up{list(t.up.shape)} down{list(t.down.shape)} differ from expert 0 of "
                                      f"layer {layers[0]}; moelite needs equal expert shapes")
            if any(p.dtype != dtype for p in t.parts):
                raise CheckpointError(f"expert {key[1]} of layer {key[0]}: mixed dtypes; expected {dtype}")
        return cls(experts, layers, n_experts, hidden, inter, dtype)

    @classmethod
    def _build_quantized(cls, experts: dict[Key, ExpertTensors], layers: list[int], n_experts: int,
                         q: QuantSpec) -> "ExpertLayout":
        """Packed experts: every expert's packed weights int32 [I, H*b/32], [I, H*b/32], [H, I*b/32] and scales of
        one dtype with the shapes the spec implies; a slot holds their bytes (uint8)."""
        first = next(iter(experts.values()))
        inter, hidden = first.gate.shape[0], first.down.shape[0]
        gh, gi = q.group_for(hidden), q.group_for(inter)
        per = 32 // q.bits
        want = ((inter, hidden // per), (inter, hidden // per), (hidden, inter // per),
                (inter, hidden // gh), (inter, hidden // gh), (hidden, inter // gi))
        sdt = first.scales[0].dtype
        for key, t in experts.items():
            shapes = tuple(p.shape for p in t.parts)
            if hidden % gh or inter % gi or shapes != want:
                raise CheckpointError(f"expert {key[1]} of layer {key[0]}: packed/scale shapes {[list(s) for s in shapes]}"
                                      f" differ from what int{q.bits} with group size {q.group or 'per-channel'} "
                                      f"implies for hidden {hidden}, intermediate {inter}: {[list(s) for s in want]}")
            if any(p.dtype != torch.int32 for p in t.parts[:3]) or any(p.dtype != sdt for p in t.scales) \
                    or not sdt.is_floating_point:
                raise CheckpointError(f"expert {key[1]} of layer {key[0]}: packed weights must be int32 and scales "
                                      f"one float dtype; found {[str(p.dtype) for p in t.parts]}")
        return cls(experts, layers, n_experts, hidden, inter, torch.uint8, q)

    def qweights(self, flat: torch.Tensor) -> tuple:
        """Quantized slots' bytes (uint8 [S, numel] or one slot [numel]) -> (gate_up, down) `QWeight` views."""
        q, h, i = self.quant, self.hidden, self.intermediate
        t = next(iter(self.experts.values()))
        lead = flat.shape[:-1]
        sizes = [p.nbytes for p in t.parts]
        sdt = t.scales[0].dtype
        pos = [sum(sizes[:k]) for k in range(7)]

        def part(a: int, b: int, shape, dtype=torch.uint8) -> torch.Tensor:
            return flat[..., pos[a]:pos[b]].view(dtype).view(*lead, *shape)

        gh, gi = q.group_for(h), q.group_for(i)
        gate_up = QWeight(part(0, 2, (2 * i, h * q.bits // 8)), part(3, 5, (2 * i, h // gh), sdt), q.bits, gh)
        down = QWeight(part(2, 3, (h, i * q.bits // 8)), part(5, 6, (h, i // gi), sdt), q.bits, gi)
        return gate_up, down


def _check_declared(ckpt: Checkpoint, info: TensorInfo) -> None:
    """The routed experts' float dtype (`info`: expert 0's, the others must equal it) must be the one config.json
    declares: a relabelled header (BF16 -> F16 keeps the byte count) would be read as another number format."""
    declared = ckpt.declared_dtype
    if declared is not None and info.dtype != declared:
        name = str(declared).removeprefix("torch.")
        raise CheckpointError(
            f"{ckpt.display(info.file)}: routed expert tensor {info.name!r} is {HEADER_NAMES[info.dtype]} in the "
            f"safetensors header, but config.json declares dtype {name!r}; a relabelled header would make moelite "
            "read the expert bytes as the wrong number format: re-download or re-save the checkpoint (if the "
            "experts really are stored as " + HEADER_NAMES[info.dtype] + ", set \"dtype\" in config.json to match)")


class SlotPool:
    """`n_slots` expert slots in one preallocated buffer on `device`."""

    def __init__(self, layout: ExpertLayout, n_slots: int, dtype: torch.dtype, device: torch.device):
        self.layout, self.n_slots, self.dtype, self.device = layout, n_slots, dtype, device
        self.slot_numel = layout.numel
        self.slot_bytes = self.slot_numel * dtype.itemsize
        self.buffer = torch.empty((n_slots, self.slot_numel), dtype=dtype, device=device)
        self.quantized = layout.quant is not None
        self._gate_up, self._down = self.views(self.buffer)

    def views(self, flat: torch.Tensor):
        """(gate_up, down) views of slot bytes `flat` ([S, numel] or one slot [numel]): tensors [.., 2I, H] and
        [.., H, I], or `quant.QWeight`s for a quantized layout."""
        if self.quantized:
            return self.layout.qweights(flat)
        h, i = self.layout.hidden, self.layout.intermediate
        lead = flat.shape[:-1]
        return flat[..., : 2 * i * h].view(*lead, 2 * i, h), flat[..., 2 * i * h:].view(*lead, h, i)

    @property
    def gate_up_all(self):
        return self._gate_up  # [n_slots, 2I, H] (strided view of the buffer; a QWeight when quantized)

    @property
    def down_all(self):
        return self._down  # [n_slots, H, I]

    def gate_up(self, slot: int) -> torch.Tensor:
        return self._gate_up[slot]

    def down(self, slot: int) -> torch.Tensor:
        return self._down[slot]

    def flat(self, slot: int) -> torch.Tensor:
        return self.buffer[slot]


class ExpertReadError(OSError):
    """An expert's bytes could not be read (after one retry); the message names expert, tensors, file and offset."""


class ExpertIntegrityError(ExpertReadError):
    """An expert's bytes differ from the checksum recorded for them (read twice); the message names expert, tensors,
    shard files and offset (never an absolute path) and what to do. `keys` lists the (layer, expert) at fault."""

    def __init__(self, message: str, keys=()):
        super().__init__(message)
        self.keys = list(keys)


#: the checksum of an expert's bytes (the manifests record it by this name): xxh3_64, on the 2-core EPYC of the
#: benchmarks 83 GB/s over a 9.4 MB expert in cache (0.11 ms), 34 GB/s from memory, against 6-7 GB/s for
#: zlib.crc32 and 1.4 GB/s for blake2b; it releases the GIL, so I/O threads hash while the compute thread runs
CHECKSUM = "xxh3_64"
#: bytes per positional read. A 9.4 MB expert read in 256 KiB chunks with 4 I/O threads ran at 2.1 GB/s against
#: 1.4 GB/s as one read (cold pages, this virtio disk): the kernel's copy of one chunk overlaps the device's
#: transfer of the next; and each chunk is hashed while it is in the CPU's cache
READ_CHUNK = 256 << 10


def preadv_all(fd: int, views: memoryview | list[memoryview], offset: int) -> None:
    """Fill `views` (one buffer, or several filled in order) from the contiguous file range starting at `offset`."""
    views = [views] if isinstance(views, memoryview) else views
    got = os.preadv(fd, views, offset)
    for view in views:  # a short read (rare: signals, network file systems): finish buffer by buffer
        n = len(view)
        if got >= n:
            got -= n
            offset += n
            continue
        done, got = got, 0
        while done < n:
            k = os.preadv(fd, [view[done:]], offset + done)
            if k <= 0:
                raise OSError(f"short read at offset {offset + done}")
            done += k
        offset += n


def _pread_retried(fd: int, view: memoryview, offset: int) -> None:
    """`preadv_all`, once more after an OSError (a transient EIO, EINTR on a network file system)."""
    try:
        preadv_all(fd, view, offset)
    except OSError:
        preadv_all(fd, view, offset)


def read_plan(parts) -> list[tuple]:
    """Coalesce an expert's parts [(file, offset, nbytes), ...] (in slot order) into one read per contiguous file
    range: [(file, offset, nbytes, ((slot byte position, nbytes), ...)), ...]. Checkpoints store an expert's
    down/gate/up projections next to each other, so an expert is usually one contiguous range and one fadvise
    instead of three of each."""
    segs, pos = [], 0
    for f, off, nb in parts:
        segs.append((f, off, nb, pos))
        pos += nb
    segs.sort(key=lambda t: (str(t[0]), t[1]))
    runs: list[list] = []
    for f, off, nb, dp in segs:
        if runs and runs[-1][0] == f and runs[-1][1] + runs[-1][2] == off:
            runs[-1][2] += nb
            runs[-1][3].append((dp, nb))
        else:
            runs.append([f, off, nb, [(dp, nb)]])
    return [(f, off, nb, tuple(d)) for f, off, nb, d in runs]


def mismatch_message(layout: ExpertLayout, key: Key, model: str | None = None) -> str:
    """What an `ExpertIntegrityError` says about expert `key`: its tensors, shard file names and offsets (never a
    path), and what to do; `model` is the model folder's name."""
    plan = read_plan([(p.file, p.offset, p.nbytes) for p in layout.experts[key].parts])
    names = ", ".join(p.name for p in layout.experts[key].parts)
    where = "; ".join(f"{nb} bytes in {f.name!r} at offset {off}" for f, off, nb, _ in plan)
    folder = f"the model folder {model!r}" if model else "the model folder"
    return (f"expert {key[1]} of layer {key[0]}: its bytes ({names}: {where}) do not match the checksum recorded "
            "when this checkpoint was first loaded (read twice): the file is damaged or was changed. Run `moelite "
            f"verify` on {folder} to list every damaged expert, then restore the file (re-download it); if you "
            "changed the checkpoint on purpose, `moelite verify DIR --rehash` records its new checksums")


class ExpertReader:
    """Positional reads of expert bytes into slots (or into a caller's staging buffer)."""

    def __init__(self, layout: ExpertLayout, pool: SlotPool, drop_page_cache: bool = True,
                 counters: Counters | None = None, direct_io: bool = True):
        self.layout, self.pool = layout, pool
        self.counters = counters if counters is not None else Counters()
        self.drop_page_cache = drop_page_cache and hasattr(os, "posix_fadvise")
        self._fds: dict[Path, int] = {}
        # O_DIRECT reads (moelite.core.direct_io): only where pages are dropped anyway; per file, None where the
        # file system refuses O_DIRECT (those files are read through the page cache)
        self.dio = DirectIO() if direct_io and drop_page_cache and hasattr(os, "O_DIRECT") else None
        self._dio_fds: dict[Path, tuple[int, int] | None] = {}
        self._lock = threading.Lock()
        disk, dev = layout.disk_dtype, pool.device
        self.direct = pool.dtype == disk and dev.type == "cpu"
        # staging buffers, one per reading thread, allocated once; and the event of the last asynchronous copy out
        # of each (CUDA), which must complete before the buffer is written again
        self._staging: dict[int, torch.Tensor] = {}
        self._staging_copy: dict[int, torch.cuda.Event] = {}
        self._plans: dict[Key, list[tuple]] = {}  # coalesced reads per expert (read_plan), built on first use
        self.copy_stream = torch.cuda.Stream(dev) if dev.type == "cuda" else None
        #: experts whose last read failed -> the failure's message; an expert leaves it once it reads (/health)
        self.failing: dict[Key, str] = {}
        #: (layer, expert) -> the checksum of its bytes, from the checkpoint's manifest (moelite.core.integrity); every
        #: read is checked against it. None: reads are not checked (verify_checksums=False)
        self.checksums: dict[Key, int] | None = None
        self.model_name: str | None = None  # the model folder's name, for what an integrity error says to do

    @property
    def bytes_read(self) -> int:
        return self.counters.bytes_read

    @property
    def io_seconds(self) -> float:
        return self.counters.io_seconds

    def _fd(self, path: Path) -> int:
        fd = self._fds.get(path)
        if fd is None:
            with self._lock:
                fd = self._fds.get(path)
                if fd is None:
                    fd = os.open(path, os.O_RDONLY)
                    if self.drop_page_cache:  # no readahead past what is asked: read_into asks for exact ranges
                        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
                    self._fds[path] = fd
        return fd

    def staging(self) -> torch.Tensor:
        """This thread's staging buffer (disk dtype; pinned on CUDA), free to be written: the asynchronous copy
        that last read it (`read_into` on CUDA) has completed."""
        tid = threading.get_ident()
        pending = self._staging_copy.pop(tid, None)
        if pending is not None:
            pending.synchronize()
        buf = self._staging.get(tid)
        if buf is None:
            pin = self.pool.device.type == "cuda"
            buf = torch.empty(self.layout.numel, dtype=self.layout.disk_dtype, pin_memory=pin)
            self._staging[tid] = buf
        return buf

    def _plan(self, key: Key) -> list[tuple]:
        plan = self._plans.get(key)
        if plan is None:
            plan = self._plans[key] = read_plan([(p.file, p.offset, p.nbytes) for p in self.layout.experts[key].parts])
        return plan

    def read_bytes(self, key: Key, dest: torch.Tensor, count: bool = True) -> None:
        """Read expert `key` into the 1-D CPU tensor `dest` (disk dtype, numel = layout.numel), checked against its
        checksum when the reader has them (see the module contract); count=False keeps the read out of the
        counters (filling the host tier at load is not serving I/O)."""
        t0 = time.perf_counter()
        raw = memoryview(dest.view(torch.uint8).numpy())
        plan = self._plan(key)
        want = self.checksums.get(key) if self.checksums is not None else None
        h = xxhash.xxh3_64() if want is not None else None
        nbytes, hashing = self._read(key, plan, raw, h)
        if h is not None and h.intdigest() != want:
            h = xxhash.xxh3_64()  # once more: a transient fault (a bad transfer, a racing writer)
            n, t = self._read(key, plan, raw, h)
            nbytes, hashing = nbytes + n, hashing + t
            if h.intdigest() != want:
                self._integrity_failure(key)
        dt = time.perf_counter() - t0
        with self._lock:
            if count:
                c = self.counters
                c.bytes_read += nbytes
                c.io_seconds += dt - hashing
                c.checksum_seconds += hashing
                c.reads += 1
            self.failing.pop(key, None)

    def checksum(self, key: Key, dest: torch.Tensor) -> int:
        """Read expert `key` into `dest` as `read_bytes` does (not counted, not checked) and return its checksum."""
        h = xxhash.xxh3_64()
        self._read(key, self._plan(key), memoryview(dest.view(torch.uint8).numpy()), h)
        return h.intdigest()

    def read_path(self) -> str:
        """How expert bytes reach the slots: "o_direct", "page cache, dropped" (drop_page_cache without O_DIRECT,
        or a file system that refuses it) or "page cache" (kept: a second cache the budget does not count). Whether a
        file system refuses O_DIRECT is known from its first read on: before any read this says what is asked for."""
        if self.dio is not None and all(d is not None for d in self._dio_fds.values()):
            return "o_direct"
        return "page cache, dropped" if self.drop_page_cache else "page cache"

    def _dio_fd(self, path: Path) -> tuple[int, int] | None:
        """(O_DIRECT descriptor, file size) of `path`, or None where O_DIRECT is off or refused."""
        if self.dio is None:
            return None
        if path not in self._dio_fds:
            with self._lock:
                if path not in self._dio_fds:
                    fd = self.dio.open(path)
                    self._dio_fds[path] = None if fd is None else (fd, os.fstat(fd).st_size)
        return self._dio_fds[path]

    def _read(self, key: Key, plan: list[tuple], raw: memoryview, h=None) -> tuple[int, float]:
        """One pass of positional reads of `plan` into `raw`: with O_DIRECT (`direct_io`), each range split over
        a few threads and hashed once it is complete; otherwise READ_CHUNK bytes at a time, each fed to the hash
        `h` (if any) as it lands. Every positional read is retried once on an OSError. Returns (bytes read,
        seconds hashing)."""
        pos, hashing = 0, 0.0
        for path, offset, nbytes, segs in plan:
            fd = self._fd(path)
            direct = self._dio_fd(path)
            if direct is not None:
                try:
                    tail_cached = self.dio.read(direct[0], fd, offset, nbytes, segs, raw, direct[1], _pread_retried)
                except OSError as exc:
                    raise self._read_error(key, path, offset, nbytes, exc) from exc
                if h is not None:
                    t = time.perf_counter()
                    for dp, n in segs:  # file order
                        h.update(raw[dp:dp + n])
                    hashing += time.perf_counter() - t
                if tail_cached:  # its part past the file's last whole block went through the page cache
                    os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
                pos += nbytes
                continue
            if self.drop_page_cache:  # the whole range read ahead at once, and nothing past it (see _fd)
                os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_WILLNEED)
            at = offset
            for dp, n in segs:  # in file order
                for start in range(dp, dp + n, READ_CHUNK):
                    view = raw[start: min(start + READ_CHUNK, dp + n)]
                    try:
                        _pread_retried(fd, view, at)
                    except OSError as exc:
                        raise self._read_error(key, path, offset, nbytes, exc) from exc
                    if h is not None:
                        t = time.perf_counter()
                        h.update(view)
                        hashing += time.perf_counter() - t
                    at += len(view)
            if self.drop_page_cache:
                os.posix_fadvise(fd, offset, nbytes, os.POSIX_FADV_DONTNEED)
            pos += nbytes
        return pos, hashing

    def _read_error(self, key: Key, path: Path, offset: int, nbytes: int, exc: OSError) -> ExpertReadError:
        """Record and return the error of a read of expert `key` that failed twice."""
        names = ", ".join(p.name for p in self.layout.experts[key].parts)
        err = ExpertReadError(
            f"expert {key[1]} of layer {key[0]}: reading {nbytes} bytes of {names} from {path.name!r} at offset "
            f"{offset} failed twice ({exc}); the file is truncated, damaged or unreadable: restore it (the engine "
            "recovers once it reads correctly)")
        with self._lock:
            self.failing[key] = str(err)
            self.counters.read_errors += 1
        return err

    def _integrity_failure(self, key: Key) -> None:
        err = ExpertIntegrityError(mismatch_message(self.layout, key, self.model_name), [key])
        with self._lock:
            self.failing[key] = str(err)
            self.counters.read_errors += 1
            self.counters.integrity_errors += 1
        raise err

    @property
    def last_error(self) -> str | None:
        """The latest failure among experts that have not read correctly since; None when all read."""
        with self._lock:
            return next(reversed(self.failing.values()), None)

    def read_into(self, key: Key, slot: int) -> torch.cuda.Event | None:
        """Fill `slot` with expert `key`. On CUDA returns an event the compute stream must wait on."""
        if self.direct:
            self.read_bytes(key, self.pool.flat(slot))
            return None
        stage = self.staging()  # waits for the copy that last read this thread's buffer
        self.read_bytes(key, stage)
        if self.copy_stream is None:
            self.pool.flat(slot).copy_(stage)  # dtype conversion into the slot, no allocation
            return None
        with torch.cuda.stream(self.copy_stream):
            self.pool.flat(slot).copy_(stage, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        self._staging_copy[threading.get_ident()] = event  # the buffer is busy until this copy completes
        return event

    def read_tensor(self, info: TensorInfo) -> torch.Tensor:
        """Read one whole tensor (non-expert weights) with a positional read into a new CPU tensor."""
        out = torch.empty(info.shape, dtype=info.dtype)
        fd = self._fd(info.file)
        preadv_all(fd, memoryview(out.view(-1).view(torch.uint8).numpy()), info.offset)
        return out

    def drop_file_pages(self) -> None:
        """Drop every shard's pages from the OS page cache (after the dense weights were read at load)."""
        if not self.drop_page_cache:
            return
        for path in {p.file for t in self.layout.experts.values() for p in t.parts}:
            os.posix_fadvise(self._fd(path), 0, 0, os.POSIX_FADV_DONTNEED)

    def close(self) -> None:
        with self._lock:
            for fd in [*self._fds.values(), *(d[0] for d in self._dio_fds.values() if d is not None)]:
                try:
                    os.close(fd)
                except OSError:
                    pass
            self._fds.clear()
            self._dio_fds.clear()

    def __del__(self):
        self.close()
