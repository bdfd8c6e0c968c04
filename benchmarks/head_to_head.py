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
  agree          the fraction of generated token ids equal to the all-resident moelite run's at the same position
                 (same checkpoint, same prompts): how close each engine's greedy output is to the exact model

Engines (rows):
  moelite best        moelite.load(expert_budget=--budget, ...) with the best configuration (--moelite-best; by
                      default score-window eviction + next-layer prefetch + hybrid miss path + substitution alpha
                      0.25 when this build has substitution)
  moelite exact       the same with substitution off (alpha 0): output equals the model's
  HF offload          transformers + accelerate: from_pretrained(device_map="auto", max_memory={"cpu": dense + the
                      same fraction of the routed experts}, offload_folder=...), bf16 (the checkpoint's dtype): the
                      modules that do not fit are offloaded to disk and read back on every forward pass
  llama.cpp           llama-cpp-python on a bf16 GGUF made with the convert_hf_to_gguf.py shipped in llama-cpp-python's
                      own source distribution (vendor/llama.cpp), use_mmap=True, no mlock: the OS page cache (inside
                      the cgroup) is its only expert cache; it has no expert budget of its own
  upper bound         moelite with every expert resident (100% budget, warm start), no memory cap
  moelite + replay    moelite best on the real-shape checkpoint with its routing replaced by a recorded routing trace of
                      the trained demo model (realistic locality); a different routing, so a separate labelled row

Sections: the demo model uncapped (no cgroup, everything resident), the demo model capped (--budget, inside a memory
cgroup of --demo-cap) and the real-shape checkpoint (random weights with Qwen3-30B-A3B expert shapes, 64 experts,
top-8, 8 layers, ~4.5 GiB of routed experts, 4.8 GB on disk; each engine with its own routing) inside a memory cgroup
of --rs-cap, smaller than the checkpoint. Each section's capped rows share ONE cgroup (cgroup v1 memory controller or
cgroup v2, needs root); where it cannot be created, the rows run uncapped and the output says so. The cgroup's
leftover page cache is emptied (memory.force_empty) before every row.

Set-up done by the script when missing (all under --work, never in the repository): the optional requirements
(benchmarks/requirements-h2h.txt; llama-cpp-python builds from source), llama.cpp's converter (from the pinned
llama-cpp-python source distribution, fetched with pip download), the real-shape checkpoint (`moelite realshape`), the
demo-model routing trace (`moelite trace`), and the GGUF files. The demo tokenizer's byte-level BPE pre-tokenizer is
not in the converter's table of known tokenizer hashes; the converter is run unchanged through a small wrapper that
falls back to the "gpt-2" pre-tokenizer in that one case (token ids are passed to llama.cpp directly anyway).

Writes benchmarks/results/h2h/{results.json, results.md, h2h.png} (or --out), prints the table, and ends with one
JSON line. Every row has a time limit and the whole run a time budget (--budget-min): rows that do not fit are
recorded as not run.

  python3 benchmarks/head_to_head.py                      # everything, ~20-30 min on 2 cores (plus the first build)
  python3 benchmarks/head_to_head.py --sections demo      # the demo-model sections only (a minute or two)
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
    meter.extra["load_s"] = load_s
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
    model: str
    capped: bool
    spec: dict
    note: str = ""


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
               wall_s=wall, returncode=proc.returncode, survived=bool(finished), note=row.note)
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
            "capped": row.capped, "survived": False, "not_run": True, "error": why, "note": row.note}


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


def plan(args, demo: Path, rs: Path | None, demo_gguf, rs_gguf, trace, setup_notes: dict) -> list[tuple]:
    """[(section, cap bytes or None, [Row])]."""
    from moelite.config import parse_budget

    best = dict(DEFAULT_BEST, **json.loads(args.moelite_best))
    if not _substitution_available():
        best.pop("substitution_alpha", None)
        setup_notes["substitution"] = "not in this build of moelite: 'best' runs without substitution"
    exact = dict(best, substitution_alpha=0.0) if "substitution_alpha" in best else dict(best)
    upper = {"expert_budget": "100%", "warm_start": True, "cache_policy": "lru", "prefetch": False,
             "io_threads": best.get("io_threads", 2), "expert_dtype": best.get("expert_dtype", "auto")}
    kind, frac = parse_budget(args.budget)
    work = Path(args.work)
    common = {"threads": args.threads}
    sections = []

    def rows_for(section, ckpt: Path, gguf, n_prompts, max_tokens, capped: bool, replay=None):
        prompts = _prompts(ckpt, n_prompts)
        base = dict(common, model=str(ckpt), prompts=prompts, max_tokens=max_tokens)
        dense, experts = _bytes_split(ckpt)
        hf_mem = dense + (frac * experts if kind == "fraction" else frac)
        rows = []
        if not capped:
            rows.append(Row(section, "upper bound: moelite, all experts resident", "moelite", ckpt.name, False,
                            dict(base, engine="moelite", config=upper), "100% budget, warm start, no cap"))
            rows.append(Row(section, "HF transformers, all in RAM", "hf", ckpt.name, False,
                            dict(base, engine="hf", hf={"mode": "ram"}), "bf16, no offloading"))
        else:
            alpha = best.get("substitution_alpha", 0)
            rows.append(Row(section, f"moelite best ({args.budget})", "moelite", ckpt.name, True,
                            dict(base, engine="moelite", config=dict(best, expert_budget=args.budget)),
                            ", ".join(f"{k}={v}" for k, v in best.items())))
            rows.append(Row(section, f"moelite exact ({args.budget}, no substitution)", "moelite", ckpt.name, True,
                            dict(base, engine="moelite", config=dict(exact, expert_budget=args.budget)),
                            "as best, substitution_alpha=0" if alpha else "best has no substitution"))
            off = work / "hf_offload" / ckpt.name
            rows.append(Row(section, "HF transformers + accelerate offload", "hf", ckpt.name, True,
                            dict(base, engine="hf", hf={"mode": "offload", "max_memory": int(hf_mem),
                                                        "offload_folder": str(off)}),
                            f"bf16, device_map=auto, max_memory cpu={_size(hf_mem)} "
                            f"(dense + {args.budget} of experts), rest to disk"))
        if gguf is not None:
            rows.append(Row(section, "llama.cpp (llama-cpp-python, mmap)", "llama", ckpt.name, capped,
                            dict(base, engine="llama", gguf=str(gguf)),
                            "bf16 GGUF, use_mmap, page cache = expert cache" + (" (no budget knob; the cgroup caps it)"
                                                                                 if capped else "")))
        else:
            rows.append(Row(section, "llama.cpp (llama-cpp-python, mmap)", "llama", ckpt.name, capped,
                            {"engine": "llama"}, setup_notes.get("llama_error", "llama.cpp not available")))
        if capped and section.startswith("real-shape"):
            rows.append(Row(section, "upper bound: moelite, all experts resident (no cap)", "moelite", ckpt.name,
                            False, dict(base, engine="moelite", config=upper), "100% budget, warm start, no cap"))
            if replay is not None:
                rows.append(Row(section, f"moelite best ({args.budget}) + demo-trace replay", "moelite", ckpt.name,
                                True, dict(base, engine="moelite", config=dict(best, expert_budget=args.budget),
                                           replay=str(replay)),
                                "routing replaced by the trained demo model's recorded routing (not comparable "
                                "with the other engines' own routing)"))
        return rows

    want = set(args.sections.split(","))
    if "demo" in want:
        sections.append(("demo, uncapped", None,
                         rows_for("demo, uncapped", demo, demo_gguf, args.demo_prompts, args.demo_tokens, False)))
        sections.append((f"demo, capped ({args.budget}, {args.demo_cap} cgroup)", args.demo_cap,
                         rows_for(f"demo, capped ({args.budget}, {args.demo_cap} cgroup)", demo, demo_gguf,
                                  args.demo_prompts, args.demo_tokens, True)))
    if "realshape" in want and rs is not None:
        name = f"real-shape, capped ({args.budget}, {args.rs_cap} cgroup)"
        sections.append((name, args.rs_cap, rows_for(name, rs, rs_gguf, args.rs_prompts, args.rs_tokens, True,
                                                     replay=trace)))
    return sections


# ---- report ---------------------------------------------------------------------------------------------------------
def _size(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.1f} MiB"


def _gib(b) -> str:
    return f"{b / 2**30:.2f}" if isinstance(b, (int, float)) and b is not None else "-"


def _agree(rows: list[dict]) -> None:
    """Token agreement of each row with the all-resident moelite row of the same checkpoint (not for replay rows)."""
    refs = {r["model"]: r for r in rows if r["label"].startswith("upper bound") and r.get("survived")}
    for r in rows:
        ref = refs.get(r["model"])
        if ref is None or not r.get("token_ids") or "replay" in r["label"]:
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
    rs = [r for r in rows if r["section"].startswith("real-shape")]

    def tok(prefix):
        r = next((r for r in rs if r["label"].startswith(prefix) and "replay" not in r["label"]), None)
        return r.get("decode_tok_s") if r else None

    best, exact, hf, ll = tok("moelite best"), tok("moelite exact"), tok("HF transformers"), tok("llama.cpp")
    up = tok("upper bound")
    rep = next((r.get("decode_tok_s") for r in rs if "replay" in r["label"]), None)
    ratio = lambda a, b: a / b if a and b else None  # noqa: E731
    return {"realshape_decode_tok_s": {"moelite_best": best, "moelite_exact": exact, "hf_offload": hf,
                                       "llama_cpp": ll, "upper_bound": up, "moelite_best_replay": rep},
            "moelite_best_over_hf": ratio(best, hf), "moelite_best_over_llama": ratio(best, ll),
            "moelite_exact_over_hf": ratio(exact, hf), "moelite_exact_over_llama": ratio(exact, ll),
            "all_survived": all(r.get("survived") for r in rows if not r.get("not_run"))}


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
    p.add_argument("--budget", default="25%", help="moelite expert budget (HF gets dense + the same share of experts)")
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
                   help="GGUF weight type for llama.cpp (bf16 = the checkpoint's own bytes)")
    p.add_argument("--demo-timeout", type=float, default=120, help="seconds per demo row")
    p.add_argument("--rs-timeout", type=float, default=360, help="seconds per real-shape row")
    p.add_argument("--budget-min", type=float, default=29, help="time budget of the whole run in minutes; rows that "
                                                                "would start after it are recorded as not run")
    p.add_argument("--install", action=argparse.BooleanOptionalAction, default=True,
                   help="pip-install benchmarks/requirements-h2h.txt when accelerate or llama_cpp is missing")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "h2h"))
    args = p.parse_args(argv)

    t_start = time.perf_counter()
    deadline = t_start + args.budget_min * 60
    from moelite.eval.bench import hardware
    from moelite.config import parse_budget
    from moelite.demo import demo_model_path

    parse_budget(args.budget)
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
    demo_gguf = rs_gguf = None
    if converter is not None:
        demo_gguf, why, timings["gguf_demo_s"] = ensure_gguf(demo, work, converter, args.gguf_type)
        if why:
            setup["llama_error"] = f"GGUF conversion of the demo model failed: {why}"
        if rs is not None:
            rs_gguf, why, timings["gguf_realshape_s"] = ensure_gguf(rs, work, converter, args.gguf_type)
            if why:
                setup["llama_error_realshape"] = f"GGUF conversion of the real-shape checkpoint failed: {why}"
    timings["setup_s"] = time.perf_counter() - t_start
    for k, v in setup.items():
        if k.endswith("error") or k.startswith("llama_error"):
            print(f"# {k}: {v}", flush=True)

    # 2. rows, section by section, each capped section in one cgroup
    sections = plan(args, demo, rs, demo_gguf, rs_gguf, trace, setup)
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
                if row.spec.get("engine") == "llama" and "gguf" not in row.spec:
                    res = not_run(row, row.note)
                elif left < 30:
                    res = not_run(row, f"not run: the run's time budget (--budget-min {args.budget_min:g}) was spent")
                else:
                    paths = [Path(row.spec["model"])] + ([Path(row.spec["gguf"])] if row.spec.get("gguf") else [])
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
                print(f"  {row.label:<52} {tok:>14}  {'ok' if res.get('survived') else res.get('error', '')}",
                      flush=True)
        finally:
            if cgroup is not None:
                cgroup.close()

    _agree(results)
    result = {"date": time.strftime("%Y-%m-%d %H:%M %Z"), "hardware": hardware(),
              "command": "python3 benchmarks/head_to_head.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "caps": caps, "setup": setup, "timings": timings, "threads": args.threads,
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
