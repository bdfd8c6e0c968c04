"""The engine: the Python API that the CLI and the server wrap.

Contract:
  - `moelite.load(path=None, device="cpu", expert_budget="25%", **config)` -> `Engine`; `path=None` is the
    embedded demo model. The budget is the total size of the routed-expert slots; it is fixed at load and never
    exceeded. A budget below one layer's top-k experts (or, on CUDA, that does not fit the free GPU memory beside
    the dense weights) is refused with the numbers.
  - `engine.logits(input_ids[B, T])` -> float32 logits [B, T, vocab] (full forward, no KV cache).
  - `engine.generate(prompt, max_tokens, temperature, top_p, top_k, stop, seed)` -> `Generation` (text, token ids,
    finish reason, per-request stats); `engine.stream(...)` yields text pieces as they decode.
  - `engine.stats()` -> dict of totals since load.
"""

from __future__ import annotations

import os
import threading
import warnings
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import AutoConfig, AutoTokenizer, DynamicCache

from moelite.core.arch import adapter_for
from moelite.core.checkpoint import Checkpoint, CheckpointError
from moelite.config import EngineConfig, check_alpha, format_bytes, parse_device, resolve_budget, slot_dtype
from moelite.core.expert_cache import ExpertCache, make_policy
from moelite.core.expert_store import ExpertLayout, ExpertReader, SlotPool
from moelite.core.graph_decode import StaticDecoder, bucket
from moelite.core.host_tier import HostTier
from moelite.core.memory import auto_budget, available_memory
from moelite.core.loader import Loader
from moelite.core.model import build_model
from moelite.core.moe_layer import ExpertManager
from moelite.core.substitution import cache_router
from moelite.core.sampling import SamplingParams, sample


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" | "length" | "eos"
    stats: dict = field(default_factory=dict)


def _ratio(a: float, b: float) -> float:
    return a / b if b else 0.0


def _counters(engine: "Engine") -> dict:
    c = engine.manager.cache
    return {"expert_hits": c.hits, "expert_misses": c.misses, "expert_bytes_read": engine.reader.bytes_read,
            "io_seconds": engine.reader.io_seconds, "stall_seconds": engine.manager.stall_seconds,
            "expert_substitutions": engine.manager.substitutions}


class Engine:
    def __init__(self, path: str | Path | None = None, config: EngineConfig | None = None, progress: bool = True):
        self.config = (config or EngineConfig()).validate()
        if path is None:
            from moelite.demo import demo_model_path

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
        self.num_experts = adapter.num_experts(self.hf_config)
        self.top_k = adapter.top_k(self.hf_config)
        if not 1 <= self.top_k <= self.num_experts:
            raise CheckpointError(f"config.json: num_experts_per_tok = {self.top_k} must be between 1 and the "
                                  f"number of routed experts ({self.num_experts}); fix the checkpoint's config")
        self.layout = layout = ExpertLayout.build(ckpt, adapter, self.num_experts)

        self.dtype = torch.float32 if self.device.type == "cpu" or not layout.disk_dtype.is_floating_point \
            else layout.disk_dtype
        sdtype = slot_dtype(self.config, self.device, layout.disk_dtype)
        slot_bytes = layout.numel * sdtype.itemsize
        total = slot_bytes * len(layout.experts)
        experts = layout.expert_tensor_names()
        self.dense_bytes = sum(t.nbytes // t.dtype.itemsize * self.dtype.itemsize
                               for n, t in ckpt.tensors.items() if n not in experts)
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
        n_layers = len(layout.layers)
        profile = self.config.substitution_profile
        if profile is not None and len(profile) != n_layers:
            raise ValueError(f"substitution_profile: {len(profile)} multipliers for the {n_layers} MoE layers of "
                             f"this model; give one per MoE layer (calibrate it with `moelite calibrate`)")
        cal_layers, cal_experts = getattr(profile, "layers", None), getattr(profile, "num_experts", None)
        if (cal_layers is not None and list(cal_layers) != list(layout.layers)) or \
                (cal_experts is not None and cal_experts != self.num_experts):
            raise ValueError(f"substitution_profile: calibrated on MoE layers {list(cal_layers or [])} with "
                             f"{cal_experts} experts, but this model has MoE layers {list(layout.layers)} with "
                             f"{self.num_experts}; calibrate this model with `moelite calibrate`")
        need = self.top_k * (n_layers if self.config.cache_scope == "layer" else 1)
        if n_slots < need:
            scope = f" x {n_layers} layers (cache_scope='layer')" if self.config.cache_scope == "layer" else ""
            raise ValueError(
                f"expert_budget: {self.config.expert_budget!r} = {format_bytes(budget)} holds {n_slots} expert slots "
                f"of {format_bytes(slot_bytes)}, but one layer's top-k needs {self.top_k}{scope} = {need} slots "
                f"({format_bytes(need * slot_bytes)}); raise the budget to at least that "
                f"(all routed experts: {format_bytes(total)})")
        self.budget_bytes = budget
        if self.device.type == "cuda":
            # cuDNN's attention backend plans a graph per new sequence length, i.e. at every decode step (about
            # 7 ms per layer measured on an H100 with torch 2.11); flash / memory-efficient kernels need no plan.
            # Process-wide; MOELITE_CUDNN_SDPA=1 keeps it.
            if os.environ.get("MOELITE_CUDNN_SDPA") != "1":
                torch.backends.cuda.enable_cudnn_sdp(False)
        if self.config.expert_budget != "auto":  # a budget the user gave: refuse it now if it cannot fit
            fit = auto_budget(self.device, self.dense_bytes, self.hf_config, self.dtype, total)
            if n_slots * slot_bytes > fit.bytes:
                raise ValueError(
                    f"expert_budget: {self.config.expert_budget!r} = {n_slots} expert slots "
                    f"({format_bytes(n_slots * slot_bytes)}) does not fit: {format_bytes(fit.available)} available "
                    f"({fit.source}) - {format_bytes(fit.dense)} dense weights - {format_bytes(fit.kv_cache)} KV cache "
                    f"- {format_bytes(fit.headroom)} headroom leaves {format_bytes(fit.bytes)} "
                    f"({fit.bytes / total:.0%} of the routed experts); give at most that, or expert_budget='auto'")

        self.pool = SlotPool(layout, n_slots, sdtype, self.device)
        if self.device.type == "cpu":
            self.pool.buffer.zero_()  # touch every page now: memory that is not there fails here, not mid-request
        self.reader = ExpertReader(layout, self.pool, drop_page_cache=self.config.drop_page_cache)
        policy = make_policy(self.config.cache_policy, self.config.score_window)
        cache = ExpertCache(n_slots, slot_bytes, policy, layout.layers, self.config.cache_scope)
        loader = Loader(self.reader, self.config.io_threads) if self.config.io_threads > 0 else None
        self.manager = ExpertManager(self.pool, cache, self.reader, act_fn=None, loader=loader,
                                     miss_policy=self.config.miss_policy, prefetch=self.config.prefetch,
                                     prefetch_experts=self.config.prefetch_experts)
        self.manager.substitute_in_prefill = self.config.substitute_in_prefill
        self.manager.substitution_mode = self.config.substitution_mode
        self.manager.io_parallel = max(1, self.config.io_threads)
        self.manager.substitute = cache_router  # SMoE Algorithm 1; runs only while alpha > 0
        if profile is not None:
            self.manager.alpha_scale = dict(zip(layout.layers, profile))
        if hasattr(policy, "mean_scores"):  # the score window sees every decode step's gate scores
            self.manager.observers.append(
                lambda layer, routing, is_decode: is_decode and policy.observe_scores(layer, routing.probs.mean(0)))
        self.model = build_model(ckpt, adapter, self.hf_config, layout, self.reader, self.manager, self.device,
                                 self.dtype, self.top_k, progress=progress)
        self.host = None
        self._decoders: dict = {}
        if self.device.type == "cuda":
            self._init_host_tier(sdtype, total, progress)
        if self.config.warm_start:
            self.warm_up()
        self.tokenizer = self._load_tokenizer()
        self.max_context = int(getattr(self.hf_config, "max_position_embeddings", 2048))
        self.eos_ids = self._eos_ids()
        self.lock = threading.RLock()
        self.requests = 0

    # ---- set-up helpers ------------------------------------------------------------------------------------
    def _init_host_tier(self, sdtype: torch.dtype, total: int, progress: bool) -> None:
        """CUDA: routed experts in pinned host RAM under the VRAM slots, and the fused expert path over them."""
        from moelite.core.cuda_experts import CudaExperts

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
        self.manager.cuda = CudaExperts(self.manager, self.host, backend=self.config.expert_kernel)
        self.manager.cuda.warm()  # VRAM slots start full: a copy from pinned RAM costs little

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
            import json

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
        count as neither hits nor misses; a later use of a preloaded expert is an exact hit."""
        if isinstance(experts, dict):
            experts = [(layer, e) for layer, es in experts.items() for e in es]
        m, started = self.manager, 0
        with self.lock:
            for layer, e in experts:
                key = (int(layer), int(e))
                if key[0] not in m.blocks or not 0 <= key[1] < self.num_experts:
                    raise ValueError(f"preload: ({layer}, {e}) is not an expert of this model (MoE layers "
                                     f"{self.layout.layers}, experts 0..{self.num_experts - 1})")
                if m.cache.resident(key) or key in m.inflight:
                    continue
                if not m._submit(key, is_prefetch=False):
                    break
                started += 1
            if wait:
                for key in [k for k in m.inflight]:
                    m.cache.unpin(m._finish(key))
        return started

    def warm_up(self) -> None:
        """Fill free slots with experts in layer order (SMoE's warm start)."""
        cache = self.manager.cache
        for layer in self.layout.layers:
            for e in range(self.num_experts):
                if not cache.free[layer]:
                    break
                if not cache.resident((layer, e)):
                    slot = cache.acquire((layer, e))
                    self.reader.read_into((layer, e), slot)
                    cache.commit((layer, e), slot, count_miss=False)

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
    def _request_alpha(self, alpha):
        """The substitution alpha of one call; the engine's own afterwards, so that no call inherits another's."""
        m = self.manager
        m.alpha = alpha
        try:
            yield
        finally:
            m.alpha = self.config.substitution_alpha

    @torch.inference_mode()
    def logits(self, input_ids) -> torch.Tensor:
        """A full forward: scored as prefill (substitution only with substitute_in_prefill), at the engine's alpha."""
        ids = self._check_ids(input_ids)
        with self.lock, self._request_alpha(self.config.substitution_alpha), self.manager.prefilling():
            out = self.model(input_ids=ids, use_cache=False).logits
        return out.float().cpu()

    # ---- generation ----------------------------------------------------------------------------------------
    def encode(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError(f"prompt: the model folder {self.path.name!r} has no tokenizer; pass token ids")
            ids = self.tokenizer.encode(prompt, add_special_tokens=True)
        else:
            ids = list(prompt)
        if not ids:
            raise ValueError("prompt: empty; give at least one token of text")
        return ids

    def decode(self, ids: list[int]) -> str:
        if self.tokenizer is None:
            return " ".join(map(str, ids))
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def _params(self, max_tokens, temperature, top_p, top_k, stop, seed) -> SamplingParams:
        return SamplingParams(max_tokens, temperature, top_p, top_k, tuple([stop] if isinstance(stop, str) else stop or ()),
                              seed).validate()

    @torch.inference_mode()
    def _tokens(self, prompt_ids: list[int], params: SamplingParams, stats: dict) -> Iterator[int]:
        """Yield generated token ids one by one (KV-cached decode)."""
        if len(prompt_ids) + params.max_tokens > self.max_context:
            raise ValueError(f"max_tokens: prompt ({len(prompt_ids)} tokens) + max_tokens ({params.max_tokens}) "
                             f"exceeds the model context of {self.max_context}")
        vocab = self.hf_config.vocab_size
        if min(prompt_ids) < 0 or max(prompt_ids) >= vocab:
            raise ValueError(f"prompt: token ids must be in [0, {vocab})")
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        dec = self._decoder(1, len(prompt_ids) + params.max_tokens) if self.manager.cuda is not None else None
        if dec is not None and not dec.sliding:  # CUDA: static KV cache, decode steps as CUDA graphs
            def first() -> torch.Tensor:
                return dec.prefill([prompt_ids])[0]

            def after(tok: int) -> torch.Tensor:
                return dec.step([tok])[0]
        else:
            dec = None
            cache = DynamicCache(config=self.hf_config)

            def forward(ids: list[list[int]]) -> torch.Tensor:
                ids = torch.tensor(ids, dtype=torch.long, device=self.device)
                out = self.model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
                return out.logits[0, -1].float().cpu()

            def first() -> torch.Tensor:
                with self.manager.prefilling():  # the prompt, whatever its length, is prefill
                    return forward([prompt_ids])

            def after(tok: int) -> torch.Tensor:
                return forward([[tok]])
        t0 = time.perf_counter()
        logits = first()
        try:
            for step in range(params.max_tokens):
                tok = sample(logits, params, gen)
                if step == 0:
                    stats["ttft_s"] = time.perf_counter() - t0
                    t_dec = time.perf_counter()
                stats["completion_tokens"] = step + 1
                stats["decode_s"] = time.perf_counter() - t_dec
                yield tok
                if step + 1 < params.max_tokens:
                    logits = after(tok)
        finally:
            if dec is not None:
                dec.flush()  # the last step's bookkeeping, before the request's counters are read

    def stream(self, prompt: str | list[int], max_tokens: int = 64, temperature: float = 0.8, top_p: float = 0.95,
               top_k: int = 0, stop=(), seed: int | None = None, substitution_alpha: float | None = None,
               _result: dict | None = None) -> Iterator[str]:
        """Yield text pieces as they decode; `_result` (if given) receives the final `Generation`."""
        params = self._params(max_tokens, temperature, top_p, top_k, stop, seed)
        alpha = check_alpha(self.config.substitution_alpha if substitution_alpha is None else substitution_alpha)
        prompt_ids = self.encode(prompt)
        with self.lock, self._request_alpha(alpha):
            before = _counters(self)
            stats: dict = {"prompt_tokens": len(prompt_ids), "completion_tokens": 0}
            out_ids: list[int] = []
            emitted = ""
            finish = "length"
            text = ""
            for tok in self._tokens(prompt_ids, params, stats):
                if tok in self.eos_ids:
                    finish = "eos"
                    break
                out_ids.append(tok)
                text = self.decode(out_ids)
                hit = [text.find(s) for s in params.stop if s in text]
                if hit:
                    text = text[: min(hit)]
                    finish = "stop"
                if text.endswith("\ufffd") and finish != "stop":
                    continue  # incomplete UTF-8 sequence: wait for the next token
                if len(text) > len(emitted) and text.startswith(emitted):
                    piece, emitted = text[len(emitted):], text
                    yield piece
                if finish == "stop":
                    break
            text = text if finish == "stop" else self.decode(out_ids)
            if len(text) > len(emitted) and text.startswith(emitted):
                yield text[len(emitted):]
            self.requests += 1
            after = _counters(self)
            stats.update({k: after[k] - before[k] for k in after})
            n_exp = stats["expert_hits"] + stats["expert_misses"]
            stats["expert_hit_rate"] = stats["expert_hits"] / n_exp if n_exp else 0.0
            dec = stats.get("decode_s", 0.0)
            stats["decode_tok_s"] = (stats["completion_tokens"] - 1) / dec if dec > 0 else 0.0
            stats["substitution_alpha"] = alpha
            if _result is not None:
                _result["generation"] = Generation(text, out_ids, len(prompt_ids), finish, stats)

    def generate(self, prompt: str | list[int], max_tokens: int = 64, temperature: float = 0.8, top_p: float = 0.95,
                 top_k: int = 0, stop=(), seed: int | None = None,
                 substitution_alpha: float | None = None) -> Generation:
        box: dict = {}
        for _ in self.stream(prompt, max_tokens, temperature, top_p, top_k, stop, seed, substitution_alpha,
                             _result=box):
            pass
        return box["generation"]

    @torch.inference_mode()
    def generate_batch(self, prompts: list, max_tokens: int = 64, temperature: float = 0.0, top_p: float = 0.95,
                       top_k: int = 0, seed: int | None = None,
                       substitution_alpha: float | None = None) -> list[Generation]:
        """Decode several prompts in lock step: one forward per step for all of them over a static KV cache (a CUDA
        graph per batch size on CUDA). Greedy output equals `generate(..., temperature=0)` of each prompt alone up
        to float rounding. Each result's stats carry the batch's `batch_decode_tok_s` (all rows' decode tokens
        over the decode time)."""
        params = self._params(max_tokens, temperature, top_p, top_k, (), seed)
        alpha = check_alpha(self.config.substitution_alpha if substitution_alpha is None else substitution_alpha)
        if isinstance(prompts, (str, bytes)) or not isinstance(prompts, (list, tuple)):
            raise ValueError("prompts: give a list of prompts (strings or token-id lists); for one prompt use "
                             "generate()")
        if not prompts:
            raise ValueError("prompts: empty list; give at least one prompt")
        ids = [self.encode(p) for p in prompts]
        vocab = self.hf_config.vocab_size
        for i, p in enumerate(ids):
            if min(p) < 0 or max(p) >= vocab:
                raise ValueError(f"prompts[{i}]: token ids must be in [0, {vocab})")
        longest = max(len(p) for p in ids)
        if longest + max_tokens > self.max_context:
            raise ValueError(f"max_tokens: the longest prompt ({longest} tokens) + max_tokens ({max_tokens}) exceeds "
                             f"the model context of {self.max_context}")
        gen = torch.Generator().manual_seed(params.seed) if params.seed is not None else None
        n = len(ids)
        with self.lock, self._request_alpha(alpha):
            before = _counters(self)
            dec = self._decoder(n, longest + max_tokens)
            window = getattr(self.hf_config, "sliding_window", None)
            if dec.sliding and window and longest + max_tokens > window:
                raise ValueError(f"max_tokens: generate_batch on this sliding-window model stays within its window "
                                 f"of {window} positions; the longest prompt ({longest}) + max_tokens ({max_tokens}) "
                                 "exceeds it; use generate() for longer outputs")
            t0 = time.perf_counter()
            logits = dec.prefill(ids)
            ttft = time.perf_counter() - t0
            outs: list[list[int]] = [[] for _ in ids]
            finish = ["length"] * n
            done = [False] * n
            t_dec = time.perf_counter()
            steps = 0
            try:
                for step in range(max_tokens):
                    toks = [sample(logits[b], params, gen) for b in range(n)]
                    for b, tok in enumerate(toks):
                        if done[b]:
                            continue
                        if tok in self.eos_ids:
                            done[b], finish[b] = True, "eos"
                        else:
                            outs[b].append(tok)
                    if all(done) or step + 1 == max_tokens:
                        break
                    logits = dec.step(toks)
                    steps += 1
            finally:
                dec.flush()  # this request's last step is counted in its own stats, not the next request's
            dec_s = time.perf_counter() - t_dec
            self.requests += n
            after = _counters(self)
        shared = {k: after[k] - before[k] for k in after}
        shared.update(batch_size=n, ttft_s=ttft, decode_s=dec_s, decode_steps=steps,
                      batch_decode_tok_s=n * steps / dec_s if dec_s > 0 else 0.0, substitution_alpha=alpha)
        return [Generation(self.decode(o), o, len(p), f, {**shared, "completion_tokens": len(o)})
                for o, p, f in zip(outs, ids, finish)]

    # ---- stats ---------------------------------------------------------------------------------------------
    def stats(self) -> dict:
        c, m, r = self.manager.cache, self.manager, self.reader
        n = c.hits + c.misses
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
            "expert_hits": c.hits,
            "expert_misses": c.misses,
            "expert_hit_rate": _ratio(c.hits, n),
            "expert_substitutions": m.substitutions,
            "decode_hit_rate": _ratio(m.decode_hits, m.decode_hits + m.decode_misses),
            "expert_evictions": c.evictions,
            "prefetch_issued": m.prefetch_issued,
            "prefetch_hits": m.prefetch_used,
            "prefetch_wasted": m.prefetch_wasted,
            "prefetch_precision": _ratio(m.prefetch_used, m.prefetch_used + m.prefetch_wasted),
            "prefetch_recall": _ratio(m.prefetch_used, m.prefetch_used + m.decode_misses),
            "misses_loaded": m.loaded_misses,
            "misses_direct": m.direct_misses,
            "expert_bytes_read": r.bytes_read,
            "expert_read_errors": r.read_errors,
            "io_seconds": r.io_seconds,
            "stall_seconds": m.stall_seconds,
            "expert_compute_seconds": m.compute_seconds,
            "requests": self.requests,
            **self._cuda_stats(),
            "per_layer": {layer: vars(s).copy() for layer, s in sorted(m.layer_stats.items())},
        }

    def _cuda_stats(self) -> dict:
        if self.manager.cuda is None:
            return {}
        cu, decs = self.manager.cuda, list(self._decoders.values())
        return {"host_tier_experts": len(self.host), "host_tier_bytes": self.host.nbytes,
                "host_tier_load_seconds": self.host.load_seconds, "h2d_gbps": cu.h2d_gbps,
                "h2d_copies": cu.copies, "h2d_bytes": cu.copy_bytes, "cpu_computed_experts": cu.cpu_computed,
                "graph_steps": sum(d.graph_steps for d in decs), "eager_steps": sum(d.eager_steps for d in decs),
                "graph_redone": sum(d.graph_misses for d in decs),
                "graph_misses_loaded": cu.graph_misses_loaded}

    def close(self) -> None:
        if self.manager.loader is not None:
            self.manager.loader.shutdown()
        self.reader.close()


def load(path: str | Path | None = None, device: str = "cpu", expert_budget: str | int | float = "25%",
         progress: bool = False, **config) -> Engine:
    """Load a Hugging Face MoE checkpoint folder with routed experts offloaded under `expert_budget`."""
    unknown = set(config) - set(EngineConfig.__dataclass_fields__)
    if unknown:
        raise ValueError(f"unknown option(s) {sorted(unknown)}; allowed: {sorted(EngineConfig.__dataclass_fields__)}")
    return Engine(path, EngineConfig(device=device, expert_budget=expert_budget, **config), progress=progress)
