"""One generation request (`Sequence`) and the engine's result (`Generation`), shared by the batcher, its model
runners, the scheduler, the engine and the server.

Contract:
  - `Sequence(prompt_ids, params, emit, alpha, task, ttft_slo, tpot_slo, timeout, forced)`: one prompt, one set of
    sampling parameters, one substitution alpha, optional TTFT / TPOT targets (seconds) and a timeout from arrival.
    Events go to `seq.emit(event)`, called from the thread that runs the batcher's step:
        ("text", piece)                         a decoded text piece (one or more tokens)
        ("done", result_dict)                   finished: text, token_ids, finish_reason, usage and timings
        ("error", status, message, retry_after) refused (429/503), timed out in the queue (429) or failed (500);
                                                a failed prefill, or NaN / inf logits (NonFiniteOutputError),
                                                leave the exception in `seq.error`
    `seq.cancel()` (thread-safe) drops it at the next step boundary, freeing its KV cache.
  - Teacher forcing: with `forced` (a list of token ids, `params.max_tokens == len(forced)`), output token i is
    `forced[i]` instead of a sampled one, `seq.logits[i]` (float32 [V]) records the logits it would have been
    sampled from, eos and stop strings do not end it, and no text is decoded. Only such a sequence may have an
    empty prompt: its first forced token is then fed with no context.
  - The loop-thread fields (`cache`, `out_ids`, `finish`, timings, ...) are written only by the batcher and its
    runner; `cache` is the runner's per-sequence state (a KV cache, or a row of a static cache), None when the
    sequence is not running.
  - `Generation(text, token_ids, prompt_tokens, finish_reason, stats)`: `moelite.Generation`, what
    `Engine.generate` returns; finish_reason is "stop" | "length" | "eos".
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from moelite.core.sampling import SamplingParams
from moelite.serve.detokenizer import StreamingDetokenizer


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str  # "stop" | "length" | "eos"
    stats: dict = field(default_factory=dict)


@dataclass(eq=False)
class Sequence:
    prompt_ids: list[int]
    params: SamplingParams
    emit: Callable[[tuple], None] = lambda ev: None
    alpha: float = 0.0
    task: str = "default"
    ttft_slo: float | None = None  # seconds; None = no target
    tpot_slo: float | None = None
    timeout: float | None = None  # seconds from arrival
    forced: list[int] | None = None  # teacher forcing: the output tokens, fed instead of sampled ones
    arrival: float = field(default_factory=time.monotonic)
    # ---- loop-thread state ----
    expected_tokens: int = 0  # G_i of eMoE: remaining-token estimate, set by the scheduler
    expected_initial: int = 0
    degraded: bool = False
    cache: object = None  # the runner's per-sequence state while running
    generator: torch.Generator | None = None
    detok: StreamingDetokenizer | None = None
    out_ids: list[int] = field(default_factory=list)
    logits: list[torch.Tensor] = field(default_factory=list)  # teacher forcing: the logits of each output token
    finish: str | None = None
    error: BaseException | None = None
    t_admit: float | None = None  # monotonic seconds: prefill started
    t_first: float | None = None  # first output token chosen
    t_last: float | None = None  # last output token chosen
    last_token: int = -1  # the token the next decode step feeds
    _cancelled: threading.Event = field(default_factory=threading.Event)

    def cancel(self) -> None:
        self._cancelled.set()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    @property
    def text(self) -> str:
        return self.detok.text if self.detok is not None else ""

    @property
    def kv_tokens(self) -> int:
        """Token budget this sequence may occupy: prompt + max_tokens."""
        return len(self.prompt_ids) + self.params.max_tokens

    @property
    def ttft_deadline(self) -> float:
        return self.arrival + (self.ttft_slo if self.ttft_slo is not None else 1e9)
