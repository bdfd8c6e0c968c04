"""Continuous batching and admission: batched greedy decode is exact, requests join and leave between steps,
one MoE call per layer per step, per-sequence alphas, cancel / timeout / queue bounds, FCFS vs SLO admission."""

import time

import pytest
import torch

import moelite
from moelite.serve.batching import Batcher, Rejected, Sequence, batch_generate
from moelite.core.sampling import SamplingParams
from moelite.serve.scheduler import CostProfile, Scheduler, SchedulerConfig, TaskSLO


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny tensors: one intra-op thread avoids OpenMP spin-waits on a shared 2-core machine (100x here)."""
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _prompts(n, seed=0, vocab=128):
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, vocab, (int(k),), generator=g).tolist() for k in torch.randint(2, 14, (n,), generator=g)]


def _engine(tiny, arch, **kw):
    eng = moelite.load(tiny(arch, **kw), expert_budget="40%")
    eng.eos_ids = set()  # random models: run every sequence to max_tokens
    return eng


def test_batched_greedy_equals_sequential(tiny, arch):
    eng = _engine(tiny, arch)
    prompts = _prompts(4, seed=1)
    ref = [eng.generate(p, max_tokens=10, temperature=0).token_ids for p in prompts]
    got = batch_generate(eng, prompts, max_tokens=10, temperature=0)
    assert [g.token_ids for g in got] == ref
    assert all(g.finish_reason == "length" and g.stats["completion_tokens"] == 10 for g in got)


def test_join_and_leave_between_steps_and_one_moe_call_per_step(tiny):
    eng = _engine(tiny, "qwen2_moe", num_experts=16, num_experts_per_tok=4)
    prompts = _prompts(5, seed=2)
    lens = [3, 9, 5, 12, 7]
    ref = [eng.generate(p, max_tokens=m, temperature=0).token_ids for p, m in zip(prompts, lens)]
    calls = []  # (layer, tokens) of every MoE call during decode
    eng.manager.add_observer(lambda layer, routing, phase: phase == "decode" and calls.append(
        (layer, routing.idx.shape[0], len(set(routing.idx.flatten().tolist())))))
    b = Batcher(eng, max_batch=8)
    out, order = {}, []

    def add(i):
        b.submit(Sequence(prompts[i], SamplingParams(lens[i], 0.0).validate(),
                          emit=lambda ev, i=i: ev[0] == "done" and (out.__setitem__(i, ev[1]), order.append(i))))
    add(0), add(1)
    b.step(), b.step()
    add(2), add(3)  # join mid-flight
    for _ in range(3):
        b.step()
    add(4)
    while len(out) < 5:
        before = eng.counters()
        n_batch, n_calls, queued = len(b.running), len(calls), b.queue_depth()
        b.step()
        joined = queued - b.queue_depth()  # prefilled in this step, then decoded with the others
        step_calls = calls[n_calls:]
        if n_batch + joined:  # one MoE call per layer per step, with one token per running sequence
            assert len(step_calls) == len(eng.layout.layers)
            assert all(tok == n_batch + joined for _, tok, _ in step_calls)
            if not joined:  # each distinct expert looked up once per layer per step, not once per token
                d = (eng.counters() - before).decode
                assert d.hits + d.misses + d.in_flight == sum(u for *_, u in step_calls)
    assert [out[i]["token_ids"] for i in range(5)] == ref
    assert order[0] == 0 and b.running == [] and b.idle()


def test_seeded_sampling_matches_engine(tiny):
    eng = _engine(tiny, "mixtral")
    prompts = _prompts(3, seed=3)
    ref = [eng.generate(p, max_tokens=8, temperature=0.9, top_p=0.9, seed=7).token_ids for p in prompts]
    got = batch_generate(eng, prompts, max_tokens=8, temperature=0.9, top_p=0.9, seed=7)
    assert [g.token_ids for g in got] == ref


def test_per_sequence_alpha_reaches_moe_layers(tiny):
    eng = _engine(tiny, "qwen3_moe")
    seen = []

    def hook(ctx, layer, block, routing, alpha):  # a routing hook that keeps the routing: records alpha
        seen.append(alpha.tolist() if isinstance(alpha, torch.Tensor) else alpha)
        return routing
    with eng.request(hook=hook):
        batch_generate(eng, _prompts(3, seed=4), max_tokens=3, temperature=0, substitution_alpha=[0.1, 0.0, 0.3])
        tensors = [a for a in seen if isinstance(a, list)]
        assert tensors and all(a == pytest.approx([0.1, 0.0, 0.3]) for a in tensors)  # [B], in sequence order
        seen.clear()
        batch_generate(eng, _prompts(2, seed=5), max_tokens=3, temperature=0, substitution_alpha=0.2)
        assert seen and all(a == pytest.approx(0.2) for a in seen)  # same alpha: a float
    assert eng.manager.alpha == 0.0  # each step's alpha ended with the step
    with pytest.raises(ValueError, match="substitution_alpha"):
        batch_generate(eng, _prompts(2), max_tokens=3, substitution_alpha=1.5)


def test_cancel_timeout_queue_bound_and_drain(tiny):
    eng = _engine(tiny, "olmoe")
    events = {}
    b = Batcher(eng, max_queue=2, max_batch=4)

    def seq(name, max_tokens=50, timeout=None):
        events[name] = []
        return Sequence(_prompts(1)[0], SamplingParams(max_tokens, 0.0).validate(), emit=events[name].append,
                        timeout=timeout)
    a, c = b.submit(seq("a")), b.submit(seq("c", timeout=0.0))
    with pytest.raises(Rejected) as err:
        b.submit(seq("x"))
    assert err.value.status == 429
    time.sleep(0.01)
    b.step()
    assert events["c"][-1][:2] == ("error", 429) and "timed out" in events["c"][-1][2]
    assert a in b.running and a.cache is not None
    a.cancel()
    b.step()  # leaves at the next step boundary, its KV cache dropped, no "done"
    assert b.running == [] and a.cache is None and not any(e[0] == "done" for e in events["a"])
    slow = b.submit(seq("t", timeout=0.2))
    b.step()  # admitted, first token
    time.sleep(0.25)
    b.step()  # past its timeout while running: finishes with what it has
    assert events["t"][-1][0] == "done" and events["t"][-1][1]["finish_reason"] == "timeout"
    assert slow.cache is None and b.running == []
    b.drain()
    with pytest.raises(Rejected) as err:
        b.submit(seq("y"))
    assert err.value.status == 503


def test_background_thread_serves_concurrent_submissions(tiny):
    eng = _engine(tiny, "deepseek_v3")
    prompts = _prompts(4, seed=6)
    ref = [eng.generate(p, max_tokens=6, temperature=0).token_ids for p in prompts]
    b = Batcher(eng, max_batch=4).start()
    done = {}
    try:
        for i, p in enumerate(prompts):
            b.submit(Sequence(p, SamplingParams(6, 0.0).validate(),
                              emit=lambda ev, i=i: ev[0] == "done" and done.__setitem__(i, ev[1]["token_ids"])))
        t0 = time.time()
        while len(done) < 4 and time.time() - t0 < 30:
            time.sleep(0.01)
    finally:
        b.stop()
    assert [done[i] for i in range(4)] == ref and b.steps < 4 * 6  # shared steps, not one loop per request


# ---- admission ------------------------------------------------------------------------------------------------
def _seq(n_prompt, ttft, tpot=10.0, max_tokens=16, arrival=0.0, task="default"):
    s = Sequence([5] * n_prompt, SamplingParams(max_tokens, 0.0).validate(), ttft_slo=ttft, tpot_slo=tpot, task=task)
    s.arrival = arrival
    return s


def _profile(prefill_per_tok=0.01, step=0.1):
    p = CostProfile()
    p.c_prefill, p.misses_per_prefill, p.s0, p.s1 = prefill_per_tok, 0.0, step, 0.0
    return p


def test_slo_admission_orders_by_stringency_and_refuses_early():
    sched = Scheduler(SchedulerConfig(mode="slo", max_batch=2), _profile(), max_context=256)
    loose, tight, hopeless = _seq(10, ttft=5.0), _seq(10, ttft=0.5), _seq(10, ttft=0.05)
    admit, refuse = sched.schedule([loose, tight, hopeless], [], now=0.0)
    assert admit == [tight, loose]  # earliest TTFT deadline first
    assert [r[0] for r in refuse] == [hopeless] and refuse[0][1] == 429 and refuse[0][3] >= 1
    assert "time-to-first-token target of 50 ms" in refuse[0][2]
    # batch full: a waiter that would still make it by the time a slot frees keeps waiting; one that would not
    # is refused now rather than after a long wait
    running = [_seq(10, ttft=5.0), _seq(10, ttft=5.0)]
    for r in running:
        r.t_first, r.expected_tokens = 0.0, 4
    patient, urgent = _seq(10, ttft=3.0), _seq(10, ttft=0.3)
    admit, refuse = sched.schedule([patient, urgent], running, now=0.0)
    assert admit == [] and [r[0] for r in refuse] == [urgent]


def test_slo_admission_protects_running_tpot_and_token_budget():
    sched = Scheduler(SchedulerConfig(mode="slo", max_batch=8, token_budget=100), _profile(step=0.05), 256)
    run = _seq(10, ttft=5.0, tpot=0.08)  # on track: (0.5 s + 10 x 0.05 s) / 14 tokens = 71 ms
    run.t_first, run.expected_tokens = 0.0, 10
    run.out_ids = [1] * 5
    big_prompt = _seq(40, ttft=10.0)  # its prefill (0.4 s) would push the running request to 100 ms per token
    admit, refuse = sched.schedule([big_prompt], [run], now=0.5)
    assert admit == [] and refuse == []
    run.tpot_slo = 0.06  # already missing its target: it no longer blocks admissions
    assert sched.schedule([big_prompt], [run], now=0.5)[0] == [big_prompt]
    too_big = _seq(10, ttft=10.0, max_tokens=90)  # 10 + 90 + the running 26 > token budget 100
    assert sched.schedule([too_big], [], now=0.0)[0] == [too_big]
    assert sched.schedule([too_big], [run], now=0.0)[0] == []


def test_fcfs_never_refuses_and_degrade_raises_alpha():
    fcfs = Scheduler(SchedulerConfig(mode="fcfs", max_batch=1), _profile(), 256)
    first, second = _seq(10, ttft=0.001, arrival=0.0), _seq(10, ttft=5.0, arrival=0.1)
    assert fcfs.schedule([first, second], [], now=1.0) == ([first], [])
    deg = Scheduler(SchedulerConfig(mode="slo", on_miss="degrade", degrade_alpha=0.25), _profile(), 256)
    late = _seq(10, ttft=0.01)
    admit, refuse = deg.schedule([late], [], now=1.0)
    assert admit == [late] and refuse == [] and late.degraded and late.alpha == 0.25


def test_scheduler_config_validation(tmp_path):
    with pytest.raises(ValueError, match="scheduler.mode: 'lifo'"):
        SchedulerConfig(mode="lifo").validate()
    with pytest.raises(ValueError, match=r"tasks.chat.ttft_s: -1"):
        SchedulerConfig(tasks={"chat": TaskSLO(ttft_s=-1)}).validate()
    f = tmp_path / "slo.json"
    f.write_text('{"mode": "fcfs", "tasks": {"chat": {"ttft_s": 0.5, "tpot_s": 0.1, "expected_tokens": 20}}}')
    cfg = SchedulerConfig.load(f, max_batch=4)
    assert cfg.mode == "fcfs" and cfg.max_batch == 4 and cfg.tasks["chat"].ttft_s == 0.5 and "default" in cfg.tasks
    f.write_text('{"modes": "fcfs"}')
    with pytest.raises(ValueError, match="unknown field"):
        SchedulerConfig.load(f)


def test_mixed_alphas_keep_the_exact_sequence_exact(tiny):
    """SMoE substitution on for two sequences, off (alpha 0) for the third: the third decodes exactly."""
    eng = moelite.load(tiny("qwen2_moe", num_experts=16, num_experts_per_tok=4), expert_budget="30%")
    eng.eos_ids = set()
    prompts = _prompts(3, seed=8)
    exact = eng.generate(prompts[1], max_tokens=10, temperature=0).token_ids
    before = eng.counters()
    got = batch_generate(eng, prompts, max_tokens=10, temperature=0, substitution_alpha=[0.5, 0.0, 0.5])
    assert got[1].token_ids == exact
    assert (eng.counters() - before).total.substitutions > 0  # the others did substitute


def test_unreadable_expert_fails_only_the_sequences_that_need_it(tiny):
    """A decode step of three sequences fails part-way on an expert read (the KV caches of the first layers already
    grew): the step is rolled back and run per sequence; the one whose own step cannot read fails with the read
    error, the other two go on and end with exactly the tokens they have alone."""
    from moelite.core.expert_store import ExpertReadError

    eng = _engine(tiny, "qwen2_moe")
    prompts = _prompts(3, seed=5)
    ref = [eng.generate(p, max_tokens=8, temperature=0).token_ids for p in prompts]
    b = Batcher(eng, max_batch=4)
    events: dict[int, list] = {0: [], 1: [], 2: []}
    seqs = [Sequence(p, SamplingParams(8, 0.0).validate(), emit=events[i].append) for i, p in enumerate(prompts)]
    for s in seqs:
        b.submit(s)
    b.step()  # prefill all three, first decode step
    real = b.runner.decode
    bad = seqs[1]

    def decode(batch):  # the batch's forward runs (caches grow), then the unreadable expert stops it
        out = real(batch)
        if bad in batch:
            raise ExpertReadError("expert 3 of layer 1: short read in 'model.safetensors' at offset 123")
        return out
    b.runner.decode = decode
    while b.running:
        b.step()
    done = {i: [e for e in ev if e[0] == "done"] for i, ev in events.items()}
    assert done[0][0][1]["token_ids"] == ref[0] and done[2][0][1]["token_ids"] == ref[2]
    errors = [e for e in events[1] if e[0] == "error"]
    assert not done[1] and len(errors) == 1 and "expert 3 of layer 1" in errors[0][2]
    assert isinstance(bad.error, ExpertReadError) and bad.cache is None
