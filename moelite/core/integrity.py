"""Expert integrity: a checksum of every routed expert, recorded once per checkpoint and checked on every read.

Contract:
  - The checksum of an expert is xxh3_64 (`expert_store.CHECKSUM`) of all of its bytes (gate, up, down, and a
    quantized layout's scales, as stored) in file order (its `read_plan`: shard, offset). The reader hashes each
    chunk it reads as it lands, in place (`ExpertReader.read_bytes`, `checksum`): no copy, no second pass.
  - The manifest: one small JSON file per checkpoint in `manifest_dir()` ($MOELITE_CACHE_DIR/manifests, default
    ~/.cache/moelite/manifests), named by the model folder's name and a hash of its real path and shard names. It
    records the checksum algorithm, the experts' dtype and byte size, each shard's size and mtime_ns when the
    checksums were taken, and one checksum per routed expert ("layer.expert": 16 hex digits).
  - `checksums_for(ckpt, layout, reader)` (engine load, verify_checksums=True) returns the `Manifest` whose
    checksums every later read is checked against:
      no manifest yet      every expert is read once (the reader's positional reads, file pages dropped after each
                           read, with a progress bar) and its checksum recorded: a one-time cost of reading the
                           routed experts (about 5 s for 4.8 GB at 1 GB/s);
      shards unchanged     the manifest is used as it is: nothing is read;
      a shard changed      (size or mtime) its experts are read now and checked against the recorded checksums. All
                           equal (a copy, a touch, an identical re-save): the new size and mtime are recorded. Any
                           differs: `ExpertIntegrityError` listing them and what to do (restore the file, or `moelite
                           verify DIR --rehash` for a deliberate change). Changed bytes are never trusted silently;
      experts' dtype or size differ from the recorded ones (a relabelled header, a re-saved format): refused too.
  - `verify_checkpoint(folder, rehash=False)` -> `VerifyReport` (`moelite verify`): the load-time header checks
    (Checkpoint.open, ExpertLayout.build), then every routed expert read and checked against the manifest (recorded
    now when there is none; with `rehash`, recorded anew, listing the experts whose checksum changed), and scanned
    for NaN / inf (float weights, or a quantized layout's scales).
  - `forget(folder)`: a tool that rewrote a checkpoint on purpose drops its manifest.
  - `NonFiniteOutputError`: a forward pass produced NaN or inf logits for a sequence; the batcher ends that
    sequence's request with it (serve/batching.py) and the engine goes on serving the others.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers import AutoConfig

from moelite.core.arch import adapter_for
from moelite.core.checkpoint import Checkpoint, CheckpointError
from moelite.core.expert_store import (CHECKSUM, ExpertIntegrityError, ExpertLayout, ExpertReader, ExpertReadError,
                                       Key, SlotPool, read_plan)
from moelite.core.quant import QuantSpec

FORMAT = 1
#: experts named in one error message; the rest are counted (`moelite verify` lists them all)
SHOWN = 5


class NonFiniteOutputError(FloatingPointError):
    """The model produced NaN or inf logits for a request; the message says where and what to do."""


def manifest_dir() -> Path:
    """$MOELITE_CACHE_DIR/manifests (default ~/.cache/moelite/manifests), beside the native kernels' cache."""
    return Path(os.environ.get("MOELITE_CACHE_DIR") or Path.home() / ".cache" / "moelite") / "manifests"


def manifest_path(ckpt: Checkpoint) -> Path:
    """The manifest of this checkpoint: keyed by its folder's real path and shard names."""
    real = ckpt.folder.resolve()
    shards = sorted(ckpt.display(f) for f in ckpt.weight_files)
    key = hashlib.sha256("\n".join([str(real), *shards]).encode()).hexdigest()[:16]
    return manifest_dir() / f"{real.name}-{key}.json"


def forget(folder) -> None:
    """Drop the manifest of the checkpoint in `folder`, which a tool has just written on purpose (`moelite
    quantize`, `moelite realshape`): its next load records its checksums anew instead of refusing the new bytes."""
    try:
        manifest_path(Checkpoint.open(folder)).unlink(missing_ok=True)
    except (CheckpointError, OSError):
        pass


def shard_stats(ckpt: Checkpoint) -> dict[str, dict]:
    """Shard name -> {"size", "mtime_ns"} now."""
    out = {}
    for f in ckpt.weight_files:
        st = f.stat()
        out[ckpt.display(f)] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return out


def _dtype_name(layout: ExpertLayout) -> str:
    return str(layout.float_dtype).removeprefix("torch.") + (f"/int{layout.quant.bits}" if layout.quant else "")


@dataclass
class Manifest:
    path: Path
    folder: str
    dtype: str
    expert_bytes: int
    shards: dict[str, dict]
    checksums: dict[Key, int]
    algorithm: str = CHECKSUM
    #: computed by this process (no manifest before, or a rehash); shards re-checked at this load because they changed
    computed: bool = False
    rechecked: list[str] = field(default_factory=list)

    @classmethod
    def read(cls, path: Path) -> "Manifest | None":
        """The manifest at `path`; None when there is none, or it is of another format or checksum algorithm (a
        warning says so: the checksums are then recorded anew from the files as they are)."""
        try:
            d = json.loads(path.read_text(encoding="utf-8"))
            if d.get("format") != FORMAT or d.get("algorithm") != CHECKSUM:
                raise ValueError(f"format {d.get('format')!r}, algorithm {d.get('algorithm')!r}")
            sums = {tuple(int(v) for v in k.split(".")): int(h, 16) for k, h in d["experts"].items()}
            return cls(path, d["folder"], d["dtype"], int(d["expert_bytes"]), dict(d["shards"]), sums,
                       d["algorithm"])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            warnings.warn(f"expert checksum manifest {path} is unreadable or of another version ({exc}); the "
                          "checksums are recorded anew from the files as they are now", stacklevel=3)
            return None

    def write(self) -> None:
        """Atomically (a temporary file renamed over the old one)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = {"format": FORMAT, "algorithm": self.algorithm, "folder": self.folder, "dtype": self.dtype,
                "expert_bytes": self.expert_bytes, "shards": self.shards,
                "written": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "experts": {f"{k[0]}.{k[1]}": f"{v:016x}" for k, v in sorted(self.checksums.items())}}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
        tmp.write_text(json.dumps(body, indent=0) + "\n", encoding="utf-8")
        os.replace(tmp, self.path)


def new_manifest(ckpt: Checkpoint, layout: ExpertLayout, stats: dict, sums: dict[Key, int]) -> Manifest:
    return Manifest(manifest_path(ckpt), str(ckpt.folder.resolve()), _dtype_name(layout), layout.disk_bytes,
                    stats, sums, computed=True)


@dataclass
class Scan:
    """What reading a set of experts found: checksums, experts that could not be read, experts holding NaN / inf."""

    checksums: dict[Key, int] = field(default_factory=dict)
    unreadable: dict[Key, str] = field(default_factory=dict)
    nonfinite: list[Key] = field(default_factory=list)


def _finite(layout: ExpertLayout, buf: torch.Tensor) -> bool:
    """No NaN / inf in an expert's float bytes (a quantized layout: its scales)."""
    if layout.quant is None:
        vals = buf
    else:
        parts = next(iter(layout.experts.values())).parts
        vals = buf.view(torch.uint8)[sum(p.nbytes for p in parts[:3]):].view(parts[3].dtype)
    if vals.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        return True
    return bool(torch.isfinite(vals).all())


def scan_experts(reader: ExpertReader, keys: list[Key], progress: bool = True, threads: int = 2,
                 desc: str = "expert checksums", finite: bool = False, strict: bool = True) -> Scan:
    """Read `keys` with the reader's positional reads (pages dropped after each read, not counted, not checked)
    into one expert-sized buffer per thread, hashed as they land (and, with `finite`, look for NaN / inf).
    `strict`: a read error raises; else it is recorded in `Scan.unreadable`."""
    layout, out, local = reader.layout, Scan(), threading.local()

    def one(key: Key):
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = torch.empty(layout.numel, dtype=layout.disk_dtype)
        try:
            h = reader.checksum(key, buf)
        except ExpertReadError as exc:
            if strict:
                raise
            return key, None, str(exc), True
        return key, h, None, not finite or _finite(layout, buf)

    with ThreadPoolExecutor(max_workers=max(1, threads), thread_name_prefix="moelite-hash") as pool, \
            tqdm(total=len(keys) * layout.disk_bytes, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                 disable=not progress or not keys, leave=False) as bar:
        for key, h, err, ok in pool.map(one, keys):
            if err is not None:
                out.unreadable[key] = err
            else:
                out.checksums[key] = h
            if not ok:
                out.nonfinite.append(key)
            bar.update(layout.disk_bytes)
    return out


def where(layout: ExpertLayout, key: Key) -> dict:
    """An expert's place on disk, for reports: layer, expert, tensors, shard file names, first offset."""
    parts = layout.experts[key].parts
    plan = read_plan([(p.file, p.offset, p.nbytes) for p in parts])
    return {"layer": key[0], "expert": key[1], "tensors": [p.name for p in parts],
            "shards": sorted({f.name for f, _, _, _ in plan}), "offset": plan[0][1]}


def _listing(layout: ExpertLayout, keys: list[Key]) -> str:
    places = [where(layout, k) for k in keys[:SHOWN]]
    shown = [f"expert {w['expert']} of layer {w['layer']} ({', '.join(w['shards'])} at offset {w['offset']})"
             for w in places]
    return "; ".join(shown) + (f"; and {len(keys) - SHOWN} more" if len(keys) > SHOWN else "")


WHAT_TO_DO = ("Restore the file (re-download it); `moelite verify` on the model folder lists every damaged expert. If "
              "you changed the checkpoint on purpose, `moelite verify DIR --rehash` records its new checksums "
              "(verify_checksums=False / --no-verify-checksums loads it unchecked)")


def checksums_for(ckpt: Checkpoint, layout: ExpertLayout, reader: ExpertReader, progress: bool = True,
                  threads: int = 2) -> Manifest:
    """The checkpoint's manifest: read, re-checked where shards changed, or computed (see the module contract)."""
    path = manifest_path(ckpt)
    stats = shard_stats(ckpt)
    keys = sorted(layout.experts)
    m = Manifest.read(path)
    if m is None:
        scan = scan_experts(reader, keys, progress, threads, desc="expert checksums (first load)")
        m = new_manifest(ckpt, layout, stats, scan.checksums)
        m.write()
        return m
    name = ckpt.folder.name
    if m.dtype != _dtype_name(layout) or m.expert_bytes != layout.disk_bytes:
        raise ExpertIntegrityError(
            f"model folder {name!r}: its routed experts are {_dtype_name(layout)}, {layout.disk_bytes} bytes each, "
            f"in the safetensors headers now, but were {m.dtype}, {m.expert_bytes} bytes each, when their "
            "checksums were recorded at first load: a header was relabelled or the checkpoint was re-saved in "
            f"another format. {WHAT_TO_DO}", keys)
    missing = [k for k in keys if k not in m.checksums]
    if missing:
        raise ExpertIntegrityError(
            f"model folder {name!r}: {len(missing)} routed experts have no checksum recorded for them (the manifest "
            f"was written for another layout): {_listing(layout, missing)}. {WHAT_TO_DO}", missing)
    changed = sorted(n for n, st in stats.items() if m.shards.get(n) != st)
    if not changed:
        return m
    files = {f for f in ckpt.weight_files if ckpt.display(f) in changed}
    todo = [k for k in keys if any(p.file in files for p in layout.experts[k].parts)]
    scan = scan_experts(reader, todo, progress, threads, desc=f"re-checking {len(files)} changed shard(s)")
    bad = [k for k in todo if scan.checksums[k] != m.checksums[k]]
    if bad:
        raise ExpertIntegrityError(
            f"model folder {name!r}: {', '.join(repr(n) for n in changed)} changed on disk since the checksums of "
            f"its experts were recorded at first load, and {len(bad)} of its {len(todo)} routed experts no longer "
            f"match them: {_listing(layout, bad)}. {WHAT_TO_DO}", bad)
    m.shards.update({n: stats[n] for n in changed})  # same bytes as recorded: a copy, a touch, an identical re-save
    m.rechecked = changed
    m.write()
    return m


# ---- moelite verify ---------------------------------------------------------------------------------------------
@dataclass
class VerifyReport:
    model: str
    manifest: str
    layers: int
    experts: int
    expert_bytes: int
    seconds: float = 0.0
    recorded: bool = False  # checksums recorded by this run (no manifest before, or --rehash)
    changed_shards: list[str] = field(default_factory=list)  # size / mtime differ from the manifest's
    mismatches: list[dict] = field(default_factory=list)  # experts whose bytes differ from their checksum
    unreadable: list[dict] = field(default_factory=list)
    nonfinite: list[dict] = field(default_factory=list)  # experts holding NaN / inf
    rehash_changed: list[dict] = field(default_factory=list)  # --rehash: experts whose checksum changed
    problems: list[str] = field(default_factory=list)  # whole-checkpoint findings

    @property
    def ok(self) -> bool:
        return not (self.mismatches or self.unreadable or self.nonfinite or self.problems)

    def to_dict(self) -> dict:
        return {"model": self.model, "ok": self.ok, "manifest": self.manifest, "layers": self.layers,
                "experts": self.experts, "expert_bytes": self.expert_bytes, "seconds": round(self.seconds, 3),
                "recorded": self.recorded, "changed_shards": self.changed_shards, "mismatches": self.mismatches,
                "unreadable": self.unreadable, "nonfinite": self.nonfinite, "rehash_changed": self.rehash_changed,
                "problems": self.problems}


def open_layout(folder, allow_pickle: bool = False) -> tuple[Checkpoint, ExpertLayout]:
    """The load-time checks of a checkpoint without loading it: headers (Checkpoint.open), the architecture, the
    routed experts' layout, shapes and dtypes (ExpertLayout.build)."""
    ckpt = Checkpoint.open(folder, allow_pickle=allow_pickle)
    adapter = adapter_for(ckpt.model_type)
    try:
        hf_config = AutoConfig.from_pretrained(str(ckpt.folder), trust_remote_code=False)
    except (ValueError, OSError, TypeError, KeyError) as exc:
        raise CheckpointError(f"config.json in {ckpt.folder.name!r} is not a valid {ckpt.model_type} config: "
                              f"{exc}") from exc
    layout = ExpertLayout.build(ckpt, adapter, adapter.num_experts(hf_config), QuantSpec.from_config(hf_config))
    return ckpt, layout


def verify_checkpoint(folder, rehash: bool = False, progress: bool = True, threads: int = 2,
                      allow_pickle: bool = False) -> VerifyReport:
    """Check a checkpoint in full (see the module contract). Header problems raise CheckpointError; what reading
    the experts finds is in the report (`ok` False on any problem)."""
    t0 = time.perf_counter()
    ckpt, layout = open_layout(folder, allow_pickle)
    reader = ExpertReader(layout, SlotPool(layout, 0, layout.disk_dtype, torch.device("cpu")))
    try:
        keys = sorted(layout.experts)
        path = manifest_path(ckpt)
        rep = VerifyReport(ckpt.folder.name, str(path), len(layout.layers), len(keys), layout.total_disk_bytes)
        stats = shard_stats(ckpt)
        old = Manifest.read(path)
        rep.changed_shards = sorted(n for n, st in stats.items() if old is not None and old.shards.get(n) != st)
        scan = scan_experts(reader, keys, progress, threads, desc="verifying experts", finite=True, strict=False)
    finally:
        reader.close()
    rep.unreadable = [dict(where(layout, k), error=e) for k, e in sorted(scan.unreadable.items())]
    rep.nonfinite = [where(layout, k) for k in sorted(scan.nonfinite)]
    if old is None or rehash:
        if old is not None:
            rep.rehash_changed = [where(layout, k) for k in keys if k in scan.checksums
                                  and old.checksums.get(k) != scan.checksums[k]]
        if not scan.unreadable:  # a manifest records every expert or none
            new_manifest(ckpt, layout, stats, scan.checksums).write()
            rep.recorded = True
    else:
        if old.dtype != _dtype_name(layout) or old.expert_bytes != layout.disk_bytes:
            rep.problems.append(
                f"the routed experts are {_dtype_name(layout)}, {layout.disk_bytes} bytes each, in the headers now, "
                f"but were {old.dtype}, {old.expert_bytes} bytes each, when their checksums were recorded: a header "
                "was relabelled or the checkpoint was re-saved in another format")
        rep.mismatches = [where(layout, k) for k in keys
                          if k in scan.checksums and old.checksums.get(k) != scan.checksums[k]]
        if rep.changed_shards and rep.ok:  # the same bytes as recorded: the new sizes and mtimes are recorded
            old.shards.update({n: stats[n] for n in rep.changed_shards})
            old.write()
    rep.seconds = time.perf_counter() - t0
    return rep
