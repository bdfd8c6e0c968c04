"""The engine: the Python API that the CLI and the server wrap.

Contract:
  - `moelite.load(path=None, device="cpu", expert_budget="auto", **config)` -> `Engine`; `path=None` is the
    embedded demo model. The budget is the total size of the routed-expert slots; it is fixed at load and never
    exceeded. A budget below one layer's top-k experts (or, on CUDA, that does not fit the free GPU memory beside
    the dense weights) is refused with the numbers.
  - `engine.logits(input_ids[B, T])` -> float32 logits [B, T, vocab] (full forward, no KV cache).
  - `engine.generate(prompt, max_tokens, temperature, top_p, top_k, stop, seed)` -> `Generation` (text, token ids,
    finish reason, per-request stats); `engine.stream(...)` yields text pieces as they decode;
    `engine.generate_batch(prompts, ...)` decodes several prompts in lock step; `engine.teacher_force(ids, start)`
    -> the decode path's logits of ids[start:] (eval). All four are sequences of the one decode loop,
    `serve.batching.Batcher.step`, run in the calling thread under the engine's lock, with a per-call alpha.
    Bad input (ids outside the vocabulary, prompt + max_tokens over the context, no prompt) is refused with a
    ValueError before any model work (`sampling_params`, `check_prompt`).
  - `engine.stats()` -> dict of totals since load: the counters' report (moelite.core.counters: exact hits, misses,
    reads in flight, substitutions, prefill and decode apart, each rate defined once) plus memory and the CUDA path's
    figures. `engine.counters()` -> an immutable `Snapshot`; `after - before` is what a call did.
  - Per-call state: `with engine.request(alpha=..., hook=..., in_prefill=..., alpha_scale=...)` sets substitution
    alpha, routing hook and profile for the calls inside and restores the engine's own on exit (ExpertManager.request).
  - `engine.preload(keys)` reads experts into the cache ahead of use (neither hits nor misses); `engine.warm_up()`
    fills free slots in layer order. Load runs in named phases (`__init__`).
"""

from __future__ import annotations

import gc
import operator
import os
import threading
import json
import warnings
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer

from moelite.core.arch import adapter_for
from moelite.core.checkpoint import Checkpoint, CheckpointError
from moelite.config import EngineConfig, check_alpha, format_bytes, resolve_budget
from moelite.core.dense import dense_bytes, dense_dtype
from moelite.core.device import parse_device, slot_dtype
from moelite.core.expert_cache import ExpertCache, make_policy
from moelite.core.expert_store import ExpertLayout, ExpertReader, SlotPool
from moelite.core.quant import LinearQ, QuantSpec, quant_label
from moelite.core.graph_decode import StaticDecoder, bucket
from moelite.core.host_tier import HostTier
from moelite.core.integrity import checksums_for
from moelite.core.memory import auto_budget, available_memory, resident_note
from moelite.core.loader import Loader, background_io
from moelite.core.model import build_model
from moelite.core import lean_decode
from moelite.core.counters import Snapshot
from moelite.core.cuda_experts import CudaExperts
from moelite.core.call_state import DECODE, ManagerOptions
from moelite.core.moe_layer import ExpertManager
from moelite.core.substitution import cache_router
from moelite.core.sampling import SamplingParams
from moelite.demo import demo_model_path
from moelite.serve.batching import Batcher
from moelite.serve.runner import DynamicRunner, StaticRunner
from moelite.serve.scheduler import Scheduler, SchedulerConfig
from moelite.serve.sequence import Generation, Sequence  # Generation: moelite.engine.Generation stays importable


class Engine:
    def __init__(self, path: str | Path | None = None, config: EngineConfig | None = None, progress: bool = True):
        """Load in named phases: open the checkpoint, size the expert budget, build the expert manager, record or
        check the experts' checksums, build the model around it, set up the device's expert path, warm the cache,
        load the tokenizer."""
        self.config = (config or EngineConfig()).validate()
        self.lock = threading.RLock()  # one call at a time on the model, the cache and the counters
        self.requests = 0
        self._open_checkpoint(path)
        sdtype, n_slots, total = self._size_budget()
        self._check_profile()
        self._build_expert_manager(sdtype, n_slots)
        self._attach_checksums(progress)
        self.model = build_model(self.checkpoint, self.adapter, self.hf_config, self.layout, self.reader, self.manager,
                                 self.device, self.dtype, self.top_k, progress=progress, dense16=self.dense16)
        self.host = None
        self._decoders: dict = {}
        why = lean_decode.why_not(self.model, self.hf_config, self.device) if self.config.lean_decode else "off"
        self.lean = lean_decode.LeanDecoder(self.model, self.hf_config) if why is None else None
        self.lean_why = why or "on"  # `moelite info` and stats say which decode step runs
        if self.device.type == "cuda":
            self._init_host_tier(sdtype, total, progress)
        if self.config.warm_start or (self.config.expert_budget == "auto" and self.device.type == "cpu"
                                      and self.pool.n_slots >= len(self.layout.experts)):
            self.warm_up()  # asked for, or "auto" holds every expert: read them now, not during the first requests
        self.tokenizer = self._load_tokenizer()
        self.max_context = int(getattr(self.hf_config, "max_position_embeddings", 2048))
        self.eos_ids = self._eos_ids()
        # Loading leaves hundreds of thousands of new long-lived objects (modules, parameters, tokenizer tables)
        # pending for Python's oldest generation; left alone, the full collection they trigger (~0.1 s measured
        # on the real-shape checkpoint) lands in whatever runs next: a first request's prefill or decode steps.
        # One collection here, in load time, resets that count.
        gc.collect()

    # ---- set-up phases -------------------------------------------------------------------------------------
    def _open_checkpoint(self, path) -> None:
        """The checkpoint, its architecture and config, the routed experts' layout; device-wide settings."""
        if path is None:
            path = demo_model_path()
        self.path = Path(path)
        self.device = parse_device(self.config.device)
        self.checkpoint = ckpt = Checkpoint.open(self.path, allow_pickle=self.config.allow_pickle)
        self.adapter = adapter = adapter_for(ckpt.model_type)
        try:
            self.hf_config = AutoConfig.from_pretrained(str(self.path), trust_remote_code=False)
        except (ValueError, OSError, TypeError, KeyError) as exc:
            raise CheckpointError(f"config.json in {self.path.name!r} is not a valid {ckpt.model_type} config: {exc}") from exc
        # (eMoE session) offloaded MoE blocks return no router logits; a checkpoint saved from training with
        # output_router_logits=true (the demo model's) would make transformers compute an aux loss over an empty
        # tuple and fail in every forward
        self.hf_config.output_router_logits = False
        threads = self.config.num_threads
        if threads is None and int(getattr(self.hf_config, "hidden_size", 4096)) <= 1024:
            threads = 1  # tiny matmuls: intra-op threading costs more than it gains (100x on a busy 2-core box)
        if threads:
            torch.set_num_threads(threads)
        if self.device.type == "cuda":
            # cuDNN's attention backend plans a graph per new sequence length, i.e. at every decode step (about
            # 7 ms per layer measured on an H100 with torch 2.11); flash / memory-efficient kernels need no plan.
            # Process-wide; MOELITE_CUDNN_SDPA=1 keeps it.
            if os.environ.get("MOELITE_CUDNN_SDPA") != "1":
                torch.backends.cuda.enable_cudnn_sdp(False)
        self.num_experts = adapter.num_experts(self.hf_config)
        self.top_k = adapter.top_k(self.hf_config)
        if not 1 <= self.top_k <= self.num_experts:
            raise CheckpointError(f"config.json: num_experts_per_tok = {self.top_k} must be between 1 and the "
                                  f"number of routed experts ({self.num_experts}); fix the checkpoint's config")
        self.layout = ExpertLayout.build(ckpt, adapter, self.num_experts, QuantSpec.from_config(self.hf_config))
        if self.layout.quant is not None and self.device.type != "cpu":
            raise ValueError(f"device: {self.config.device!r}, but this checkpoint's experts are quantized "
                             f"(int{self.layout.quant.bits}); quantized experts run on the CPU: use device='cpu'")

    def _size_budget(self) -> tuple[torch.dtype, int, int]:
        """Dtypes, dense bytes and the expert budget in slots, refused with the numbers when it is below one
        layer's top-k or cannot fit; returns (slot dtype, slots, bytes of all routed experts in slots)."""
        layout, ckpt = self.layout, self.checkpoint
        self.dtype = torch.float32 if self.device.type == "cpu" or not layout.disk_dtype.is_floating_point \
            else layout.disk_dtype
        sdtype = slot_dtype(self.config, self.device, layout.disk_dtype, layout.numel)
        slot_bytes = layout.numel * sdtype.itemsize
        total = slot_bytes * len(layout.experts)
        experts = layout.expert_tensor_names()
        self.dense16 = dense_dtype(self.config.dense_dtype, self.device, layout.float_dtype)
        self.dense_bytes = dense_bytes(ckpt.tensors, experts, self.dense16, self.dtype)
        self.budget_note = None
        budget_value = self.config.expert_budget
        if budget_value == "auto":
            auto = auto_budget(self.device, self.dense_bytes, self.hf_config, self.dtype, total)
            self.budget_note = auto.note
            if auto.bytes < self.top_k * slot_bytes:
                raise ValueError(f"{auto.note}: that is below one layer's top-{self.top_k} experts "
                                 f"({format_bytes(self.top_k * slot_bytes)}); free memory, or give expert_budget "
                                 "as a size or a percentage")
            budget_value = auto.bytes
        n_slots, budget = resolve_budget(budget_value, total, slot_bytes)
        n_slots = min(n_slots, len(layout.experts))
        if self.budget_note is None:  # a budget of every expert or more: say so ("all experts resident")
            self.budget_note = resident_note(self.config.expert_budget, budget, total)
        n_layers = len(layout.layers)
        need = self.top_k * (n_layers if self.config.cache_scope == "layer" else 1)
        if n_slots < need:
            scope = f" x {n_layers} layers (cache_scope='layer')" if self.config.cache_scope == "layer" else ""
            raise ValueError(
                f"expert_budget: {self.config.expert_budget!r} = {format_bytes(budget)} holds {n_slots} expert slots "
                f"of {format_bytes(slot_bytes)}, but one layer's top-k needs {self.top_k}{scope} = {need} slots "
                f"({format_bytes(need * slot_bytes)}); raise the budget to at least that "
                f"(all routed experts: {format_bytes(total)})")
        self.budget_bytes = min(budget, total)  # a budget beyond every expert holds every expert, no more
        if self.config.expert_budget != "auto":  # a budget the user gave: refuse it now if it cannot fit
            fit = auto_budget(self.device, self.dense_bytes, self.hf_config, self.dtype, total)
            if n_slots * slot_bytes > fit.bytes:
                raise ValueError(
                    f"expert_budget: {self.config.expert_budget!r} = {n_slots} expert slots "
                    f"({format_bytes(n_slots * slot_bytes)}) does not fit: {format_bytes(fit.available)} available "
                    f"({fit.source}) - {format_bytes(fit.dense)} dense weights - {format_bytes(fit.kv_cache)} KV cache "
                    f"- {format_bytes(fit.headroom)} headroom leaves {format_bytes(fit.bytes)} "
                    f"({fit.bytes / total:.0%} of the routed experts); give at most that, or expert_budget='auto'")
        return sdtype, n_slots, total

    def _check_profile(self) -> None:
        """A substitution profile must have been calibrated on this model's MoE layers."""
        layout, profile = self.layout, self.config.substitution_profile
        n_layers = len(layout.layers)
        if profile is not None and len(profile) != n_layers:
            raise ValueError(f"substitution_profile: {len(profile)} multipliers for the {n_layers} MoE layers of "
                             f"this model; give one per MoE layer (calibrate it with `moelite calibrate`)")
        cal_layers, cal_experts = getattr(profile, "layers", None), getattr(profile, "num_experts", None)
        if (cal_layers is not None and list(cal_layers) != list(layout.layers)) or \
                (cal_experts is not None and cal_experts != self.num_experts):
            raise ValueError(f"substitution_profile: calibrated on MoE layers {list(cal_layers or [])} with "
                             f"{cal_experts} experts, but this model has MoE layers {list(layout.layers)} with "
                             f"{self.num_experts}; calibrate this model with `moelite calibrate`")

    def _build_expert_manager(self, sdtype: torch.dtype, n_slots: int) -> None:
        """Slot pool, reader, cache and loader, and the expert manager over them (SMoE's cache router installed:
        it runs only while a call's alpha > 0)."""
        cfg, layout = self.config, self.layout
        self.pool = SlotPool(layout, n_slots, sdtype, self.device)
        if self.device.type == "cpu":
            self.pool.buffer.zero_()  # touch every page now: memory that is not there fails here, not mid-request
        self.reader = ExpertReader(layout, self.pool, drop_page_cache=cfg.drop_page_cache,
                                   direct_io=cfg.direct_io)
        policy = make_policy(cfg.cache_policy, cfg.score_window)
        cache = ExpertCache(n_slots, self.pool.slot_bytes, policy, layout.layers, cfg.cache_scope)
        loader = Loader(self.reader, cfg.io_threads) \
            if background_io(self.device.type, layout.disk_bytes, cfg.io_threads) else None
        self.manager = ExpertManager(self.pool, cache, self.reader, ManagerOptions.from_config(cfg, layout.layers),
                                     loader=loader, hook=cache_router)
        # the score window sees every decode step's gate scores; a budget that holds every expert never evicts, so
        # its policy is never asked for a victim and needs none
        if hasattr(policy, "mean_scores") and n_slots < len(layout.experts):
            self.manager.add_observer(lambda layer, routing, phase: phase == DECODE and policy.observe_scores(
                layer, routing.probs.mean(0)))

    def _attach_checksums(self, progress: bool) -> None:
        """verify_checksums: the checkpoint's expert checksums (recorded at its first load, re-checked where a shard
        changed: core/integrity.py), against which the reader checks every expert read."""
        self.reader.model_name = self.path.name
        self.manifest = None
        if self.config.verify_checksums:
            self.manifest = checksums_for(self.checkpoint, self.layout, self.reader, progress=progress,
                                          threads=max(1, self.config.io_threads))
            self.reader.checksums = self.manifest.checksums

    # ---- set-up helpers ------------------------------------------------------------------------------------
    def _init_host_tier(self, sdtype: torch.dtype, total: int, progress: bool) -> None:
        """CUDA: routed experts in pinned host RAM under the VRAM slots, and the fused expert path over them."""
        hb = self.config.host_budget
        if hb in (0, "0"):
            return
        if "silu" not in type(self.manager.act_fn).__name__.lower():  # the fused kernels compute SwiGLU with SiLU
            warnings.warn(f"expert activation {type(self.manager.act_fn).__name__} is not SiLU: the CUDA host "
                          "tier and fused expert path are off for this model", stacklevel=2)
            return
        if hb == "auto":
            nbytes = min(total, int(0.8 * available_memory("cpu")[0]))
        else:
            nbytes = min(total, resolve_budget(hb, total, 1)[1])
        self.host = HostTier(self.layout, self.reader, sdtype, nbytes, progress=progress)
        cuda = CudaExperts(self.manager, self.host, backend=self.config.expert_kernel)
        self.manager.use_cuda(cuda)
        cuda.warm()  # VRAM slots start full: a copy from pinned RAM costs little

    def _decoder(self, batch: int, positions: int) -> StaticDecoder:
        """The static-cache decoder (and its CUDA graph) for this batch size and cache length bucket."""
        length = bucket(positions)
        window = getattr(self.hf_config, "sliding_window", None)
        if window and positions <= window:  # a sliding-window layer's static cache is at most the window long
            length = min(length, window)
        key = (batch, length)
        dec = self._decoders.pop(key, None)
        if dec is None:
            while len(self._decoders) >= 4:  # bound the KV caches and graphs kept
                self._decoders.pop(next(iter(self._decoders)))
            dec = StaticDecoder(self, batch, length)
        self._decoders[key] = dec  # most recently used last
        return dec

    def _load_tokenizer(self):
        files = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
        if not any((self.path / f).is_file() for f in files):
            return None
        root = self.path.resolve()
        for f in self.path.iterdir():  # the tokenizer's files, like the shards, must stay inside the model folder
            if f.name.startswith(("tokenizer", "vocab", "merges", "special_tokens", "added_tokens", "chat_template")):
                target = f.resolve()
                if target != root and root not in target.parents:
                    raise CheckpointError(f"{f.name}: a symlink pointing outside the model folder "
                                          f"{self.path.name!r}; copy the file into the folder instead")
        return AutoTokenizer.from_pretrained(str(self.path), trust_remote_code=False)

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        gen = self.path / "generation_config.json"
        sources = [getattr(self.hf_config, "eos_token_id", None)]
        if gen.is_file():
            try:
                sources.append(json.loads(gen.read_text()).get("eos_token_id"))
            except ValueError:
                pass
        if self.tokenizer is not None:
            sources.append(self.tokenizer.eos_token_id)
        for s in sources:
            if isinstance(s, int):
                ids.add(s)
            elif isinstance(s, list):
                ids.update(i for i in s if isinstance(i, int))
        return ids

    def preload(self, experts, wait: bool = True) -> int:
        """Read the given experts ((layer, expert) pairs, or {layer: [experts]}) into the cache ahead of use, in
        the order given, stopping when no slot can be freed; returns how many reads were started. These reads
        count as neither hits nor misses; a later use of a preloaded expert is an exact hit (a read in flight
        while it has not landed, with wait=False)."""
        if isinstance(experts, dict):
            experts = [(layer, e) for layer, es in experts.items() for e in es]
        keys = []
        for layer, e in experts:
            key = (int(layer), int(e))
            if key[0] not in self.manager.blocks or not 0 <= key[1] < self.num_experts:
                raise ValueError(f"preload: ({layer}, {e}) is not an expert of this model (MoE layers "
                                 f"{self.layout.layers}, experts 0..{self.num_experts - 1})")
            keys.append(key)
        with self.lock:
            return self.manager.preload(keys, wait)

    def warm_up(self) -> int:
        """Fill free slots with experts in layer order (SMoE's warm start); returns how many were read."""
        with self.lock:
            return self.manager.warm_start()

    # ---- forward -------------------------------------------------------------------------------------------
    def _check_ids(self, input_ids) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor):
            try:
                input_ids = torch.tensor(input_ids, dtype=torch.long)
            except (TypeError, ValueError, RuntimeError) as exc:
                raise ValueError(f"input_ids: must be a LongTensor [B, T] of token ids ({exc})") from exc
        if input_ids.dim() == 1:
            input_ids = input_ids[None]
        if input_ids.dim() != 2 or input_ids.shape[1] == 0 or input_ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"input_ids: expected an integer tensor [B, T] with T >= 1, got "
                             f"{input_ids.dtype} {list(input_ids.shape)}")
        vocab = self.hf_config.vocab_size
        if int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab:
            raise ValueError(f"input_ids: token ids must be in [0, {vocab}); got {int(input_ids.min())}.."
                             f"{int(input_ids.max())}")
        if input_ids.shape[1] > self.max_context:
            raise ValueError(f"input_ids: {input_ids.shape[1]} tokens exceed the context of {self.max_context}")
        return input_ids.long().to(self.device)

    @contextmanager
    def request(self, **state):
        """Per-call state for the calls inside, under the engine's lock: any of alpha, hook, in_prefill and
        alpha_scale (see `ExpertManager.request`); the engine's own state again on exit, exceptions included."""
        with self.lock, self.manager.request(**state) as call:
            yield call

    @torch.inference_mode()
    def logits(self, input_ids) -> torch.Tensor:
        """A full forward: scored as prefill (substitution only with substitute_in_prefill), at the engine's alpha."""
        ids = self._check_ids(input_ids)
        with self.request(alpha=self.config.substitution_alpha), self.manager.prefilling():
            out = self.model(input_ids=ids, use_cache=False).logits
        return out.float().cpu()

    # ---- generation ----------------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompt: the model folder {self.path.name!r} has no tokenizer; pass token ids")
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            try:
                ids = [operator.index(i) for i in prompt]
            except TypeError:
                raise ValueError(f"prompt: {type(prompt).__name__} is neither a string nor a list of token ids "
                                 "(ints)") from None
        if not ids:
            raise ValueError("prompt: empty; give at least one token of text")
        return ids

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def sampling_params(self, max_tokens: int = 64, temperature: float = 0.8, top_p: float = 0.95, top_k: int = 0,
                        stop=(), seed: int | None = None) -> SamplingParams:
        """Validated sampling parameters; a ValueError names the field and what is allowed."""
        stop = tuple([stop] if isinstance(stop, str) else stop or ())
        return SamplingParams(max_tokens, temperature, top_p, top_k, stop, seed).validate()

    def check_prompt(self, ids: list[int], max_tokens: int, name: str = "prompt") -> None:
        """Refuse, before any model work, a prompt whose ids are outside the vocabulary or that leaves no room for
        `max_tokens` in the model's context."""
        if len(ids) + max_tokens > self.max_context:
            raise ValueError(f"max_tokens: {name} ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds the model "
                             f"context of {self.max_context}")
        vocab = self.hf_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"{name}: token ids must be in [0, {vocab}); got {min(ids)}..{max(ids)}")

    def _run(self, runner, seqs: list[Sequence]) -> Iterator[str]:
        """Step a batcher of this call's own over `seqs` until all are done (the one decode loop, in this thread),
        yielding text pieces as they are emitted. A failed prefill raises its exception here."""
        pieces: list[str] = []
        for s in seqs:
            s.emit = lambda ev: ev[0] == "text" and pieces.append(ev[1])
        admit_all = SchedulerConfig(mode="fcfs", max_batch=len(seqs), token_budget=sum(s.kv_tokens for s in seqs))
        batcher = Batcher(self, Scheduler(admit_all, max_context=self.max_context), max_queue=len(seqs),
                          runner=runner)
        for s in seqs:
            batcher.submit(s)
        try:
            while True:
                running = batcher.step()
                yield from pieces
                pieces.clear()
                for s in seqs:
                    if s.error is not None:
                        raise s.error
                if not running:
                    if batcher.queue_depth():
                        raise RuntimeError("the batcher admitted none of this call's sequences")
                    return
        finally:
            runner.flush()  # the last step's bookkeeping, before the request's counters are read

    def stream(self, prompt: str | list[int], max_tokens: int = 64, temperature: float = 0.8, top_p: float = 0.95,
               top_k: int = 0, stop=(), seed: int | None = None, substitution_alpha: float | None = None,
               _result: dict | None = None) -> Iterator[str]:
        """Yield text pieces as they decode; `_result` (if given) receives the final `Generation`. A batch of one
        through the batcher's step (serve/batching.py), in this thread, under the engine's lock: on CUDA without
        a sliding window over the static-cache decoder (CUDA graphs), otherwise with a DynamicCache."""
        params = self.sampling_params(max_tokens, temperature, top_p, top_k, stop, seed)
        alpha = check_alpha(self.config.substitution_alpha if substitution_alpha is None else substitution_alpha)
        prompt_ids = self.encode(prompt)
        self.check_prompt(prompt_ids, params.max_tokens)
        with self.request(alpha=alpha):
            before = self.counters()
            runner = DynamicRunner(self)
            if self.manager.cuda is not None:  # CUDA: static KV cache, decode steps as CUDA graphs
                dec = self._decoder(1, len(prompt_ids) + params.max_tokens)
                if not dec.sliding:
                    runner = StaticRunner(dec)
            seq = Sequence(prompt_ids, params, alpha=alpha)
            yield from self._run(runner, [seq])
            spent = self.counters() - before
        n = len(seq.out_ids) + (seq.finish == "eos")  # tokens sampled, an eos included
        stats = {"prompt_tokens": len(prompt_ids), "completion_tokens": n, "ttft_s": seq.t_first - seq.t_admit,
                 "decode_s": seq.t_last - seq.t_first}
        stats.update(spent.report())  # this request's counts and rates (moelite.core.counters)
        stats["decode_tok_s"] = (n - 1) / stats["decode_s"] if stats["decode_s"] > 0 else 0.0
        stats["substitution_alpha"] = alpha
        if _result is not None:
            _result["generation"] = Generation(seq.text, list(seq.out_ids), len(prompt_ids), seq.finish, stats)

    def generate(self, prompt: str | list[int], max_tokens: int = 64, temperature: float = 0.8, top_p: float = 0.95,
                 top_k: int = 0, stop=(), seed: int | None = None,
                 substitution_alpha: float | None = None) -> Generation:
        box: dict = {}
        for _ in self.stream(prompt, max_tokens, temperature, top_p, top_k, stop, seed, substitution_alpha,
                             _result=box):
            pass
        return box["generation"]

    def generate_batch(self, prompts: list, max_tokens: int = 64, temperature: float = 0.0, top_p: float = 0.95,
                       top_k: int = 0, seed: int | None = None,
                       substitution_alpha: float | None = None) -> list[Generation]:
        """Decode several prompts in lock step: one forward per step for all of them over a static KV cache (a CUDA
        graph per batch size on CUDA), through the batcher's step with a `StaticRunner`. Each row samples with its
        own generator (seeded by `seed`), so its output equals `generate(prompt, ..., seed=seed)` alone up to float
        rounding. Each result's stats carry the batch's `batch_decode_tok_s` (all rows' decode tokens over the
        decode time)."""
        params = self.sampling_params(max_tokens, temperature, top_p, top_k, (), seed)
        alpha = check_alpha(self.config.substitution_alpha if substitution_alpha is None else substitution_alpha)
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
            raise ValueError("prompts: give a list of prompts (strings or token-id lists); for one prompt use "
                             "generate()")
        if not prompts:
            raise ValueError("prompts: empty list; give at least one prompt")
        ids = [self.encode(p) for p in prompts]
        for i, p in enumerate(ids):
            self.check_prompt(p, params.max_tokens, f"prompts[{i}]")
        longest, n = max(len(p) for p in ids), len(ids)
        with self.request(alpha=alpha):
            before = self.counters()
            dec = self._decoder(n, longest + max_tokens)
            window = getattr(self.hf_config, "sliding_window", None)
            if dec.sliding and window and longest + max_tokens > window:
                raise ValueError(f"max_tokens: generate_batch on this sliding-window model stays within its window "
                                 f"of {window} positions; the longest prompt ({longest}) + max_tokens ({max_tokens}) "
                                 "exceeds it; use generate() for longer outputs")
            seqs = [Sequence(p, params, alpha=alpha) for p in ids]
            for _ in self._run(StaticRunner(dec), seqs):
                pass
            t_end = time.monotonic()
            spent = self.counters() - before
        t_first = min(s.t_first for s in seqs)  # all rows pick their first token after the one prefill
        steps = max(len(s.out_ids) + (s.finish == "eos") for s in seqs) - 1  # the rows step together
        dec_s = t_end - t_first
        shared = spent.report()  # the batch's counts and rates, shared by its rows
        shared.update(batch_size=n, ttft_s=t_first - min(s.t_admit for s in seqs), decode_s=dec_s,
                      decode_steps=steps, batch_decode_tok_s=n * steps / dec_s if dec_s > 0 else 0.0,
                      substitution_alpha=alpha)
        return [Generation(s.text, list(s.out_ids), len(s.prompt_ids), s.finish,
                           {**shared, "completion_tokens": len(s.out_ids)}) for s in seqs]

    def teacher_force(self, ids: list[int], start: int, substitution_alpha: float | None = None) -> torch.Tensor:
        """Logits of ids[start:] teacher-forced through the decode path -> float32 [len(ids) - start, V], row t
        predicting ids[start + t]: ids[:start - 1] are prefilled, then ids[start - 1:-1] are fed one per decode
        step, as generation feeds its tokens (so substitution applies exactly as in `generate`). One forced
        sequence through the batcher's step; the alpha is this call's."""
        ids = self.encode(ids)
        if isinstance(start, bool) or not isinstance(start, int) or not 1 <= start < len(ids):
            raise ValueError(f"start: {start!r} must be an int in [1, {len(ids)})")
        vocab = self.hf_config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"ids: token ids must be in [0, {vocab}); got {min(ids)}..{max(ids)}")
        alpha = check_alpha(self.config.substitution_alpha if substitution_alpha is None else substitution_alpha)
        forced = ids[start - 1:]
        seq = Sequence(ids[:start - 1], SamplingParams(max_tokens=len(forced), temperature=0.0).validate(),
                       alpha=alpha, forced=forced)
        with self.request(alpha=alpha):
            for _ in self._run(DynamicRunner(self), [seq]):
                pass
        return torch.stack(seq.logits[1:])  # row 0 is the prefill's, not a decode step's

    # ---- stats ---------------------------------------------------------------------------------------------
    def counters(self) -> Snapshot:
        """The engine's counters now (immutable; `after - before` is what happened in between, `.report()` names
        the metrics: moelite.core.counters)."""
        return self.manager.counters.snapshot()

    def stats(self) -> dict:
        """Totals since load: configuration, memory, every counter and rate of `counters().report()`, the CUDA
        path's own figures and per-layer counts."""
        c = self.manager.cache
        return {
            "model": self.path.name,
            "model_type": self.checkpoint.model_type,
            "device": str(self.device),
            "cache_policy": self.config.cache_policy,
            "expert_budget_bytes": self.budget_bytes,
            "expert_budget_note": self.budget_note,
            "expert_slots": self.pool.n_slots,
            "expert_slot_bytes": self.pool.slot_bytes,
            "routed_expert_bytes": self.pool.slot_bytes * len(self.layout.experts),
            "resident_expert_bytes": c.resident_bytes,
            "resident_expert_bytes_peak": c.resident_peak,
            "expert_slot_dtype": str(self.pool.dtype).removeprefix("torch."),
            "expert_quant": quant_label(self.layout.quant),
            "dense_quantized_layers": sum(isinstance(m, LinearQ) for m in self.model.modules()),
            "expert_kernel": self.manager.kernel.kind if self.manager.kernel else self.config.expert_kernel,
            "lean_decode": self.lean_why,  # "on", or why decode steps take transformers' forward
            # the storage dtype of the largest dense weight (small layers stay float32 on the CPU, core/dense.py)
            "dense_dtype": str(max(self.model.parameters(), key=torch.Tensor.numel).dtype).removeprefix("torch."),
            "dense_bytes": self.dense_bytes,
            "verify_checksums": self.reader.checksums is not None,
            "expert_reads_path": self.reader.read_path(),
            "expert_reads_background": self.manager.loader is not None,
            **self.counters().report(),
            "requests": self.requests,
            **self._cuda_stats(),
            "per_layer": self.manager.counters.per_layer(),
        }

    def _cuda_stats(self) -> dict:
        cu = self.manager.cuda
        if cu is None:
            return {}
        decs = list(self._decoders.values())
        return {"host_tier_experts": len(self.host), "host_tier_bytes": self.host.nbytes,
                "host_tier_load_seconds": self.host.load_seconds, "h2d_gbps": cu.h2d_gbps,
                "h2d_copies": cu.copies, "h2d_bytes": cu.copy_bytes, "cpu_computed_experts": cu.cpu_computed,
                "graph_steps": sum(d.graph_steps for d in decs), "eager_steps": sum(d.eager_steps for d in decs),
                "graph_redone": sum(d.graph_misses for d in decs),
                "graph_misses_loaded": cu.graph_misses_loaded}

    def close(self) -> None:
        """Stop the background readers and close the shard files."""
        if self.manager.loader is not None:
            self.manager.loader.shutdown()
        self.reader.close()


def load(path: str | Path | None = None, device: str = "cpu", expert_budget: str | int | float = "auto",
         progress: bool = False, **config) -> Engine:
    """Load a Hugging Face MoE checkpoint folder with routed experts offloaded under `expert_budget`."""
    unknown = set(config) - set(EngineConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)}; allowed: {sorted(EngineConfig.__dataclass_fields__)}")
    return Engine(path, EngineConfig(device=device, expert_budget=expert_budget, **config), progress=progress)
