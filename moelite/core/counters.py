"""The engine's one set of counters, and the one definition of every rate built from them.

Contract:
  - `Counters` is mutable and owned by the expert manager (the reader adds its I/O totals to the same object). Every
    routed-expert evaluation a MoE layer asks for is counted once, in the phase of the forward pass that asked
    ("prefill": a prompt or a full-sequence scoring pass, whatever its length; "decode": one new token per sequence):
      hits           the expert's bytes were resident when the layer needed it (an exact hit);
      misses         the layer started the read itself (loaded into the cache or computed from a read buffer);
      in_flight      a read started earlier (a prefetch, a preload) had not landed: the layer waited on it;
      substitutions  (token, choice) entries the router replaced by a resident expert (SMoE); an expert present
                     only as a substitute is neither a hit nor a miss.
    hits, misses and in_flight count distinct experts per layer pass; substitutions count entries. For one token
    per pass (decode at batch 1) their sum is the number of evaluations the exact model asked for.
  - `snapshot()` -> an immutable `Snapshot`; `delta(before)` (= `snapshot() - before`) the counts since `before`;
    snapshots add up (`a + b`), so per-request deltas can be pooled.
  - `Snapshot.report()` -> the named metrics, the only place a rate is defined. Names say what they count:
      exact_hit_rate            hits / evaluations                (substitutions and reads waited on apart)
      substituted_rate          substitutions / evaluations
      hit_or_substituted_rate   (hits + substitutions) / evaluations: served from memory without a wait
      read_wait_rate            (misses + in_flight) / evaluations: evaluations that waited for a read
    each also as decode_* and prefill_* over that phase alone; prefetch_precision = prefetches used / (used +
    wasted), prefetch_recall = prefetches used / (used + decode misses). engine.stats(), bench, eval, the server's
    /metrics and the eMoE preloader all read these.
  - `layer(l)` -> that MoE layer's `LayerStats` (mutable); `per_layer()` a plain-dict copy of all of them.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields

PHASES = ("prefill", "decode")


def ratio(num: float, den: float) -> float:
    """num / den, 0.0 when nothing was counted."""
    return num / den if den else 0.0


@dataclass(frozen=True)
class PhaseTotals:
    """A phase's counts at one moment (see the module contract for each field)."""

    hits: int = 0
    misses: int = 0
    in_flight: int = 0
    substitutions: int = 0

    @property
    def evaluations(self) -> int:
        return self.hits + self.misses + self.in_flight + self.substitutions

    @property
    def reads_waited(self) -> int:
        return self.misses + self.in_flight

    def __add__(self, other: "PhaseTotals") -> "PhaseTotals":
        return PhaseTotals(*(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)))

    def __sub__(self, other: "PhaseTotals") -> "PhaseTotals":
        return PhaseTotals(*(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)))

    def rates(self, prefix: str) -> dict:
        n = self.evaluations
        return {f"{prefix}exact_hit_rate": ratio(self.hits, n),
                f"{prefix}substituted_rate": ratio(self.substitutions, n),
                f"{prefix}hit_or_substituted_rate": ratio(self.hits + self.substitutions, n),
                f"{prefix}read_wait_rate": ratio(self.reads_waited, n)}


class PhaseCounts:
    """The running counts of one phase: `PhaseTotals`' fields, mutable (frozen into a `PhaseTotals` by a snapshot)."""

    __slots__ = tuple(f.name for f in fields(PhaseTotals))

    def __init__(self):
        for name in self.__slots__:
            setattr(self, name, 0)

    def freeze(self) -> PhaseTotals:
        return PhaseTotals(*(getattr(self, name) for name in self.__slots__))


@dataclass(slots=True)
class LayerStats:
    """One MoE layer's totals over both phases."""

    hits: int = 0
    misses: int = 0
    in_flight: int = 0
    prefetch_hits: int = 0
    substitutions: int = 0
    tokens: int = 0
    evictions: int = 0
    bytes_read: int = 0
    stall_seconds: float = 0.0


@dataclass(frozen=True)
class Snapshot:
    """Counters at one moment, or the difference of two moments (`after - before`)."""

    prefill: PhaseTotals = field(default_factory=PhaseTotals)
    decode: PhaseTotals = field(default_factory=PhaseTotals)
    evictions: int = 0
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    misses_loaded: int = 0
    misses_direct: int = 0
    bytes_read: int = 0
    reads: int = 0
    read_errors: int = 0
    integrity_errors: int = 0
    io_seconds: float = 0.0
    checksum_seconds: float = 0.0
    stall_seconds: float = 0.0
    compute_seconds: float = 0.0

    @property
    def total(self) -> PhaseTotals:
        return self.prefill + self.decode

    def _combine(self, other: "Snapshot", sign: int) -> "Snapshot":
        vals = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            vals[f.name] = (a + b if sign > 0 else a - b)
        return Snapshot(**vals)

    def __add__(self, other: "Snapshot") -> "Snapshot":
        return self._combine(other, 1)

    def __sub__(self, other: "Snapshot") -> "Snapshot":
        return self._combine(other, -1)

    def report(self) -> dict:
        """The named metrics of these counts (see the module contract); plain numbers, JSON-ready."""
        t, d, p = self.total, self.decode, self.prefill
        out = {"expert_hits": t.hits, "expert_misses": t.misses, "expert_reads_in_flight": t.in_flight,
               "expert_substitutions": t.substitutions, "expert_evaluations": t.evaluations}
        for name, ph in (("prefill", p), ("decode", d)):
            out.update({f"{name}_expert_hits": ph.hits, f"{name}_expert_misses": ph.misses,
                        f"{name}_expert_reads_in_flight": ph.in_flight,
                        f"{name}_expert_substitutions": ph.substitutions})
        out.update(t.rates(""))
        out.update(d.rates("decode_"))
        out.update(p.rates("prefill_"))
        out.update({
            "expert_evictions": self.evictions,
            "prefetch_issued": self.prefetch_issued,
            "prefetch_hits": self.prefetch_used,
            "prefetch_wasted": self.prefetch_wasted,
            "prefetch_precision": ratio(self.prefetch_used, self.prefetch_used + self.prefetch_wasted),
            "prefetch_recall": ratio(self.prefetch_used, self.prefetch_used + d.misses),
            "misses_loaded": self.misses_loaded,
            "misses_direct": self.misses_direct,
            "expert_bytes_read": self.bytes_read,
            "expert_reads": self.reads,
            "expert_read_errors": self.read_errors,
            "expert_integrity_errors": self.integrity_errors,
            "io_seconds": self.io_seconds,
            "checksum_seconds": self.checksum_seconds,
            "stall_seconds": self.stall_seconds,
            "expert_compute_seconds": self.compute_seconds,
        })
        return out


_SCALARS = tuple(f.name for f in fields(Snapshot) if f.name not in PHASES)


class Counters:
    """The running counts (see the module contract). Main-thread fields are plain attributes; the reader's I/O
    totals (bytes_read, reads, read_errors, integrity_errors, io_seconds, checksum_seconds) are added under the
    reader's lock."""

    def __init__(self):
        self.prefill = PhaseCounts()
        self.decode = PhaseCounts()
        for name in _SCALARS:
            setattr(self, name, 0.0 if name.endswith("seconds") else 0)
        self.layers: dict[int, LayerStats] = {}

    def phase(self, decode: bool) -> PhaseCounts:
        return self.decode if decode else self.prefill

    def layer(self, layer: int) -> LayerStats:
        st = self.layers.get(layer)
        if st is None:
            st = self.layers[layer] = LayerStats()
        return st

    def snapshot(self) -> Snapshot:
        return Snapshot(self.prefill.freeze(), self.decode.freeze(), *(getattr(self, n) for n in _SCALARS))

    def delta(self, before: Snapshot) -> Snapshot:
        """The counts since `before` (a snapshot of these counters)."""
        return self.snapshot() - before

    def per_layer(self) -> dict[int, dict]:
        return {layer: asdict(s) for layer, s in sorted(self.layers.items())}


#: the keys of `Snapshot.report()` that are rates (the rest are counts and seconds, which subtract)
RATE_KEYS = frozenset(k for k in Snapshot().report() if k.endswith("_rate") or k.startswith("prefetch_") and
                      k.endswith(("precision", "recall")))
