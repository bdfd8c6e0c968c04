"""Admission control for the continuous batcher: first-come-first-served, or SLO-aware (eMoE, Algorithm 1).

Contract:
  - `SchedulerConfig` (mode "slo" | "fcfs", on_miss "refuse" | "degrade", degrade_alpha, max_batch, token_budget,
    per-task `TaskSLO` defaults: TTFT target, TPOT target, expected output length). `SchedulerConfig.load(path)`
    reads the same fields from JSON; `validate()` raises ValueError naming the field.
  - `Scheduler(config, profile)`: `schedule(waiting, running, now)` -> (admit, refuse) where refuse holds
    (sequence, status, message, retry_after_s). The batcher calls it at every step boundary, i.e. whenever a
    request has arrived or finished (eMoE runs it on those events). `observe_prefill / observe_step /
    observe_finish` feed the online `CostProfile`.
  - FCFS: admit in arrival order while batch slots (`max_batch`) and the token budget (sum over admitted
    sequences of prompt + max_tokens <= `token_budget`) last. Never refuses (the bounded queue does).
  - SLO (eMoE Algorithm 1, adapted to one CPU/GPU decode loop): waiting requests are sorted by TTFT stringency
    (earliest TTFT deadline = arrival + TTFT target first) and admitted greedily while the token budget and batch
    slots last and no admitted request's expected latency would break its target. eMoE's expected latency of a
    running request i if a new request (W input tokens) is admitted is t_i = dE + (W + n_i G_i) c + r_i; here:
        prefill(W)  = dE + W * c_prefill      dE = misses per prefill * profiled seconds per expert load
                                               (engine io_seconds / misses)
        step(B)     = s0 + s1 * B              decode step of B sequences (the expert loads in s0 are shared by
                                               the batch: that is what n_i G_i c becomes under batching)
        t_i         = r_i + stall + G_i * step(B + 1), compared with i's TPOT target over its tokens
    (a running request that misses its target even without the admission does not block it: eMoE forbids
    admissions that would *break* a target, and a lost one cannot be broken)
    G_i starts at the task's expected output length (profiled online from finished requests), is decremented
    per generated token and reset to 5% of its initial value at 0 (done by the batcher). A request whose own
    predicted TTFT (time waited + prefills admitted before it + its prefill) exceeds its target, or that cannot be
    admitted now and would miss its target by the time the first running request frees a slot, is refused early
    (429 + Retry-After), or under on_miss="degrade" is served best-effort with substitution alpha raised to
    `degrade_alpha` (fewer expert loads when the engine has a substitution hook).
  - `profile_engine(batcher)`: before serving, runs short random prompts through the batcher (batch 1, then up to
    4) so that the CostProfile starts from this machine's prefill and step costs; returns the fitted profile.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from moelite.core.sampling import SamplingParams
from moelite.serve.sequence import Sequence

MODES = ("slo", "fcfs")
ON_MISS = ("refuse", "degrade")


@dataclass
class TaskSLO:
    ttft_s: float = 2.0  # time-to-first-token target
    tpot_s: float = 0.5  # time-per-output-token target
    expected_tokens: int = 64  # expected output length (initial estimate; refined online)

    def validate(self, name: str) -> "TaskSLO":
        for f, lo, hi in (("ttft_s", 1e-3, 3600.0), ("tpot_s", 1e-4, 600.0)):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or not lo <= v <= hi:
                raise ValueError(f"tasks.{name}.{f}: {v!r} must be a number in [{lo:g}, {hi:g}] seconds")
        if isinstance(self.expected_tokens, bool) or not isinstance(self.expected_tokens, int) \
                or not 1 <= self.expected_tokens <= 1_000_000:
            raise ValueError(f"tasks.{name}.expected_tokens: {self.expected_tokens!r} must be an int in [1, 1000000]")
        return self


def default_tasks() -> dict[str, TaskSLO]:
    return {"default": TaskSLO(2.0, 0.5, 64), "chat": TaskSLO(1.0, 0.25, 48), "code": TaskSLO(2.0, 0.4, 96),
            "summarize": TaskSLO(5.0, 0.5, 64)}


@dataclass
class SchedulerConfig:
    mode: str = "slo"
    on_miss: str = "refuse"
    degrade_alpha: float = 0.3
    max_batch: int = 8
    token_budget: int | None = None  # T_max; None = max_batch * model context
    tasks: dict[str, TaskSLO] = field(default_factory=default_tasks)

    def validate(self) -> "SchedulerConfig":
        if self.mode not in MODES:
            raise ValueError(f"scheduler.mode: {self.mode!r} is not one of {', '.join(MODES)}")
        if self.on_miss not in ON_MISS:
            raise ValueError(f"scheduler.on_miss: {self.on_miss!r} is not one of {', '.join(ON_MISS)}")
        if isinstance(self.degrade_alpha, bool) or not isinstance(self.degrade_alpha, (int, float)) \
                or not 0 <= self.degrade_alpha < 1:
            raise ValueError(f"scheduler.degrade_alpha: {self.degrade_alpha!r} must be a number in [0, 1)")
        if isinstance(self.max_batch, bool) or not isinstance(self.max_batch, int) or not 1 <= self.max_batch <= 256:
            raise ValueError(f"scheduler.max_batch: {self.max_batch!r} must be an int in [1, 256]")
        if self.token_budget is not None and (not isinstance(self.token_budget, int) or self.token_budget < 1):
            raise ValueError(f"scheduler.token_budget: {self.token_budget!r} must be an int >= 1")
        if "default" not in self.tasks:
            self.tasks["default"] = TaskSLO()
        for name, t in self.tasks.items():
            t.validate(name)
        return self

    @classmethod
    def load(cls, path: str | Path, **overrides) -> "SchedulerConfig":
        """JSON: {"mode": ..., "on_miss": ..., "tasks": {"chat": {"ttft_s": 1, "tpot_s": 0.2, "expected_tokens": 40}}}
        (fields as in SchedulerConfig / TaskSLO; keyword overrides win)."""
        try:
            raw = json.loads(Path(path).read_text())
        except (OSError, ValueError) as exc:
            raise ValueError(f"slo_config: cannot read {Path(path).name!r} as JSON ({exc.__class__.__name__})") from exc
        if not isinstance(raw, dict):
            raise ValueError("slo_config: the top level must be a JSON object")
        known = set(cls.__dataclass_fields__)
        unknown = set(raw) - known
        if unknown:
            raise ValueError(f"slo_config: unknown field(s) {sorted(unknown)}; allowed: {sorted(known)}")
        tasks = default_tasks()
        for name, t in (raw.pop("tasks", None) or {}).items():
            if not isinstance(t, dict) or set(t) - set(TaskSLO.__dataclass_fields__):
                raise ValueError(f"slo_config: tasks.{name} must be an object with ttft_s, tpot_s, expected_tokens")
            tasks[str(name)] = TaskSLO(**{**asdict(TaskSLO()), **t})
        raw.update(overrides)
        return cls(tasks=tasks, **raw).validate()


class CostProfile:
    """Online cost model: prefill(W) = dE + c_prefill * W; step(B) = s0 + s1 * B (decayed least squares)."""

    def __init__(self, decay: float = 0.97):
        self.decay = decay
        self.c_prefill = 2e-3  # s / prompt token, excluding expert loads
        self.load_s = 5e-3  # s / expert load (io_seconds / misses)
        self.misses_per_prefill = 0.0
        self._loads = [0.0, 0.0]  # decayed sums of (io seconds, misses)
        self._ls = [0.0] * 5  # decayed sums: w, x, y, xx, xy for step(B)
        self.s0, self.s1 = 0.05, 0.01

    def observe_prefill(self, tokens: int, seconds: float, misses: int, io_s: float) -> None:
        d = self.decay
        self._loads = [self._loads[0] * d + io_s, self._loads[1] * d + misses]
        if self._loads[1] > 0:
            self.load_s = self._loads[0] / self._loads[1]
        self.misses_per_prefill = 0.8 * self.misses_per_prefill + 0.2 * misses if self.misses_per_prefill else misses
        per_tok = max(0.0, seconds - io_s) / max(1, tokens)
        self.c_prefill = 0.8 * self.c_prefill + 0.2 * per_tok

    def observe_step(self, batch: int, seconds: float) -> None:
        d, s = self.decay, self._ls
        x, y = float(batch), seconds
        s[:] = [s[0] * d + 1, s[1] * d + x, s[2] * d + y, s[3] * d + x * x, s[4] * d + x * y]
        w, sx, sy, sxx, sxy = s
        var = sxx / w - (sx / w) ** 2
        if var > 0.05:  # batch sizes varied enough to fit a slope
            self.s1 = max(0.0, (sxy / w - sx / w * sy / w) / var)
            self.s0 = max(1e-4, sy / w - self.s1 * sx / w)
        else:  # keep the slope, move the intercept to the mean
            self.s0 = max(1e-4, sy / w - self.s1 * sx / w)

    def prefill_s(self, tokens: int) -> float:
        return self.misses_per_prefill * self.load_s + self.c_prefill * tokens

    def step_s(self, batch: int) -> float:
        return self.s0 + self.s1 * batch

    def as_dict(self) -> dict:
        return {"c_prefill_s_per_token": self.c_prefill, "expert_load_s": self.load_s,
                "misses_per_prefill": self.misses_per_prefill, "step_s0": self.s0, "step_s1": self.s1}


class Scheduler:
    def __init__(self, config: SchedulerConfig, profile: CostProfile | None = None, max_context: int = 2048):
        self.config = config.validate()
        self.profile = profile or CostProfile()
        self.token_budget = config.token_budget or config.max_batch * max_context
        self.max_batch = config.max_batch
        self.expected = {name: float(t.expected_tokens) for name, t in config.tasks.items()}
        self.refused = 0
        self.degraded = 0

    # ---- per-request defaults ---------------------------------------------------------------------------------
    def task(self, name: str | None) -> TaskSLO:
        return self.config.tasks.get(name or "default") or self.config.tasks["default"]

    def fill_defaults(self, seq) -> None:
        """Targets from the task when the request set none; G_i from the task's expected output length."""
        t = self.task(seq.task)
        if seq.ttft_slo is None:
            seq.ttft_slo = t.ttft_s
        if seq.tpot_slo is None:
            seq.tpot_slo = t.tpot_s
        exp = self.expected.get(seq.task, self.expected["default"])
        seq.expected_initial = seq.expected_tokens = max(1, min(seq.params.max_tokens, round(exp)))

    # ---- observation ------------------------------------------------------------------------------------------
    def observe_prefill(self, tokens, seconds, misses, io_s):
        self.profile.observe_prefill(tokens, seconds, misses, io_s)

    def observe_step(self, batch, seconds):
        self.profile.observe_step(batch, seconds)

    def observe_finish(self, seq) -> None:
        if seq.finish in ("eos", "stop", "length") and not seq.task.startswith("_"):  # "_profile": start-up probe
            key = seq.task if seq.task in self.expected else "default"
            self.expected[key] = 0.9 * self.expected[key] + 0.1 * max(1, len(seq.out_ids))

    # ---- admission --------------------------------------------------------------------------------------------
    def schedule(self, waiting: list, running: list, now: float):
        for s in waiting:
            if not s.expected_initial:
                self.fill_defaults(s)
        if self.config.mode == "fcfs":
            return self._fcfs(waiting, running)
        return self._slo(waiting, running, now)

    def _fits(self, s, n_batch: int, used: int) -> bool:
        return n_batch < self.max_batch and used + s.kv_tokens <= self.token_budget

    def _fcfs(self, waiting, running):
        admit, used = [], sum(s.kv_tokens for s in running)
        for s in waiting:
            if not self._fits(s, len(running) + len(admit), used):
                break  # strict arrival order: nobody overtakes the head of the queue
            admit.append(s)
            used += s.kv_tokens
        return admit, []

    def _tpot_ok(self, s, now: float, stall: float, batch: int) -> bool:
        """Would sequence s (running, or being admitted) still meet its TPOT target? (eMoE's t_i check)"""
        p = self.profile
        done = len(s.out_ids)
        elapsed = (now - s.t_first) if s.t_first is not None else 0.0  # r_i: decode time so far
        g = max(1, s.expected_tokens)
        t_i = elapsed + stall + g * p.step_s(batch)
        return t_i / max(1, done - 1 + g) <= s.tpot_slo

    def _breaks(self, s, now: float, stall: float, batch: int) -> bool:
        """Would admitting break s's TPOT target? Only a target s can still meet counts: a request that misses
        anyway must not block everyone else (eMoE: no scheduled request's SLO may *become* violated)."""
        return self._tpot_ok(s, now, 0.0, batch - 1) and not self._tpot_ok(s, now, stall, batch)

    def _slo(self, waiting, running, now):
        p, cfg = self.profile, self.config
        admit, refuse = [], []
        used = sum(s.kv_tokens for s in running)
        scheduled = list(running)
        delay = 0.0  # prefill time of the requests admitted earlier in this round
        # when does the first running request free its slot (if nothing is admitted)?
        free_in = min((max(1, s.expected_tokens) * p.step_s(len(running)) for s in running), default=0.0)
        for s in sorted(waiting, key=lambda s: s.ttft_deadline):  # SLO stringency: earliest TTFT deadline first
            pre = p.prefill_s(len(s.prompt_ids))
            ttft_now = (now - s.arrival) + delay + pre
            miss = ttft_now > s.ttft_slo
            if not miss and self._fits(s, len(scheduled), used):
                batch = len(scheduled) + 1
                own_ok = self._tpot_ok(s, now, 0.0, batch) or not self._tpot_ok(s, now, 0.0, 1)
                if own_ok and not any(self._breaks(r, now, delay + pre, batch) for r in scheduled):
                    admit.append(s)
                    scheduled.append(s)
                    used += s.kv_tokens
                    delay += pre
                    continue
            # not admitted now: will it still meet its TTFT when capacity frees up?
            if not miss:
                miss = (now - s.arrival) + delay + free_in + pre > s.ttft_slo
            if not miss:
                continue  # keep waiting
            if cfg.on_miss == "degrade":
                if not s.degraded:
                    s.degraded = True
                    s.alpha = max(s.alpha, cfg.degrade_alpha)
                    self.degraded += 1
                if self._fits(s, len(scheduled), used):  # best effort, after the requests that can still make it
                    admit.append(s)
                    scheduled.append(s)
                    used += s.kv_tokens
                    delay += pre
                continue
            retry = max(1, math.ceil(free_in + delay))
            predicted = ttft_now if ttft_now > s.ttft_slo else (now - s.arrival) + delay + free_in + pre
            refuse.append((s, 429, f"cannot meet the time-to-first-token target of {s.ttft_slo * 1000:.0f} ms "
                                   f"(predicted {predicted * 1000:.0f} ms under the current load); "
                                   f"retry after {retry} s", float(retry)))
            self.refused += 1
        return admit, refuse


def profile_engine(batcher, prompt_tokens: int = 32, steps: int = 6) -> dict:
    """Measure prefill and decode-step costs (batch 1 and up to 4) before serving; feeds the CostProfile."""
    eng = batcher.engine
    n = max(1, min(prompt_tokens, eng.max_context - steps - 1))
    vocab = eng.hf_config.vocab_size
    g = torch.Generator().manual_seed(0)
    for batch in (1, min(4, batcher.max_batch)):
        seqs = []
        for _ in range(batch):
            ids = torch.randint(0, vocab, (n,), generator=g).tolist()
            seq = Sequence(ids, SamplingParams(max_tokens=steps, temperature=0.0).validate(), task="_profile")
            seq.ttft_slo = seq.tpot_slo = 1e9
            seqs.append(batcher.submit(seq))
        for _ in range(4 * steps):  # bounded: a failed sequence never finishes
            if all(s.finish is not None or s.error is not None for s in seqs):
                break
            batcher.step()
    sched = batcher.scheduler
    return sched.profile.as_dict() if hasattr(sched, "profile") else {}
