"""Head to head: moelite against Hugging Face offloading and llama.cpp, under the same memory cap, in one run.

What it measures. For each checkpoint section below, every engine runs the same prompts (the same token ids: the
prompt texts are tokenized once with the checkpoint's tokenizer and handed to every engine as ids), greedy, for
exactly --*-tokens new tokens each (end-of-sequence is ignored so every engine decodes the same number of tokens),
in a fresh worker process started after the checkpoint's (and the GGUF's) pages were dropped from the OS page
cache. Per row it reports

  decode tok/s   (generated tokens - 1) / time from the first to the last generated token, summed over prompts
  TTFT           mean time from the start of a request to its first token (prefill + first sampling step)
  read GiB       bytes the worker read from storage: `read_bytes` of /proc/PID/io, the worker's own final value
                 (polled by the parent while it runs, so a killed worker still has a lower bound); split into load
                 and generation where the worker finished
  peak RSS       the worker's VmHWM (polled) / ru_maxrss, and the memory cgroup's own peak (page cache included)
  survived       whether the worker finished; a worker killed by the cgroup's OOM killer, or past its time limit,
                 is a result too (with the tokens it completed before that, if any)
  agree          the fraction of generated token ids equal to the all-resident bf16 moelite run's at the same
                 position (same source checkpoint, same prompts): how close each engine's greedy output is to the
                 exact bf16 model; quantized rows (either engine) are compared with that same bf16 run

Precisions (--precisions, comma list, default bf16,int8,int4; each precision's rows run only when it is listed):
  bf16   the checkpoint's own bf16 weights: moelite best and exact, HF offload (and HF all in RAM), llama.cpp on a
         GGUF of --gguf-type (default bf16, the checkpoint's own bytes)
  int8   moelite on the checkpoint made by `moelite quantize SRC DST --bits 8 --group-size 32 --dense` (int8
         routed experts AND int8 dense linear layers, one scale per 32 inputs; routers, embeddings and norms stay
         as they are) against llama.cpp on a Q8_0 GGUF (blocks of 32 int8 with one fp16 scale)
  int4   the same with --bits 4 against llama.cpp Q4_0 (blocks of 32 4-bit values, one fp16 scale)
  With --dense both engines read about the same bytes per token in each quantized pair.

Engines (rows):
  moelite best        moelite.load(expert_budget=--budget, ...) on the bf16 checkpoint with the best configuration
                      (--moelite-best; by default score-window eviction + next-layer prefetch + hybrid miss path +
                      substitution alpha 0.25 when this build has substitution)
  moelite exact       the same with substitution off (alpha 0): output equals the model's
  moelite exact int8 (--dense) / int4 (--dense)
                      moelite exact on the quantized checkpoint (moelite.load reads it directly), same budget
  HF offload          transformers + accelerate: from_pretrained(device_map="auto", max_memory={"cpu": dense + the
                      share of the routed experts moelite's budget was}, offload_folder=...), bf16 (the checkpoint's
                      dtype): the modules that do not fit are offloaded to disk and read back on every forward pass.
                      With --budget auto the share is read from the moelite exact bf16 row run just before it
                      (engine.stats() after load: expert_budget_bytes / routed_expert_bytes); with a percentage or a
                      size, that share. --hf-budget overrides it.
  llama.cpp           llama-cpp-python on a GGUF (bf16 / Q8_0 / Q4_0), use_mmap=True, no mlock: the OS page cache
                      (inside the cgroup) is its only expert cache; it has no expert budget of its own. The row notes
                      list the tensor types the GGUF actually holds (read with gguf-py)
  upper bound         moelite with every expert resident (100% budget, warm start, no memory cap), bf16: the
                      reference of the agree column (the demo's uncapped section also has int8/int4 ones)
  moelite + replay    moelite best on the real-shape checkpoint with its routing replaced by a recorded routing trace of
                      the trained demo model (realistic locality); a different routing, so a separate labelled row

Expert budget (--budget, default auto). moelite's expert_budget="auto" takes the memory the worker may use (its
memory cgroup's limit minus usage), minus the dense weights, a KV cache of up to 4096 tokens and 10% headroom
(moelite/core/memory.py), much as llama.cpp's page cache fills the whole cap. Each moelite row's notes say what it
resolved to (bytes, share of the routed experts, moelite's own arithmetic). A percentage or size (--budget 25%) is
given to every moelite row as it is. moelite reads the limit of the worker's own memory cgroup (/proc/self/cgroup),
so the row's cap is what `auto` fills.

Sections: the demo model uncapped (no cgroup, everything resident), the demo model capped (--budget, inside a memory
cgroup of --demo-cap) and the real-shape checkpoint (random weights with Qwen3-30B-A3B expert shapes, 64 experts,
top-8, 8 layers, ~4.5 GiB of routed experts, 4.8 GB on disk; each engine with its own routing) inside a memory cgroup
of --rs-cap, smaller than the checkpoint. Each section's capped rows share ONE cgroup (cgroup v1 memory controller or
cgroup v2, needs root); where it cannot be created, the rows run uncapped and the output says so. The cgroup's
leftover page cache is emptied (memory.force_empty) before every row.

Set-up done by the script when missing (all under --work, never in the repository; each step is redone only when
its source changed):
  - the optional requirements (benchmarks/requirements-h2h.txt; llama-cpp-python builds from source, minutes);
  - llama.cpp's converter (convert_hf_to_gguf.py, conversion/, gguf-py/ from the pinned llama-cpp-python source
    distribution, fetched with pip download, in WORK/llama.cpp-VERSION);
  - the real-shape checkpoint (`moelite realshape`, WORK/rs-qwen3-64e) and the demo-model routing trace (`moelite
    trace`);
  - the quantized checkpoints, WORK/quantized/NAME-int8-g32-dense and -int4-g32-dense (`moelite quantize SRC DST
    --bits 8|4 --group-size 32 --dense`);
  - the GGUF files, WORK/gguf/: NAME-bf16.gguf with the converter (--outtype --gguf-type), and NAME.Q8_0.gguf /
    NAME.Q4_0.gguf made from it with llama-cpp-python's own llama_cpp.llama_model_quantize (LLAMA_FTYPE_MOSTLY_Q8_0
    / _Q4_0, default parameters: llama.cpp picks each tensor's type itself; 1-D tensors stay F32, and tensors whose
    rows do not fit its blocks, or output.weight, may get another type). The demo tokenizer's byte-level BPE
    pre-tokenizer is not in the converter's table of known tokenizer hashes; the converter is run unchanged through
    a small wrapper that falls back to the "gpt-2" pre-tokenizer in that one case (token ids are passed to llama.cpp
    directly anyway).

Writes benchmarks/results/h2h/{results.json, results.md, h2h.png} (or --out), prints the table, and ends with one
JSON line. Every row has a time limit (--demo-timeout, --rs-timeout) and the whole run a time budget (--budget-min,
counted from the start, set-up included, a first llama-cpp-python build excluded): rows that do not fit are recorded
as not run. --dry-run does the set-up and prints the planned rows without running them.

How long. On 2 cores: the demo sections (15 rows) take 1-2 minutes. The real-shape section's set-up, the first
time, takes roughly 7-10 minutes (writing the checkpoint ~1 min, `moelite quantize` int8 + int4 ~4 min, the bf16 GGUF
~1.5 min, Q8_0 + Q4_0 ~0.5 min; measured on a 2-layer copy and scaled); its 10 rows take roughly 6-12 minutes (the
previous 6-row run took 4 minutes; each row is at most --rs-timeout 360 s). A full run is thus ~10-15 minutes once set
up and ~20-25 minutes from nothing (plus ~3 minutes to build llama-cpp-python); --budget-min 50 bounds it.

  python3 benchmarks/head_to_head.py                      # everything (see above)
  python3 benchmarks/head_to_head.py --sections demo      # the demo-model sections only (1-2 minutes)
  python3 benchmarks/head_to_head.py --precisions int4    # only the 4-bit rows (plus the bf16 reference)
  python3 benchmarks/head_to_head.py --dry-run            # set up, then list the planned rows
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

REQUIREMENTS = Path(__file__).with_name("requirements-h2h.txt")
DEFAULT_CMAKE_ARGS = "-DGGML_NATIVE=ON -DLLAVA_BUILD=OFF -DGGML_BLAS=OFF -DGGML_CUDA=OFF"  # CPU-only, this CPU
TAG = "H2H "  # worker stdout lines the parent reads; anything else a library prints is ignored
DEFAULT_BEST = {"cache_policy": "score", "prefetch": True, "miss_policy": "hybrid", "substitution_alpha": 0.25,
                "io_threads": 2, "expert_dtype": "auto"}

# the converter wrapper: llama.cpp's own convert_hf_to_gguf.py, unchanged, with one fallback for tokenizers whose
# pre-tokenizer hash is not in its table (the demo model's byte-level BPE uses GPT-2's split regex)
CONVERT_RUNNER = '''\
import runpy, sys
src = sys.argv[1]
sys.path.insert(0, src)
sys.path.insert(1, src + "/gguf-py")
import conversion.base as base
_orig = base.TextModel.get_vocab_base_pre
def _pre(self, tokenizer):
    try:
        return _orig(self, tokenizer)
    except NotImplementedError:
        print("head_to_head: BPE pre-tokenizer not in the converter's table; using gpt-2", file=sys.stderr)
        return "gpt-2"
base.TextModel.get_vocab_base_pre = _pre
sys.argv = [src + "/convert_hf_to_gguf.py"] + sys.argv[2:]
runpy.run_path(sys.argv[0], run_name="__main__")
'''

# GGUF quantization with llama-cpp-python's own binding of llama.cpp's llama_model_quantize (no separate binary)
QUANT_RUNNER = '''\
import ctypes, sys
import llama_cpp
src, dst, ftype, nthread = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
params = llama_cpp.llama_model_quantize_default_params()
params.ftype = getattr(llama_cpp, "LLAMA_FTYPE_MOSTLY_" + ftype)
params.nthread = nthread
rc = llama_cpp.llama_model_quantize(src.encode(), dst.encode(), ctypes.byref(params))
sys.exit(0 if rc == 0 else 1)
'''

# the tensor types a GGUF holds, with gguf-py from the converter's folder: {type: [tensor names without blk.N.]}
GGUF_TYPES_RUNNER = '''\
import json, re, sys
sys.path.insert(0, sys.argv[1] + "/gguf-py")
from gguf import GGUFReader
by = {}
for t in GGUFReader(sys.argv[2]).tensors:
    name = re.sub(r"^blk[.][0-9]+[.]", "", t.name).removesuffix(".weight")
    by.setdefault(t.tensor_type.name, set()).add(name)
print(json.dumps({k: sorted(v) for k, v in by.items()}))
'''

PRECISIONS = ("bf16", "int8", "int4")
QUANT_BITS = {"int8": 8, "int4": 4}
GGUF_QUANT = {"int8": "Q8_0", "int4": "Q4_0"}  # llama.cpp's type for each quantized precision
GROUP_SIZE = 32  # moelite quantize's group: one scale per 32 inputs, as llama.cpp's Q8_0/Q4_0 blocks


# ==== worker side (one engine, one checkpoint, in a fresh process) ==================================================
def _proc_read_bytes(pid: str | int = "self") -> int | None:
    try:
        for line in Path(f"/proc/{pid}/io").read_text().splitlines():
            if line.startswith("read_bytes:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _proc_hwm(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


class Meter:
    """Accumulates per-prompt timings and prints a cumulative result line after every prompt (and, for engines
    decoding token by token here, after every token), so a worker stopped by its time limit still leaves a result."""

    def __init__(self, n_prompts: int, io_start: int | None):
        self.n_prompts, self.io_start = n_prompts, io_start or 0
        self.dec_tokens, self.dec_s, self.ttfts, self.ids = 0, 0.0, [], []
        self.extra: dict = {}

    def result(self, partial_prompt: tuple | None = None) -> dict:
        dec_tokens, dec_s, ttfts, ids = self.dec_tokens, self.dec_s, list(self.ttfts), list(self.ids)
        if partial_prompt is not None:  # a prompt in progress: its tokens so far count for decode speed
            toks, ttft, d_tok, d_s = partial_prompt
            dec_tokens, dec_s = dec_tokens + d_tok, dec_s + d_s
            ttfts.append(ttft)
        rb = _proc_read_bytes()
        return {"decode_tok_s": dec_tokens / dec_s if dec_s > 0 else None, "decode_tokens": dec_tokens,
                "decode_s": dec_s, "ttft_s": sum(ttfts) / len(ttfts) if ttfts else None,
                "prompts_done": len(self.ids), "prompts": self.n_prompts, "token_ids": ids,
                "read_bytes": rb, "read_bytes_load": self.io_start,
                "read_bytes_gen": rb - self.io_start if rb is not None else None,
                "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, **self.extra}

    def emit(self, partial_prompt: tuple | None = None, final: bool = False) -> None:
        res = self.result(partial_prompt)
        res["final"] = final
        print(TAG + json.dumps(res), flush=True)

    def prompt_done(self, toks: list[int], ttft: float, dec_tokens: int, dec_s: float) -> None:
        self.ids.append(toks)
        self.ttfts.append(ttft)
        self.dec_tokens += dec_tokens
        self.dec_s += dec_s
        self.emit()


def _decode_loop(step, prompt_ids: list[int], max_tokens: int, meter: Meter) -> None:
    """Greedy loop for engines driven token by token: `step(ids_or_None) -> next token id`."""
    t0 = time.perf_counter()
    tok = step(prompt_ids)
    t1 = time.perf_counter()
    toks, ttft = [tok], t1 - t0
    while len(toks) < max_tokens:
        tok = step(None)
        toks.append(tok)
        if len(toks) % 4 == 0:
            meter.emit(partial_prompt=(toks, ttft, len(toks) - 1, time.perf_counter() - t1))
    meter.prompt_done(toks, ttft, len(toks) - 1, time.perf_counter() - t1)


def worker_moelite(spec: dict) -> None:
    import torch

    import moelite
    from moelite.core.traces import Trace, TraceReplay

    torch.set_num_threads(spec["threads"])
    t0 = time.perf_counter()
    engine = moelite.load(spec["model"], device="cpu", **spec["config"])
    load_s = time.perf_counter() - t0
    if spec.get("replay"):
        engine.manager.set_replay(TraceReplay(Trace.load(spec["replay"]), engine.layout.layers, decode_only=True))
    engine.eos_ids = set()  # decode exactly max_tokens tokens, as every other engine here
    meter = Meter(len(spec["prompts"]), _proc_read_bytes())
    s = engine.stats()
    meter.extra.update({"load_s": load_s,
                        **{k: s.get(k) for k in ("expert_budget_bytes", "expert_budget_note", "routed_expert_bytes",
                                                 "expert_slots", "expert_slot_dtype", "expert_quant",
                                                 "dense_quantized_layers", "dense_dtype", "dense_bytes")}})
    meter.emit()  # the resolved budget reaches the parent even if the worker dies in the first prompt
    for _domain, ids in spec["prompts"]:
        g = engine.generate(ids, max_tokens=spec["max_tokens"], temperature=0)
        s = engine.stats()
        meter.extra.update(exact_hit_rate=s["exact_hit_rate"], decode_exact_hit_rate=s["decode_exact_hit_rate"],
                           expert_bytes_read=s["expert_bytes_read"], expert_substitutions=s["expert_substitutions"],
                           expert_budget_bytes=s["expert_budget_bytes"], expert_slots=s["expert_slots"],
                           resident_expert_bytes_peak=s["resident_expert_bytes_peak"])
        meter.prompt_done(g.token_ids, g.stats["ttft_s"], g.stats["completion_tokens"] - 1, g.stats.get("decode_s", 0.0))
    meter.emit(final=True)


def worker_hf(spec: dict) -> None:
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache

    torch.set_num_threads(spec["threads"])
    kw: dict = {"dtype": torch.bfloat16, "output_router_logits": False}
    if spec["hf"]["mode"] == "offload":
        kw.update(device_map="auto", max_memory={"cpu": int(spec["hf"]["max_memory"])},
                  offload_folder=spec["hf"]["offload_folder"])
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], **kw).eval()
    load_s = time.perf_counter() - t0
    meter = Meter(len(spec["prompts"]), _proc_read_bytes())
    dmap = getattr(model, "hf_device_map", None) or {}
    n_layers = model.config.num_hidden_layers
    on_disk = set()
    for name, where in dmap.items():
        if where == "disk":
            if name in ("model.layers", "model"):
                on_disk.update(range(n_layers))
            elif name.startswith("model.layers."):
                on_disk.add(int(name.split(".")[2]))
    meter.extra.update(load_s=load_s, hf_layers_on_disk=len(on_disk), hf_layers=n_layers,
                       hf_device_map={k: str(v) for k, v in dmap.items()} if len(dmap) <= 40 else "(long)")
    state: dict = {}

    @torch.inference_mode()
    def step(prompt_ids):
        if prompt_ids is not None:
            state["cache"] = DynamicCache(config=model.config)
            ids = torch.tensor([prompt_ids], dtype=torch.long)
        else:
            ids = torch.tensor([[state["tok"]]], dtype=torch.long)
        out = model(input_ids=ids, past_key_values=state["cache"], use_cache=True, logits_to_keep=1)
        state["tok"] = int(out.logits[0, -1].float().argmax())
        return state["tok"]

    for _domain, ids in spec["prompts"]:
        _decode_loop(step, ids, spec["max_tokens"], meter)
    meter.emit(final=True)


def worker_llama(spec: dict) -> None:
    from llama_cpp import Llama

    n_ctx = max(len(ids) for _, ids in spec["prompts"]) + spec["max_tokens"] + 16
    t0 = time.perf_counter()
    llm = Llama(model_path=spec["gguf"], n_ctx=max(256, n_ctx), n_batch=512, n_threads=spec["threads"],
                n_threads_batch=spec["threads"], use_mmap=True, use_mlock=False, seed=0, verbose=False)
    load_s = time.perf_counter() - t0
    meter = Meter(len(spec["prompts"]), _proc_read_bytes())
    meter.extra.update(load_s=load_s)
    state: dict = {}

    def step(prompt_ids):
        if prompt_ids is not None:
            state["gen"] = llm.generate(prompt_ids, temp=0.0, top_k=1, top_p=1.0, min_p=0.0, reset=True)
        return int(next(state["gen"]))

    for _domain, ids in spec["prompts"]:
        _decode_loop(step, ids, spec["max_tokens"], meter)
        state["gen"].close()
    meter.emit(final=True)


WORKERS = {"moelite": worker_moelite, "hf": worker_hf, "llama": worker_llama}


# ==== parent side ====================================================================================================
@dataclasses.dataclass
class Row:
    section: str
    label: str
    engine: str  # moelite | hf | llama
    model: str  # the source checkpoint's name (quantized rows too: agreement is against its bf16 reference)
    capped: bool
    spec: dict
    note: str = ""
    key: str = ""  # what the row is, for the summary: moelite_best_bf16, moelite_exact_int8, llama_int4, hf_offload...
    precision: str = "bf16"


def _drop_cache(paths: list[Path]) -> None:
    """Evict these files' pages (checkpoint shards, GGUF, offload folders) from the OS page cache: a cold start."""
    from moelite.eval.bench import drop_file_cache

    for p in paths:
        if p.is_dir():
            drop_file_cache(p)
            for f in p.rglob("*"):
                if f.is_file() and f.suffix in (".gguf", ".dat", ".safetensors"):
                    _fadvise_dontneed(f)
        elif p.is_file():
            _fadvise_dontneed(p)


def _fadvise_dontneed(f: Path) -> None:
    if not hasattr(os, "posix_fadvise"):
        return
    try:
        fd = os.open(f, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


class Cgroup:
    """moelite.eval.bench.MemoryCap plus the counters this benchmark reads (peak usage, OOM kills) and emptying."""

    def __init__(self, limit: int | None):
        from moelite.eval.bench import MemoryCap

        self.cap = MemoryCap(limit)
        self.note = self.cap.note
        self.applied = self.cap.path is not None
        self.v1 = self.applied and (self.cap.path / "memory.limit_in_bytes").exists()

    def _file(self, v1: str, v2: str) -> Path | None:
        return None if not self.applied else self.cap.path / (v1 if self.v1 else v2)

    def reset(self) -> None:
        """Reclaim the page cache still charged from earlier rows and zero the peak counter (cgroup v1)."""
        for name, val in (("memory.force_empty", "0"), ("memory.max_usage_in_bytes", "0")):
            f = self._file(name, "")
            if f is not None and self.v1:
                try:
                    f.write_text(val)
                except OSError:
                    pass

    def peak(self) -> int | None:
        f = self._file("memory.max_usage_in_bytes", "memory.peak")
        try:
            return int(f.read_text()) if f is not None else None
        except (OSError, ValueError):
            return None

    def oom_kills(self) -> int:
        f = self._file("memory.oom_control", "memory.events")
        try:
            for line in f.read_text().splitlines() if f is not None else []:
                if line.startswith("oom_kill "):
                    return int(line.split()[1])
        except (OSError, ValueError):
            pass
        return 0

    def preexec(self):
        return self.cap.preexec()

    def close(self) -> None:
        self.cap.close()


def run_row(row: Row, cgroup: Cgroup | None, timeout: float, cache_paths: list[Path]) -> dict:
    _drop_cache(cache_paths)
    if cgroup is not None:
        cgroup.reset()
    kills0 = cgroup.oom_kills() if cgroup is not None else 0
    join = cgroup.preexec() if cgroup is not None else None

    def pre():
        os.setsid()  # own process group, so a time-out kills the worker and any helper it started
        if join is not None:
            join()

    out = tempfile.TemporaryFile("w+")
    err = tempfile.TemporaryFile("w+")
    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(row.spec)],
                            stdout=out, stderr=err, text=True, preexec_fn=pre, cwd=str(ROOT))
    polled_read = polled_hwm = None
    timed_out = False
    while proc.poll() is None:
        rb, hwm = _proc_read_bytes(proc.pid), _proc_hwm(proc.pid)
        polled_read = rb if rb is not None else polled_read
        polled_hwm = max(polled_hwm or 0, hwm or 0) or polled_hwm
        if time.perf_counter() - t0 > timeout:
            timed_out = True
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            proc.wait()
            break
        time.sleep(0.25)
    wall = time.perf_counter() - t0
    out.seek(0)
    err.seek(0)
    lines = [json.loads(line[len(TAG):]) for line in out.read().splitlines() if line.startswith(TAG)]
    stderr_tail = [line for line in err.read().splitlines() if line.strip()][-3:]
    out.close()
    err.close()
    res: dict = dict(lines[-1]) if lines else {}
    res.pop("final", None)
    finished = bool(lines) and lines[-1].get("final") and proc.returncode == 0
    res.update(section=row.section, label=row.label, engine=row.engine, model=row.model, capped=row.capped,
               wall_s=wall, returncode=proc.returncode, survived=bool(finished), note=row.note, key=row.key,
               precision=row.precision, files=_row_files(row))
    if res.get("expert_budget_bytes"):
        res["note"] = "; ".join(x for x in (res["note"], _budget_text(row, res)) if x)
    if res.get("read_bytes") is None or (polled_read or 0) > res["read_bytes"]:
        res["read_bytes"] = polled_read
    res["peak_rss_bytes"] = max(res.get("peak_rss_bytes") or 0, polled_hwm or 0) or None
    if cgroup is not None:
        res["cgroup_peak_bytes"] = cgroup.peak()
    if not finished:
        kills = (cgroup.oom_kills() - kills0) if cgroup is not None else 0
        if timed_out:
            res["error"] = f"timed out after {timeout:.0f} s"
        elif kills > 0 or proc.returncode in (-9, 137):
            res["error"] = "killed by the OOM killer" + (" (memory cgroup)" if kills > 0 else "")
        else:
            res["error"] = f"exit {proc.returncode}: {(stderr_tail or ['?'])[-1][:300]}"
        if res.get("decode_tok_s") is not None:
            res["error"] += f"; figures from the {res.get('decode_tokens')} tokens decoded before that"
    return res


def not_run(row: Row, why: str) -> dict:
    return {"section": row.section, "label": row.label, "engine": row.engine, "model": row.model,
            "capped": row.capped, "survived": False, "not_run": True, "error": why, "note": row.note,
            "key": row.key, "precision": row.precision, "files": _row_files(row)}


def _row_files(row: Row) -> list[str]:
    return [row.spec[k] for k in ("model", "gguf") if row.spec.get(k)]


def _budget_text(row: Row, res: dict) -> str:
    """What a moelite row's expert budget came to: bytes, share of the routed experts, and moelite's own note."""
    asked = row.spec.get("config", {}).get("expert_budget")
    b, total = res["expert_budget_bytes"], res.get("routed_expert_bytes")
    share = f" = {b / total:.0%} of the routed experts ({_size(total)}" if total else " ("
    what = f"{share}{', ' + res['expert_quant'] if res.get('expert_quant') else ''}" \
           f"{', ' + res['expert_slot_dtype'] + ' slots' if res.get('expert_slot_dtype') else ''})"
    text = f"budget {asked!r} resolved to {_size(b)}{what}"
    if res.get("expert_budget_note"):
        text += f" [moelite: {res['expert_budget_note']}]"
    return text


# ---- set-up ---------------------------------------------------------------------------------------------------------
def _run(cmd: list[str], what: str, env: dict | None = None, timeout: float | None = None) -> tuple[bool, str]:
    print(f"# {what}: {' '.join(cmd)}", flush=True)
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout, cwd=str(ROOT))
    except subprocess.TimeoutExpired:
        return False, f"{what} timed out after {timeout:.0f} s"
    if p.returncode != 0:
        tail = [line for line in (p.stderr + p.stdout).splitlines() if line.strip()][-3:]
        return False, f"{what} failed (exit {p.returncode}): {' | '.join(tail)[:500]}"
    return True, ""


def _pinned(name: str) -> str | None:
    for line in REQUIREMENTS.read_text().splitlines():
        if line.split("==")[0].strip().lower() == name:
            return line.split("==")[1].strip()
    return None


def ensure_requirements(install: bool) -> dict:
    """Import-check accelerate and llama_cpp; pip-install benchmarks/requirements-h2h.txt when one is missing."""
    missing = [m for m in ("accelerate", "llama_cpp") if importlib.util.find_spec(m) is None]
    info: dict = {"missing_before": missing, "install_s": 0.0}
    if missing and install:
        env = dict(os.environ)
        env.setdefault("CMAKE_ARGS", DEFAULT_CMAKE_ARGS)
        env.setdefault("CMAKE_BUILD_PARALLEL_LEVEL", str(os.cpu_count() or 1))
        t0 = time.perf_counter()
        ok, why = _run([sys.executable, "-m", "pip", "install", "-r", str(REQUIREMENTS)],
                       f"installing {', '.join(missing)} (llama-cpp-python builds from source: minutes)", env=env)
        info["install_s"] = time.perf_counter() - t0
        if not ok:
            info["install_error"] = why
        importlib.invalidate_caches()
    info["accelerate"] = importlib.util.find_spec("accelerate") is not None
    info["llama_cpp"] = importlib.util.find_spec("llama_cpp") is not None
    for dist in ("accelerate", "llama-cpp-python", "transformers", "torch"):
        try:
            info[f"{dist}_version"] = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            info[f"{dist}_version"] = None
    return info


def ensure_converter(work: Path, version: str) -> tuple[Path | None, str]:
    """llama.cpp's convert_hf_to_gguf.py (+ conversion/, gguf-py/) from the llama-cpp-python source distribution."""
    src = work / f"llama.cpp-{version}"
    if (src / "convert_hf_to_gguf.py").is_file():
        return src, ""
    dl = work / "sdist"
    dl.mkdir(parents=True, exist_ok=True)
    tgz = dl / f"llama_cpp_python-{version}.tar.gz"
    if not tgz.is_file():
        ok, why = _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                        f"llama-cpp-python=={version}", "-d", str(dl)], "fetching the llama-cpp-python sdist")
        if not ok or not tgz.is_file():
            return None, why or f"pip download wrote no {tgz.name}"
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    keep = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")
    tmp = work / f"llama.cpp-{version}.partial"
    shutil.rmtree(tmp, ignore_errors=True)
    with tarfile.open(tgz) as tf:
        members = []
        for m in tf.getmembers():
            if m.name.startswith(prefix) and m.name[len(prefix):].startswith(keep):
                m.name = m.name[len(prefix):]
                members.append(m)
        tf.extractall(tmp, members=members, filter="data")
    if not (tmp / "convert_hf_to_gguf.py").is_file():
        return None, f"{tgz.name} has no vendor/llama.cpp/convert_hf_to_gguf.py"
    tmp.rename(src)
    return src, ""


def _stamp(folder: Path) -> dict:
    return {f.name: [f.stat().st_size, int(f.stat().st_mtime)] for f in sorted(folder.iterdir())
            if f.suffix in (".safetensors", ".json")}


def ensure_gguf(ckpt: Path, work: Path, converter: Path | None, outtype: str) -> tuple[Path | None, str, float]:
    out = work / "gguf" / f"{ckpt.name}-{outtype}.gguf"
    stamp_file = out.with_suffix(".source.json")
    stamp = _stamp(ckpt)
    if out.is_file() and stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return out, "", 0.0
    if converter is None:
        return None, "no converter", 0.0
    out.parent.mkdir(parents=True, exist_ok=True)
    runner = work / "convert_runner.py"
    runner.write_text(CONVERT_RUNNER)
    t0 = time.perf_counter()
    src = _with_architectures(ckpt, work)
    ok, why = _run([sys.executable, str(runner), str(converter), str(src), "--outtype", outtype, "--outfile",
                    str(out)], f"converting {ckpt.name} to GGUF ({outtype})")
    if not ok or not out.is_file():
        return None, why or "converter wrote no file", time.perf_counter() - t0
    stamp_file.write_text(json.dumps(stamp))
    return out, "", time.perf_counter() - t0


def _with_architectures(ckpt: Path, work: Path) -> Path:
    """The converter picks its model class from config.json's "architectures", which `moelite realshape` does not
    write; for such a checkpoint, a folder of symlinks to its files with that one field added (from transformers'
    causal-LM class for the model_type) is converted instead."""
    cfg = json.loads((ckpt / "config.json").read_text())
    if cfg.get("architectures"):
        return ckpt
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    cfg["architectures"] = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[cfg["model_type"]]]
    stage = work / "convert-src" / ckpt.name
    shutil.rmtree(stage, ignore_errors=True)
    stage.mkdir(parents=True)
    for f in ckpt.iterdir():
        if f.is_file() and f.name != "config.json":
            (stage / f.name).symlink_to(f.resolve())
    (stage / "config.json").write_text(json.dumps(cfg, indent=1))
    return stage


def ensure_gguf_quant(src: Path, ckpt_name: str, work: Path, qtype: str, threads: int) -> tuple[Path | None, str,
                                                                                                  float]:
    """A Q8_0 / Q4_0 GGUF made from the bf16 (or f16/f32) GGUF `src` with llama_cpp.llama_model_quantize."""
    out = work / "gguf" / f"{ckpt_name}.{qtype}.gguf"
    stamp_file = out.with_suffix(".source.json")
    try:
        version = importlib.metadata.version("llama-cpp-python")
    except importlib.metadata.PackageNotFoundError:
        version = None
    stamp = {src.name: [src.stat().st_size, int(src.stat().st_mtime)], "llama-cpp-python": version}
    if out.is_file() and stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return out, "", 0.0
    runner = work / "quant_runner.py"
    runner.write_text(QUANT_RUNNER)
    tmp = out.with_name(out.name + ".partial")
    t0 = time.perf_counter()
    ok, why = _run([sys.executable, str(runner), str(src), str(tmp), qtype, str(threads)],
                   f"quantizing {src.name} to {qtype} (llama_model_quantize)")
    if not ok or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        return None, why or "llama_model_quantize wrote no file", time.perf_counter() - t0
    tmp.rename(out)
    stamp_file.write_text(json.dumps(stamp))
    return out, "", time.perf_counter() - t0


def gguf_types(gguf: Path, converter: Path | None) -> tuple[dict | None, str]:
    """{tensor type: [tensor names, blk.N. dropped]} of a GGUF, read with the converter's gguf-py."""
    if converter is None:
        return None, ""
    try:
        p = subprocess.run([sys.executable, "-c", GGUF_TYPES_RUNNER, str(converter), str(gguf)], capture_output=True,
                           text=True, timeout=300)
        if p.returncode == 0:
            return json.loads(p.stdout.strip().splitlines()[-1]), ""
        return None, (p.stderr.strip().splitlines() or ["?"])[-1][:200]
    except (subprocess.TimeoutExpired, ValueError, IndexError) as exc:
        return None, str(exc)[:200]


def types_text(types: dict | None) -> str:
    """'Q4_0: attn_k, ...; F32: ...' with the type holding most tensors first."""
    if not types:
        return "tensor types unknown"
    return "tensor types " + "; ".join(f"{t}: {', '.join(names)}" for t, names in
                                       sorted(types.items(), key=lambda kv: -len(kv[1])))


def ensure_quantized(ckpt: Path, work: Path, bits: int) -> tuple[Path | None, str, float]:
    """`moelite quantize ckpt WORK/quantized/NAME-intB-g32-dense --bits B --group-size 32 --dense` (written beside
    and renamed when complete, redone when the source checkpoint or moelite's quantizer changed)."""
    import hashlib

    out = work / "quantized" / f"{ckpt.name}-int{bits}-g{GROUP_SIZE}-dense"
    stamp_file = out.with_name(out.name + ".source.json")
    quantizer = hashlib.sha256()  # moelite's quantizer and packed format: a copy written by an older one is redone
    for f in ("moelite/quantize.py", "moelite/core/quant.py"):
        quantizer.update((ROOT / f).read_bytes() if (ROOT / f).is_file() else b"")
    stamp = {"source": _stamp(ckpt), "quantizer": quantizer.hexdigest()}
    if (out / "config.json").is_file() and stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return out, "", 0.0
    tmp = out.with_name(out.name + ".partial")
    for d in (tmp, out):
        shutil.rmtree(d, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    ok, why = _run([sys.executable, "-m", "moelite", "quantize", str(ckpt), str(tmp), "--bits", str(bits),
                    "--group-size", str(GROUP_SIZE), "--dense", "--json"],
                   f"quantizing {ckpt.name} to int{bits} (moelite quantize --dense)")
    if not ok or not (tmp / "config.json").is_file():
        return None, why or "moelite quantize wrote no config.json", time.perf_counter() - t0
    tmp.rename(out)
    stamp_file.write_text(json.dumps(stamp))
    return out, "", time.perf_counter() - t0


def setup_checkpoint(ckpt: Path, tag: str, work: Path, converter: Path | None, args, setup: dict,
                     timings: dict) -> dict:
    """Everything the rows of one checkpoint need beyond the checkpoint itself, per precision: the quantized moelite
    checkpoints and the GGUFs (with their tensor types). {"quant": {prec: path}, "gguf": {prec: path},
    "types": {prec: text}, "errors": {prec: why}}; a missing piece's row is recorded as not run with the reason."""
    precs = args.precision_list
    files: dict = {"quant": {}, "gguf": {}, "types": {}, "errors": {}}
    for prec in precs:
        if prec in QUANT_BITS:
            path, why, timings[f"quantize_{tag}_{prec}_s"] = ensure_quantized(ckpt, work, QUANT_BITS[prec])
            if path is not None:
                files["quant"][prec] = path
            else:
                setup[f"quantize_error_{tag}_{prec}"] = files["errors"][f"moelite_{prec}"] = why
    if converter is None:
        for prec in precs:
            files["errors"][f"llama_{prec}"] = setup.get("llama_error", "llama.cpp not available")
        return files
    main = src = None
    if "bf16" in precs:
        main, why, timings[f"gguf_{tag}_s"] = ensure_gguf(ckpt, work, converter, args.gguf_type)
        if main is not None:
            files["gguf"]["bf16"] = main
        else:
            setup[f"llama_error_{tag}"] = files["errors"]["llama_bf16"] = \
                f"GGUF conversion of {ckpt.name} failed: {why}"
    quant = [p for p in precs if p in GGUF_QUANT]
    if quant:
        if main is not None and args.gguf_type in ("bf16", "f16", "f32"):
            src, why = main, ""
        else:
            src, why, timings[f"gguf_{tag}_bf16_s"] = ensure_gguf(ckpt, work, converter, "bf16")
        for prec in quant:
            if src is None:
                files["errors"][f"llama_{prec}"] = f"no bf16 GGUF of {ckpt.name} to quantize: {why}"
                continue
            q, qwhy, timings[f"gguf_{tag}_{GGUF_QUANT[prec].lower()}_s"] = \
                ensure_gguf_quant(src, ckpt.name, work, GGUF_QUANT[prec], args.threads)
            if q is not None:
                files["gguf"][prec] = q
            else:
                setup[f"llama_error_{tag}_{prec}"] = files["errors"][f"llama_{prec}"] = \
                    f"{GGUF_QUANT[prec]} quantization of {src.name} failed: {qwhy}"
    for prec, g in files["gguf"].items():
        types, why = gguf_types(g, converter)
        files["types"][prec] = types_text(types) + (f" ({why})" if why else "")
        setup.setdefault("gguf_tensor_types", {})[g.name] = types
    return files


def ensure_realshape(path: Path, demo: Path, layers: int) -> tuple[bool, str, float]:
    if (path / "config.json").is_file() and any(path.glob("*.safetensors")):
        return True, "", 0.0
    t0 = time.perf_counter()
    ok, why = _run([sys.executable, "-m", "moelite", "realshape", str(path), "--layers", str(layers),
                    "--tokenizer-from", str(demo), "--force"], "writing the real-shape checkpoint")  # over a partial one
    return ok, why, time.perf_counter() - t0


def ensure_trace(work: Path, demo: Path) -> tuple[Path | None, str, float]:
    out = work / "demo_trace.npz"
    stamp_file = work / "demo_trace.source.json"
    stamp = _stamp(demo)
    if out.is_file() and stamp_file.is_file() and json.loads(stamp_file.read_text()) == stamp:
        return out, "", 0.0
    t0 = time.perf_counter()
    ok, why = _run([sys.executable, "-m", "moelite", "trace", "--model", str(demo), "--out", str(out),
                    "--max-tokens", "64", "--repeat", "2", "--expert-budget", "100%"], "recording the demo trace")
    if not ok:
        return None, why, time.perf_counter() - t0
    stamp_file.write_text(json.dumps(stamp))
    return out, "", time.perf_counter() - t0


# ---- plan -----------------------------------------------------------------------------------------------------------
def _bytes_split(ckpt: Path) -> tuple[int, int]:
    """(dense bytes, routed-expert bytes) of a checkpoint as stored on disk."""
    from moelite.core.checkpoint import Checkpoint

    dense = experts = 0
    for name, t in Checkpoint.open(ckpt).tensors.items():
        if ".mlp.experts." in name:
            experts += t.nbytes
        else:
            dense += t.nbytes
    return dense, experts


def _prompts(ckpt: Path, n: int) -> list[tuple[str, list[int]]]:
    """n prompts spread over the built-in three-domain prompt set, tokenized once with the checkpoint's tokenizer."""
    from transformers import AutoTokenizer

    from moelite.eval.prompts import load_prompts

    allp = load_prompts(None)
    pick = [allp[round(i * len(allp) / n) % len(allp)] for i in range(n)]
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    return [(d, tok.encode(p, add_special_tokens=True)) for d, p in pick]


def _substitution_available() -> bool:
    from moelite.config import EngineConfig

    try:
        EngineConfig(substitution_alpha=0.25).validate()
        return True
    except (TypeError, ValueError):
        return False


def _budget_share(budget: str, experts: int) -> tuple[str, float | None]:
    """("auto", None) | ("fraction", f) | ("bytes", n): a budget as the HF row needs it (bytes of routed experts)."""
    from moelite.config import parse_budget

    if str(budget).strip().lower() == "auto":
        return "auto", None
    kind, v = parse_budget(budget)
    return kind, (v * experts if kind == "fraction" else v)


def plan(args, demo: Path, rs: Path | None, demo_files: dict, rs_files: dict, trace, setup_notes: dict) -> list[tuple]:
    """[(section, cap bytes or None, [Row])]."""
    best = dict(DEFAULT_BEST, **json.loads(args.moelite_best))
    if not _substitution_available():
        best.pop("substitution_alpha", None)
        setup_notes["substitution"] = "not in this build of moelite: 'best' runs without substitution"
    exact = dict(best, substitution_alpha=0.0) if "substitution_alpha" in best else dict(best)
    upper = {"expert_budget": "100%", "warm_start": True, "cache_policy": "lru", "prefetch": False,
             "io_threads": best.get("io_threads", 2), "expert_dtype": best.get("expert_dtype", "auto")}
    precs = args.precision_list
    work = Path(args.work)
    common = {"threads": args.threads}
    budget = args.budget
    sections = []

    def rows_for(section, ckpt: Path, files: dict, n_prompts, max_tokens, capped: bool, replay=None):
        prompts = _prompts(ckpt, n_prompts)
        base = dict(common, model=str(ckpt), prompts=prompts, max_tokens=max_tokens)
        dense, experts = _bytes_split(ckpt)
        rows = []

        def moe(key, prec, label, config, note, path=None, capped_=None, **extra):
            if prec != "bf16" and path is None:
                return Row(section, label, "moelite", ckpt.name, capped if capped_ is None else capped_,
                           {"engine": "moelite"}, files["errors"].get(f"moelite_{prec}", "no quantized checkpoint"),
                           key, prec)
            return Row(section, label, "moelite", ckpt.name, capped if capped_ is None else capped_,
                       dict(base, engine="moelite", model=str(path or ckpt), config=config, **extra), note, key, prec)

        def llama(prec):
            gtype = args.gguf_type if prec == "bf16" else GGUF_QUANT[prec]
            label = f"llama.cpp {gtype} (llama-cpp-python, mmap)"
            g = files["gguf"].get(prec)
            if g is None:
                return Row(section, label, "llama", ckpt.name, capped, {"engine": "llama"},
                           files["errors"].get(f"llama_{prec}", "llama.cpp not available"), f"llama_{prec}", prec)
            how = ("converter --outtype " + gtype) if prec == "bf16" else \
                f"llama_model_quantize LLAMA_FTYPE_MOSTLY_{gtype} from the {Path(g).name.split('.')[0]} bf16 GGUF"
            note = (f"{gtype} GGUF ({how}), use_mmap, page cache = expert cache"
                    + (" (no budget knob; the cgroup caps it)" if capped else "")
                    + f"; {files['types'].get(prec, 'tensor types unknown')}")
            return Row(section, label, "llama", ckpt.name, capped, dict(base, engine="llama", gguf=str(g)), note,
                       f"llama_{prec}", prec)

        def qnote(prec):
            b = QUANT_BITS[prec]
            return f"moelite quantize --bits {b} --group-size {GROUP_SIZE} --dense (int{b} experts and dense linears)"

        if not capped:
            rows.append(moe("upper_bound", "bf16", "upper bound: moelite, all experts resident", upper,
                            "bf16, 100% budget, warm start, no cap"))
            if "bf16" in precs:
                rows.append(Row(section, "HF transformers, all in RAM", "hf", ckpt.name, False,
                                dict(base, engine="hf", hf={"mode": "ram"}), "bf16, no offloading", "hf_ram"))
                rows.append(llama("bf16"))
            for prec in (p for p in precs if p in QUANT_BITS):
                rows.append(moe(f"moelite_{prec}_resident", prec,
                                f"moelite {prec} (--dense), all experts resident", upper,
                                qnote(prec) + "; 100% budget, warm start, no cap", files["quant"].get(prec)))
                rows.append(llama(prec))
        else:
            if "bf16" in precs:
                alpha = best.get("substitution_alpha", 0)
                rows.append(moe("moelite_best_bf16", "bf16", f"moelite best bf16 ({budget})",
                                dict(best, expert_budget=budget), ", ".join(f"{k}={v}" for k, v in best.items())))
                rows.append(moe("moelite_exact_bf16", "bf16", f"moelite exact bf16 ({budget}, no substitution)",
                                dict(exact, expert_budget=budget),
                                "as best, substitution_alpha=0" if alpha else "best has no substitution"))
                hf_budget = args.hf_budget or budget
                kind, hf_experts = _budget_share(hf_budget, experts)
                off = work / "hf_offload" / ckpt.name
                hf = {"mode": "offload", "offload_folder": str(off), "dense": dense, "experts": experts}
                if kind == "auto":
                    hf.update(max_memory=None, budget_from=["moelite_exact_bf16", "moelite_best_bf16"])
                    note = ("bf16, device_map=auto, max_memory cpu = dense + the share of the routed experts "
                            "moelite's 'auto' resolved to (moelite exact bf16 row), rest to disk")
                else:
                    hf.update(max_memory=int(dense + hf_experts))
                    note = (f"bf16, device_map=auto, max_memory cpu={_size(dense + hf_experts)} "
                            f"(dense + {hf_budget} of experts), rest to disk")
                rows.append(Row(section, "HF transformers + accelerate offload", "hf", ckpt.name, True,
                                dict(base, engine="hf", hf=hf), note, "hf_offload"))
                rows.append(llama("bf16"))
            for prec in (p for p in precs if p in QUANT_BITS):
                rows.append(moe(f"moelite_exact_{prec}", prec, f"moelite exact {prec} (--dense, {budget})",
                                dict(exact, expert_budget=budget), qnote(prec) + "; substitution off",
                                files["quant"].get(prec)))
                rows.append(llama(prec))
        if capped and section.startswith("real-shape"):
            rows.append(moe("upper_bound", "bf16", "upper bound: moelite, all experts resident (no cap)", upper,
                            "bf16, 100% budget, warm start, no cap", capped_=False))
            if replay is not None and "bf16" in precs:
                rows.append(moe("moelite_best_bf16_replay", "bf16", f"moelite best bf16 ({budget}) + demo-trace replay",
                                dict(best, expert_budget=budget),
                                "routing replaced by the trained demo model's recorded routing (not comparable "
                                "with the other engines' own routing)", replay=str(replay)))
        return rows

    want = set(args.sections.split(","))
    if "demo" in want:
        sections.append(("demo, uncapped", None,
                         rows_for("demo, uncapped", demo, demo_files, args.demo_prompts, args.demo_tokens, False)))
        name = f"demo, capped ({budget}, {args.demo_cap} cgroup)"
        sections.append((name, args.demo_cap,
                         rows_for(name, demo, demo_files, args.demo_prompts, args.demo_tokens, True)))
    if "realshape" in want and rs is not None:
        name = f"real-shape, capped ({budget}, {args.rs_cap} cgroup)"
        sections.append((name, args.rs_cap, rows_for(name, rs, rs_files, args.rs_prompts, args.rs_tokens, True,
                                                     replay=trace)))
    return sections


def resolve_hf_budget(row: Row, done: list[dict]) -> None:
    """An HF offload row planned with --budget auto: max_memory = dense + the share of the routed experts that the
    named moelite row (run earlier in the same section) resolved 'auto' to, read from its engine.stats()."""
    hf = row.spec.get("hf", {})
    if hf.get("max_memory") is not None or not hf.get("budget_from"):
        return
    src = None
    for key in hf["budget_from"]:
        src = next((r for r in done if r.get("section") == row.section and r.get("key") == key
                    and r.get("expert_budget_bytes") and r.get("routed_expert_bytes")), None)
        if src is not None:
            break
    if src is not None:
        share = min(1.0, src["expert_budget_bytes"] / src["routed_expert_bytes"])
        why = f"the {share:.1%} moelite's 'auto' resolved to in '{src['label']}'"
    else:
        share = 0.25
        why = "25%: no moelite bf16 row reported what 'auto' resolved to (not run, or failed before load)"
    hf["max_memory"] = int(hf["dense"] + share * hf["experts"])
    hf["share"] = share
    row.note = (f"bf16, device_map=auto, max_memory cpu={_size(hf['max_memory'])} (dense {_size(hf['dense'])} + "
                f"{_size(share * hf['experts'])} of experts = {why}), rest to disk")



# ---- report ---------------------------------------------------------------------------------------------------------
def _size(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def _gib(b) -> str:
    return f"{b / 2**30:.2f}" if isinstance(b, (int, float)) and b is not None else "-"


def _agree(rows: list[dict]) -> None:
    """Token agreement of each row with the all-resident moelite row of the same checkpoint (not for replay rows)."""
    refs = {r["model"]: r for r in rows if r.get("key") == "upper_bound" and r.get("survived")}
    for r in rows:
        ref = refs.get(r["model"])
        if ref is None or not r.get("token_ids") or "replay" in r.get("key", ""):
            continue
        same = total = 0
        for a, b in zip(r["token_ids"], ref["token_ids"]):
            n = min(len(a), len(b))
            same += sum(x == y for x, y in zip(a[:n], b[:n]))
            total += n
        r["agree_with_exact"] = same / total if total else None


COLS = ("engine / configuration", "decode tok/s", "TTFT s", "read GiB (gen)", "peak RSS GiB", "cgroup peak GiB",
        "agree", "survived")


def table_rows(rows: list[dict]) -> list[list[str]]:
    out = []
    for r in rows:
        ok = "yes" if r.get("survived") else ("not run" if r.get("not_run") else "NO")
        tok = f"{r['decode_tok_s']:.2f}" if r.get("decode_tok_s") else "-"
        ttft = f"{r['ttft_s']:.2f}" if r.get("ttft_s") else "-"
        rd = f"{_gib(r.get('read_bytes'))} ({_gib(r.get('read_bytes_gen'))})" if r.get("read_bytes") is not None else "-"
        ag = f"{r['agree_with_exact']:.0%}" if r.get("agree_with_exact") is not None else "-"
        label = r["label"] + ("" if r.get("capped") or "uncapped" in r["section"] else " [uncapped]")
        out.append([label, tok, ttft, rd, _gib(r.get("peak_rss_bytes")), _gib(r.get("cgroup_peak_bytes")), ag, ok])
    return out


def print_table(rows: list[dict]) -> str:
    lines = []
    for section in dict.fromkeys(r["section"] for r in rows):
        sub = [r for r in rows if r["section"] == section]
        lines.append(f"\n## {section}")
        body = table_rows(sub)
        w = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(COLS)]
        lines.append("  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(COLS)))
        for b, r in zip(body, sub):
            lines.append("  ".join(c.ljust(w[i]) if i == 0 else c.rjust(w[i]) for i, c in enumerate(b)))
            if r.get("error"):
                lines.append(f"    -> {r['error']}")
    return "\n".join(lines)


def markdown(result: dict) -> str:
    md = [f"Head to head: {result['date']}, {result['hardware']}", "", f"Command: `{result['command']}`", ""]
    for section in dict.fromkeys(r["section"] for r in result["rows"]):
        sub = [r for r in result["rows"] if r["section"] == section]
        md += [f"**{section}** ({result['caps'].get(section, '')})", "", "| " + " | ".join(COLS) + " |",
               "|" + "---|" * len(COLS)]
        md += ["| " + " | ".join(b) + " |" for b in table_rows(sub)]
        notes = [f"{r['label']}: {r['note']}" + (f" -- **{r['error']}**" if r.get("error") else "")
                 for r in sub if r.get("note") or r.get("error")]
        md += [""] + [f"- {n}" for n in notes] + ([""] if notes else [])
    return "\n".join(md) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colors = {"moelite": "tab:blue", "hf": "tab:orange", "llama": "tab:green"}
    short = {"demo, uncapped": "demo", "demo": "demo cap", "real-shape": "real-shape"}
    labels, sec_of = [], []
    for r in rows:
        sec = next((v for k, v in short.items() if r["section"].startswith(k)), r["section"])
        sec_of.append(sec)
        labels.append(f"{sec}: {r['label']}")
    metrics = (("decode_tok_s", "decode tokens/s (log)", True), ("ttft_s", "TTFT s (log)", True),
               ("read_bytes", "read from disk, GiB", False), ("peak_rss_bytes", "peak RSS, GiB", False))
    fig, axes = plt.subplots(1, 4, figsize=(20, 0.36 * len(rows) + 2), sharey=True)
    y = list(range(len(rows)))[::-1]
    for ax, (key, title, log) in zip(axes, metrics):
        vals = []
        for r in rows:
            v = r.get(key)
            vals.append((v / 2**30 if key.endswith("bytes") else v) if v else 0)
        ax.barh(y, vals, color=[colors.get(r["engine"], "grey") for r in rows],
                alpha=1.0, edgecolor=["black" if r.get("survived") else "red" for r in rows])
        for yi, v, r in zip(y, vals, rows):
            txt = f"{v:.3g}" if v else ""
            if not r.get("survived"):
                txt += " (not run)" if r.get("not_run") else (" (timeout)" if "timed out" in r.get("error", "")
                                                              else " (failed)")
            ax.text(v if v else 0, yi, " " + txt, va="center", fontsize=7)
        if log and any(vals):
            ax.set_xscale("log")
            pos = [v for v in vals if v > 0]
            ax.set_xlim(min(pos) / 3, max(pos) * 6)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="x", alpha=0.3)
        prev = None
        for yi, s in zip(y, sec_of):
            if prev is not None and s != prev:
                ax.axhline(yi + 0.5, color="grey", linewidth=0.6)
            prev = s
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(labels, fontsize=7)
    fig.suptitle("moelite vs HF accelerate offload vs llama.cpp (same prompts, same memory cgroup per section; "
                 "red edge = did not finish)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def summary(rows: list[dict]) -> dict:
    """The real-shape section's decode speeds by row key, the ratios the open issue asks about, and its goals:
    moelite exact >= llama.cpp at each precision (bf16, int8 vs Q8_0, int4 vs Q4_0) and every capped moelite row
    >= 5x HF accelerate offload."""
    rs = [r for r in rows if r["section"].startswith("real-shape")]
    tok = {r["key"]: r.get("decode_tok_s") for r in rs if r.get("key")}
    ratio = lambda a, b: a / b if a and b else None  # noqa: E731
    hf = tok.get("hf_offload")
    moelite_keys = [k for k in tok if k.startswith("moelite_") and "replay" not in k]
    over_llama = {p: ratio(tok.get(f"moelite_exact_{p}"), tok.get(f"llama_{p}")) for p in PRECISIONS
                  if f"moelite_exact_{p}" in tok or f"llama_{p}" in tok}
    over_hf = {k: ratio(tok[k], hf) for k in moelite_keys}
    goals = {f"moelite_exact_{p}_ge_llama_{p}": (v >= 1.0 if v is not None else None) for p, v in over_llama.items()}
    if over_hf:  # None when HF offload has no decode speed (not run, or killed before its first tokens)
        goals["every_moelite_ge_5x_hf"] = None if hf is None else all(v is not None and v >= 5.0
                                                                       for v in over_hf.values())
    auto = {r["key"]: round(r["expert_budget_bytes"] / r["routed_expert_bytes"], 4) for r in rs
            if r.get("engine") == "moelite" and r.get("expert_budget_bytes") and r.get("routed_expert_bytes")}
    return {"realshape_decode_tok_s": tok, "moelite_exact_over_llama": over_llama, "moelite_over_hf": over_hf,
            "goals": goals, "realshape_expert_budget_share": auto,
            "realshape_errors": {r["key"]: r["error"] for r in rs if r.get("error") and r.get("key")},
            "moelite_best_over_hf": ratio(tok.get("moelite_best_bf16"), hf),
            "moelite_best_over_llama": ratio(tok.get("moelite_best_bf16"), tok.get("llama_bf16")),
            "all_survived": all(r.get("survived") for r in rows if not r.get("not_run"))}


def print_plan(sections: list[tuple], args) -> None:
    """--dry-run: the rows that would run, section by section, with their files, configuration and time limit."""
    for name, cap, rows in sections:
        timeout = args.rs_timeout if name.startswith("real-shape") else args.demo_timeout
        print(f"\n## {name}: {'cgroup of ' + cap if cap else 'no memory cgroup'}; {timeout:g} s per row")
        for row in rows:
            spec = row.spec
            what = {k: v for k, v in spec.items() if k in ("model", "gguf", "config", "hf", "replay")}
            if "model" not in spec and "gguf" not in spec:
                what = {"NOT RUN": row.note}
            print(f"  [{row.key or '-'}] {row.label}  ({row.engine}, {row.precision}, "
                  f"{'capped' if row.capped else 'uncapped'})")
            print(f"      {json.dumps(what, default=str)}")
            if row.note and "NOT RUN" not in what:
                print(f"      note: {row.note}")


# ---- main -----------------------------------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", default=os.environ.get("MOELITE_H2H_WORK", "/tmp/moelite-h2h"),
                   help="work folder for the real-shape checkpoint, GGUFs, trace, converter, offload folders")
    p.add_argument("--realshape", default=None, help="real-shape checkpoint folder (default WORK/rs-qwen3-64e; "
                                                     "written with `moelite realshape` when missing)")
    p.add_argument("--realshape-layers", type=int, default=8)
    p.add_argument("--demo", default=None, help="demo checkpoint (default: moelite's embedded demo model)")
    p.add_argument("--sections", default="demo,realshape", help="comma list of: demo, realshape")
    p.add_argument("--budget", default="auto", help="moelite expert budget of the capped rows: 'auto' (fills what "
                                                     "the cgroup leaves), a percentage or a size; HF gets dense + the "
                                                     "same share of the routed experts")
    p.add_argument("--hf-budget", default=None, help="HF offload's share of the routed experts instead (a percentage "
                                                      "or size; default: what --budget resolved to)")
    p.add_argument("--precisions", default=",".join(PRECISIONS),
                   help="comma list of the precisions whose rows run: bf16 (moelite bf16, HF, llama.cpp --gguf-type), "
                        "int8 (moelite quantize --bits 8 --dense vs llama.cpp Q8_0), int4 (--bits 4 vs Q4_0)")
    p.add_argument("--demo-cap", default="1.5GiB", help="memory cgroup for the capped demo section")
    p.add_argument("--rs-cap", default="4GiB", help="memory cgroup for the real-shape section (below its 4.8 GB)")
    p.add_argument("--demo-prompts", type=int, default=3)
    p.add_argument("--demo-tokens", type=int, default=32)
    p.add_argument("--rs-prompts", type=int, default=2)
    p.add_argument("--rs-tokens", type=int, default=16)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="compute threads for every engine")
    p.add_argument("--moelite-best", default="{}", help="JSON overrides of moelite's best configuration "
                                                         f"(default {json.dumps(DEFAULT_BEST)})")
    p.add_argument("--gguf-type", default="bf16", choices=["bf16", "f16", "q8_0", "f32"],
                   help="GGUF weight type of the bf16-precision llama.cpp row (bf16 = the checkpoint's own bytes); "
                        "the Q8_0/Q4_0 GGUFs are always quantized from a bf16 (or f16/f32) GGUF")
    p.add_argument("--demo-timeout", type=float, default=120, help="seconds per demo row")
    p.add_argument("--rs-timeout", type=float, default=360, help="seconds per real-shape row")
    p.add_argument("--budget-min", type=float, default=50,
                   help="time budget of the whole run in minutes, set-up included (a first llama-cpp-python build "
                        "excluded); rows that would start after it are recorded as not run")
    p.add_argument("--dry-run", action="store_true", help="do the set-up (what is missing), print the planned rows "
                                                          "and exit without running any")
    p.add_argument("--install", action=argparse.BooleanOptionalAction, default=True,
                   help="pip-install benchmarks/requirements-h2h.txt when accelerate or llama_cpp is missing")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "h2h"))
    args = p.parse_args(argv)
    args.precision_list = [x.strip() for x in args.precisions.split(",") if x.strip()]
    bad = [x for x in args.precision_list if x not in PRECISIONS]
    if bad or not args.precision_list:
        p.error(f"--precisions: {', '.join(bad) or 'none given'}; give a comma list of {', '.join(PRECISIONS)}")
    bad = [x for x in args.sections.split(",") if x not in ("demo", "realshape")]
    if bad:
        p.error(f"--sections: {', '.join(bad)}; give a comma list of demo, realshape")

    t_start = time.perf_counter()
    from moelite.eval.bench import hardware
    from moelite.config import parse_budget
    from moelite.demo import demo_model_path

    for flag, value in (("--budget", args.budget), ("--hf-budget", args.hf_budget)):
        try:
            if value is not None and (flag == "--hf-budget" or value.strip().lower() != "auto"):
                parse_budget(value)
        except ValueError as exc:
            p.error(f"{flag}: {exc}")
    work = Path(args.work).resolve()
    work.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    demo = Path(args.demo).resolve() if args.demo else demo_model_path()
    setup: dict = {}
    timings: dict = {}

    # 1. optional requirements, llama.cpp's converter, checkpoints, trace, GGUFs
    setup["requirements"] = ensure_requirements(args.install)
    timings["install_s"] = setup["requirements"]["install_s"]
    deadline = t_start + timings["install_s"] + args.budget_min * 60
    converter = None
    if setup["requirements"]["llama_cpp"]:
        version = setup["requirements"]["llama-cpp-python_version"] or _pinned("llama-cpp-python")
        converter, why = ensure_converter(work, version)
        if why:
            setup["llama_error"] = f"llama.cpp converter unavailable: {why}"
    else:
        setup["llama_error"] = ("llama-cpp-python not installed" +
                                (f": {setup['requirements'].get('install_error')}"
                                 if setup["requirements"].get("install_error") else " (--no-install)"))
    rs = None
    want = set(args.sections.split(","))
    if "realshape" in want:
        rs = Path(args.realshape).resolve() if args.realshape else work / "rs-qwen3-64e"
        ok, why, timings["realshape_s"] = ensure_realshape(rs, demo, args.realshape_layers)
        if not ok:
            setup["realshape_error"] = why
            rs = None
    trace = None
    if rs is not None:
        trace, why, timings["trace_s"] = ensure_trace(work, demo)
        if why:
            setup["trace_error"] = why
    demo_files = setup_checkpoint(demo, "demo", work, converter, args, setup, timings) if "demo" in want else None
    rs_files = setup_checkpoint(rs, "realshape", work, converter, args, setup, timings) if rs is not None else None
    timings["setup_s"] = time.perf_counter() - t_start
    for k, v in setup.items():
        if "error" in k:
            print(f"# {k}: {v}", flush=True)

    # 2. rows, section by section, each capped section in one cgroup
    sections = plan(args, demo, rs, demo_files, rs_files, trace, setup)
    if args.dry_run:
        print_plan(sections, args)
        print(json.dumps({"dry_run": True, "rows": sum(len(r) for _, _, r in sections), "setup": setup,
                          "timings": timings}, default=str))
        return 0
    results: list[dict] = []
    caps: dict = {}
    for name, cap, rows in sections:
        cgroup = Cgroup(int(parse_budget(cap)[1])) if cap else None
        caps[name] = cgroup.note if cgroup else "no memory cgroup"
        print(f"\n# section {name}: {caps[name]}", flush=True)
        timeout = args.rs_timeout if name.startswith("real-shape") else args.demo_timeout
        try:
            for row in rows:
                left = deadline - time.perf_counter()
                if "model" not in row.spec:  # a piece of its set-up is missing: the note says which and why
                    res = not_run(row, row.note)
                elif left < 30:
                    res = not_run(row, f"not run: the run's time budget (--budget-min {args.budget_min:g}) was spent")
                else:
                    paths = [Path(row.spec["model"])] + ([Path(row.spec["gguf"])] if row.spec.get("gguf") else [])
                    resolve_hf_budget(row, results)
                    off = row.spec.get("hf", {}).get("offload_folder")
                    if off:
                        shutil.rmtree(off, ignore_errors=True)
                    res = run_row(row, cgroup if row.capped else None, min(timeout, left - 10), paths)
                    if off:
                        shutil.rmtree(off, ignore_errors=True)
                if not row.capped and cgroup is not None:
                    res["note"] = (res.get("note") or "") + " (outside the cgroup)"
                results.append(res)
                tok = f"{res['decode_tok_s']:.2f} tok/s" if res.get("decode_tok_s") else "-"
                print(f"  {row.label:<56} {tok:>14}  {'ok' if res.get('survived') else res.get('error', '')}",
                      flush=True)
        finally:
            if cgroup is not None:
                cgroup.close()

    _agree(results)
    result = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "hardware": hardware(),
              "command": "python3 benchmarks/head_to_head.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "caps": caps, "setup": setup, "timings": timings, "threads": args.threads,
              "budget": args.budget, "precisions": args.precision_list,
              "prompts": {"demo": [args.demo_prompts, args.demo_tokens], "realshape": [args.rs_prompts, args.rs_tokens]},
              "rows": results, "summary": summary(results)}
    result["timings"]["total_s"] = time.perf_counter() - t_start
    (out / "results.json").write_text(json.dumps(result, indent=1))
    (out / "results.md").write_text(markdown(result))
    plot(results, out / "h2h.png")
    print(print_table(results), flush=True)
    print(json.dumps({"summary": result["summary"], "hardware": result["hardware"], "caps": caps,
                      "total_s": round(result["timings"]["total_s"], 1), "results": str(out / "results.json"),
                      "png": str(out / "h2h.png")}))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        spec = json.loads(sys.argv[2])
        WORKERS[spec["engine"]](spec)
    else:
        sys.exit(main())
