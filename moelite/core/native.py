"""moelite's native CPU kernels (`native/gemv.c`): built at first use, loaded with ctypes, called on torch tensors.

Contract:
  - `load()` -> the loaded library, or None where it cannot run here; `status()` says which and why (for
    `moelite info`, `engine.stats()` and the results files). Needs a CPU with AVX2, FMA and F16C and a C compiler
    (`$CC`, else cc / gcc; torch.compile needs one too). The build takes about a second and is cached under
    `$MOELITE_CACHE_DIR` (default ~/.cache/moelite) by a hash of the source and flags, so a process after the
    first loads it at once. Two builds of the one source: AVX2 (every CPU that runs the kernels), and on CPUs with
    AVX-512 F/BW/VL, AVX-512 BF16 and AVX-512 VNNI (Zen 4, Sapphire Rapids) an AVX-512 build, chosen by default:
    there bf16 weights are multiplied with activations rounded to bf16 (vdpbf16ps, float32 accumulation, as
    llama.cpp's and transformers' bf16 products) and quantized blocks with vpdpbusd. `MOELITE_NATIVE=avx2` keeps
    the AVX2 build (float32 activations for 16-bit weights), `MOELITE_NATIVE=0` turns the kernels off (then the
    torch kernels run).
  - `gemv(x, w, out=None, alpha=None)`: x float32 [N, I] (N <= MAX_ROWS, rows contiguous), w [O, I] float32, bf16 or
    fp16 with unit stride along I -> float32 [N, O] = x @ w.T, each weight read once; with `alpha` [N], adds
    alpha[n] * (x[n] @ w.T) into `out` instead.
  - `qgemv(x, qw, out=None, alpha=None)`: the same for a weight-only quantized weight (`quant.QWeight`, int8 or
    int4 packed rows with per-group scales): x is quantized to int8 in blocks of 32 inside the call (as llama.cpp's
    Q8 activations) and each block is an integer dot product.
  - `swiglu_pairs(gate_up_all, down_all, x, slots, tok, wts, out)`: SwiGLU experts over (token, expert) pairs,
    pairs sorted by slot, each token at most once per slot: out[tok[p]] += wts[p] * expert(slots[p], x[tok[p]]).
    Slots [S, 2E, H] and [S, H, E] (tensors, or `quant.QWeight` stacks), contiguous per slot. One call per MoE
    layer.
  - `cpu_flags()` -> the instruction-set flags of this CPU that matter to moelite's kernels (avx2, fma, f16c,
    avx512f, avx512_bf16, amx_bf16, amx_tile), read once from /proc/cpuinfo; recorded with every figure.
  - `scratch(key, numel, dtype)` -> this thread's reused 1-D buffer `key` of at least `numel` elements (a fresh
    large tensor costs a page fault per 4 KiB on every call); created outside inference mode, so it can be written
    in and out of it. Valid until the thread's next call with the same key.
  Threads: torch.get_num_threads(), split over output features (OpenMP; torch's own runtime, already loaded).
  The kernels compute in float32 from the weights' storage dtype: the result equals a float32 product over the same
  weights up to summation order (tests/test_native.py checks both against torch).
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from functools import lru_cache
from pathlib import Path

import torch

log = logging.getLogger("moelite.core.native")

SOURCE = Path(__file__).with_name("native") / "gemv.c"
FLAGS = ("-O3", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC")
NEEDS = ("avx2", "fma", "f16c")
#: the AVX-512 build: its extra compiler flags, and the CPU flags it needs
AVX512_FLAGS = ("-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512bf16", "-mavx512vnni")
AVX512_NEEDS = ("avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni")
_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512_bf16", "avx512_vnni", "avx_vnni",
          "amx_bf16", "amx_tile")
MAX_ROWS = 8
#: output features widened per block by `linear` on its many-rows path (float32 buffer of BLOCK x in_features)
BLOCK = 4096
DTYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}

_status = "not loaded yet"
_scratch = threading.local()


@lru_cache(maxsize=1)
def cpu_flags() -> tuple[str, ...]:
    """The flags of `_FLAGS` this CPU has (empty where /proc/cpuinfo cannot be read)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ()
    for line in text.splitlines():
        if line.startswith("flags"):
            have = set(line.split(":", 1)[1].split())
            return tuple(f for f in _FLAGS if f in have)
    return ()


def _buffer(key, numel: int, dtype: torch.dtype) -> torch.Tensor:
    """This thread's whole buffer `key` of `dtype`, grown to at least `numel` elements."""
    bufs = getattr(_scratch, "bufs", None)
    if bufs is None:
        bufs = _scratch.bufs = {}
    buf = bufs.get((key, dtype))
    if buf is None or buf.numel() < numel:
        with torch.inference_mode(False):  # a normal tensor: usable in and out of inference mode
            buf = bufs[(key, dtype)] = torch.empty(numel, dtype=dtype)
    return buf


def scratch(key, numel: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return _buffer(key, numel, dtype)[:numel]


def _work(key: str, nbytes: int) -> int:
    """The address of this thread's scratch bytes `key` (at least `nbytes`): `scratch` without the slice, for the
    kernels' work space (a slice costs about a microsecond, as much as a small kernel's whole call)."""
    return _buffer(key, nbytes, torch.uint8).data_ptr()


def _compiler() -> str | None:
    for cand in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cand and shutil.which(cand):
            return shutil.which(cand)
    return None


def cache_dir() -> Path:
    return Path(os.environ.get("MOELITE_CACHE_DIR") or Path.home() / ".cache" / "moelite") / "native"


def variant() -> str:
    """The build this process uses: "avx512" where the CPU has `AVX512_NEEDS` (unless MOELITE_NATIVE=avx2), else
    "avx2"."""
    if os.environ.get("MOELITE_NATIVE") != "avx2" and all(f in cpu_flags() for f in AVX512_NEEDS):
        return "avx512"
    return "avx2"


def _build(cc: str, which: str) -> Path:
    src = SOURCE.read_bytes()
    flags = FLAGS + (AVX512_FLAGS if which == "avx512" else ())
    key = hashlib.sha256(src + " ".join(flags).encode() + cc.encode()).hexdigest()[:16]
    out = cache_dir() / f"gemv-{which}-{key}.so"
    if out.exists():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:  # built aside, renamed into place: no torn file
        part = Path(tmp) / out.name
        res = subprocess.run([cc, *flags, str(SOURCE), "-o", str(part), "-lm"], capture_output=True, text=True)
        if res.returncode != 0:
            raise RuntimeError(f"{Path(cc).name} failed: {res.stderr.strip()[:300]}")
        os.replace(part, out)
    return out


@lru_cache(maxsize=1)
def load() -> ctypes.CDLL | None:
    global _status
    if os.environ.get("MOELITE_NATIVE") == "0":
        _status = "off (MOELITE_NATIVE=0)"
        return None
    missing = [f for f in NEEDS if f not in cpu_flags()]
    if missing:
        _status = f"this CPU lacks {', '.join(missing)}"
        return None
    cc = _compiler()
    if cc is None:
        _status = "no C compiler found (set CC)"
        return None
    which = variant()
    try:
        lib = ctypes.CDLL(str(_build(cc, which)))
    except (OSError, RuntimeError) as exc:
        _status = f"build failed: {exc}"
        log.warning("native CPU kernels: %s", _status)
        return None
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.ml_gemv.argtypes = [p, i32, i64, i64, i64, p, i32, p, p, i32]
    lib.ml_gemv.restype = None
    lib.ml_qgemv.argtypes = [p, i32, i64, i64, i64, p, i32, i64, i64, p, i32, p, p, p, i32]
    lib.ml_qgemv.restype = None
    lib.ml_qgemv_scratch.argtypes = [i64, i64]
    lib.ml_qgemv_scratch.restype = i64
    lib.ml_swiglu_pairs.argtypes = [p, i64, p, i64, p, i64, p, i64, i32, i32, i64, i64, i64, p, i64, p, p, p, i64,
                                    p, p, i32]
    lib.ml_swiglu_pairs.restype = None
    lib.ml_swiglu_scratch.argtypes = [i64, i64, i64, i64]
    lib.ml_swiglu_scratch.restype = i64
    lib.ml_bf16_dot.argtypes = []
    lib.ml_bf16_dot.restype = i32
    _status = (("AVX-512 kernels (bf16 dot products with bf16-rounded activations, VNNI int8)" if which == "avx512"
                else "AVX2 kernels") + " built with " + Path(cc).name)
    return lib


def status() -> str:
    load()
    return _status


def available() -> bool:
    return load() is not None


def bf16_activations() -> bool:
    """Whether bf16 weights are multiplied with bf16-rounded activations (the AVX-512 build) rather than float32."""
    lib = load()
    return bool(lib is not None and lib.ml_bf16_dot())


def _lib() -> ctypes.CDLL:
    lib = load()
    if lib is None:
        raise RuntimeError(f"native CPU kernels unavailable: {_status}")
    return lib


_PTRS = [ctypes.c_void_p * n for n in range(MAX_ROWS + 1)]


def _rows(t: torch.Tensor) -> ctypes.Array:
    """Pointers to the rows of a 2-D float32 tensor (rows may be strided, each row contiguous)."""
    n = t.shape[0]
    if n == 1:
        return _PTRS[1](t.data_ptr())
    base, step = t.data_ptr(), t.stride(0) * t.element_size()
    return (_PTRS[n] if n <= MAX_ROWS else ctypes.c_void_p * n)(*(base + k * step for k in range(n)))


def _check_weight(w: torch.Tensor, name: str) -> int:
    if w.dtype not in DTYPES or w.device.type != "cpu":
        raise TypeError(f"{name}: the native kernels take CPU float32/bfloat16/float16 weights, not {w.dtype} on "
                        f"{w.device}")
    return DTYPES[w.dtype]


def _out_alpha(n: int, o: int, out: torch.Tensor | None, alpha: torch.Tensor | None):
    """The GEMVs' output (a new float32 [n, o] unless given) and alpha as contiguous float32 (None: store)."""
    if out is None:
        out = torch.empty(n, o, dtype=torch.float32)
    return out, None if alpha is None else alpha.to(torch.float32).contiguous()


def linear(x: torch.Tensor, out_features: int, decode, widen, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x float32 [..., I] times a stored weight [O, I] -> float32 [..., O] (`dense.Linear16`, `quant.LinearQ`):
    up to MAX_ROWS rows through `decode(x2)` (a native GEMV) where the kernels run; otherwise `widen(s, e)` gives
    weight rows s..e as float32 (in a reused buffer), one block of BLOCK rows at a time, for torch.mm."""
    lead, i = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, i)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n, o = x2.shape[0], out_features
    if 0 < n <= MAX_ROWS and available():
        y = decode(x2)
    else:
        y = torch.empty(n, o, dtype=torch.float32)
        for s in range(0, o if n else 0, BLOCK):
            e = min(o, s + BLOCK)
            torch.mm(x2, widen(s, e).t(), out=y[:, s:e])
    if bias is not None:
        y += bias
    return y.view(*lead, o)


def gemv(x: torch.Tensor, w: torch.Tensor, out: torch.Tensor | None = None,
         alpha: torch.Tensor | None = None) -> torch.Tensor:
    lib = _lib()
    dt = _check_weight(w, "gemv")
    n, i = x.shape
    o = w.shape[0]
    if not 1 <= n <= MAX_ROWS or x.dtype != torch.float32 or x.stride(1) != 1 or w.shape[1] != i or w.stride(1) != 1:
        raise ValueError(f"gemv: x float32 [N<= {MAX_ROWS}, {i}] unit-stride rows and w [O, {i}] unit-stride rows "
                         f"expected, got x {x.dtype} {list(x.shape)}, w {list(w.shape)}")
    out, alpha = _out_alpha(n, o, out, alpha)
    a = None if alpha is None else alpha.data_ptr()
    lib.ml_gemv(w.data_ptr(), dt, o, i, w.stride(0), _rows(x), n, _rows(out), a, torch.get_num_threads())
    return out


def qgemv(x: torch.Tensor, qw, out: torch.Tensor | None = None, alpha: torch.Tensor | None = None) -> torch.Tensor:
    """`gemv` for a quantized weight (`quant.QWeight`, packed rows uint8 [O, I * bits / 8], scales [O, I / G])."""
    lib = _lib()
    n, i = x.shape
    o = qw.out_features
    if not 1 <= n <= MAX_ROWS or x.dtype != torch.float32 or x.stride(1) != 1 or qw.in_features != i \
            or qw.packed.stride(1) != 1 or qw.scale.stride(1) != 1 or i % 32 or qw.group % 32:
        raise ValueError(f"qgemv: x float32 [N<= {MAX_ROWS}, I] unit-stride rows and a packed weight of in_features "
                         f"I (a multiple of 32) expected, got x {x.dtype} {list(x.shape)}, weight in_features "
                         f"{qw.in_features}")
    sdt = _check_weight(qw.scale, "qgemv scales")
    out, alpha = _out_alpha(n, o, out, alpha)
    a = None if alpha is None else alpha.data_ptr()
    work = _work("qgemv", lib.ml_qgemv_scratch(n, i))
    lib.ml_qgemv(qw.packed.data_ptr(), qw.bits, o, i, qw.packed.stride(0), qw.scale.data_ptr(), sdt,
                 qw.scale.stride(0) * qw.scale.element_size(), qw.group, _rows(x), n, _rows(out), a, work,
                 torch.get_num_threads())
    return out


def swiglu_pairs(gate_up_all, down_all, x: torch.Tensor, slots: torch.Tensor, tok: torch.Tensor, wts: torch.Tensor,
                 out: torch.Tensor) -> torch.Tensor:
    lib = _lib()
    quant = not isinstance(gate_up_all, torch.Tensor)
    if quant:  # quant.QWeight stacks
        gu, dn = gate_up_all.packed, down_all.packed
        dt, sdt, group = gate_up_all.bits, _check_weight(gate_up_all.scale, "swiglu_pairs scales"), gate_up_all.group
        s, e2, h = gu.shape[0], gate_up_all.out_features, gate_up_all.in_features
        e = e2 // 2
        if (down_all.bits, down_all.group) != (dt, group) or down_all.scale.dtype != gate_up_all.scale.dtype \
                or (down_all.out_features, down_all.in_features) != (h, e) or h % 32 or e % 32 or group % 32 \
                or gu.stride()[1:] != (gu.shape[2], 1) or dn.stride()[1:] != (dn.shape[2], 1) \
                or gate_up_all.scale.stride()[1:] != (gate_up_all.scale.shape[2], 1) \
                or down_all.scale.stride()[1:] != (down_all.scale.shape[2], 1):
            raise ValueError("swiglu_pairs: quantized slots must be contiguous [S, 2E, H] and [S, H, E] of one scheme, "
                             "H and E multiples of 32")
        gus, dns = gate_up_all.scale, down_all.scale
        scales = (gus.data_ptr(), gus.stride(0) * gus.element_size(), dns.data_ptr(), dns.stride(0) * dns.element_size())
    else:
        gu, dn = gate_up_all, down_all
        dt, sdt, group = _check_weight(gu, "swiglu_pairs"), 0, 0
        if dn.dtype != gu.dtype:
            raise TypeError("swiglu_pairs: gate_up and down slots must share a dtype")
        s, e2, h = gu.shape
        e = e2 // 2
        if gu.stride()[1:] != (h, 1) or dn.stride()[1:] != (e, 1) or tuple(dn.shape[1:]) != (h, e):
            raise ValueError("swiglu_pairs: slots must be contiguous [S, 2E, H] and [S, H, E]")
        scales = (None, 0, None, 0)
    if x.dtype != torch.float32 or not x.is_contiguous() or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError("swiglu_pairs: x and out must be contiguous float32 [N, H]")
    slots = slots.to(torch.int64).contiguous()
    tok = tok.to(torch.int64).contiguous()
    wts = wts.to(torch.float32).contiguous()
    p, n = slots.numel(), x.shape[0]
    work = _work("swiglu_pairs", lib.ml_swiglu_scratch(p, n, h, e))
    lib.ml_swiglu_pairs(gu.data_ptr(), gu.stride(0) * gu.element_size(), scales[0], scales[1],
                        dn.data_ptr(), dn.stride(0) * dn.element_size(), scales[2], scales[3], dt, sdt, group, h, e,
                        x.data_ptr(), n, slots.data_ptr(), tok.data_ptr(), wts.data_ptr(), p, out.data_ptr(),
                        work, torch.get_num_threads())
    return out
