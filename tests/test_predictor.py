"""eMoE predictors on synthetic and recorded traces, their metrics, and the Preloader wired into the engine."""

import json

import numpy as np
import pytest
import torch

import moelite
from moelite.cli import main as cli_main
from moelite.emoe.predictors import GRUPredictor, LayerTransition, MLPTransition, PreviousPrompt, RecentMean, RequestRouting, TaskFrequency, compare_predictors, load_task_table, requests_from_trace
from moelite.emoe.preloader import Preloader
from moelite.emoe.scoring import evaluate_a, evaluate_l, score
from moelite.eval.prompts import PROMPTS
from moelite.emoe.classifier import TaskClassifier
from moelite.core.traces import Trace, record

E, K, L = 16, 2, 3
torch.set_num_threads(1)  # tiny nets: more threads only contend on the shared cores


def synthetic(n: int, seed: int) -> list[RequestRouting]:
    """Task "python" uses experts 0..3 at layer 0, "shakespeare" 8..11; at layer l a token's expert is (layer-0 expert + l)
    mod E, so layer-to-layer transitions are deterministic. Tasks alternate in runs of 3."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        task = "python" if (i // 3) % 2 == 0 else "shakespeare"
        base = 0 if task == "python" else 8
        first = base + rng.choice(4, size=(20, K), p=[0.7, 0.2, 0.05, 0.05])  # [T, k]
        first[:, 1] = base + (first[:, 0] - base + 1) % 4  # distinct experts per token
        toks = [(first + layer) % E for layer in range(L)]
        counts = np.stack([np.bincount(t.reshape(-1), minlength=E) for t in toks])
        out.append(RequestRouting(task, ("def x():" if task == "python" else "ROMEO:\nthou art"), counts,
                                  counts.copy(), toks, 20))
    return out


def test_score_and_random_expectations():
    counts = np.array([5, 4, 0, 0, 3, 0, 0, 0])
    pred = np.array([0.5, 0.3, 0.2, 0, 0, 0, 0, 0])
    s = score(pred, counts, k=2, cover=2)
    assert s["topk_accuracy"] == 1.0 and s["random_topk_accuracy"] == 2 / 8
    # hot sets (> 1/8): predicted {0, 1, 2}, actual {0, 1, 4}
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert s["random_precision"] == 3 / 8 and s["random_recall"] == 3 / 8
    assert s["coverage"] == pytest.approx(9 / 12) and s["random_coverage"] == 2 / 8


def test_task_frequency_beats_persistence_and_random_on_switching_tasks():
    train, test = synthetic(30, 0), synthetic(18, 1)
    tf = evaluate_a(TaskFrequency().fit(train), test, K, 4, TaskClassifier().classify)
    prev = evaluate_a(PreviousPrompt().fit(train), test, K, 4)
    rec = evaluate_a(RecentMean(4).fit(train), test, K, 4)
    assert tf["topk_accuracy"] > 0.8 and tf["coverage"] == pytest.approx(1.0)
    assert tf["topk_accuracy"] > prev["topk_accuracy"] and tf["topk_accuracy"] > rec["topk_accuracy"]
    assert prev["coverage"] < 1.0  # a task switch every 3 prompts costs persistence
    assert tf["topk_accuracy_vs_random"] > 1.5 * 1.0 and tf["random_topk_accuracy"] == K / E


def test_layer_predictors_learn_deterministic_transitions():
    train, test = synthetic(30, 0), synthetic(12, 2)
    lt = evaluate_l(LayerTransition().fit(train), test, K, 4)
    mlp = evaluate_l(MLPTransition(epochs=30).fit(train), test, K, 4)
    # layers 1..2 are exact functions of layer 0; layer 0 comes from the previous prompt (wrong at switches)
    assert lt["coverage"] > 0.8 and mlp["coverage"] > 0.8
    pred = LayerTransition().fit(train).predict(test[0], 1, None)
    np.testing.assert_allclose(pred.sum(), 1.0)
    assert set(np.argsort(-pred)[:4]) == set(np.nonzero(test[0].counts[1])[0])


def test_gru_predictor_fits_and_outputs_distributions():
    train = synthetic(24, 0)
    g = GRUPredictor(with_task=True, epochs=40).fit(train)
    p = g.predict(train[:5], "shakespeare")
    assert p.shape == (L, E) and np.allclose(p.sum(-1), 1.0, atol=1e-5)
    res = compare_predictors(train, synthetic(9, 3), K, 4, TaskClassifier())
    assert set(res["A"]) == {"previous-prompt", "recent-mean", "task-frequency", "gru", "gru+task"}
    assert res["winner_A"] in res["A"] and res["winner_L"] in res["L"]


@pytest.fixture(scope="module")
def ckpt(tiny):
    return tiny("qwen2_moe", tokenizer=True, vocab_size=300, num_experts=16, num_experts_per_tok=4,
                num_hidden_layers=4)


@pytest.fixture(scope="module")
def traced(ckpt, tmp_path_factory):
    eng = moelite.load(ckpt, expert_budget="100%", num_threads=1)
    path = record(eng, PROMPTS[:9], 4, tmp_path_factory.mktemp("tr") / "t.npz")
    return path


def test_requests_from_recorded_trace(traced):
    reqs = requests_from_trace(Trace.load(traced))
    assert len(reqs) == 9 and reqs[0].task == "shakespeare" and reqs[6].task == "python"
    for r in reqs:
        n_tok = r.tokens[0].shape[0]
        assert all(t.shape == (n_tok, 4) for t in r.tokens)
        assert (r.counts.sum(1) == n_tok * 4).all()
        assert (r.prefill.sum(1) == r.prompt_tokens * 4).all() and n_tok == r.prompt_tokens + 3


def test_cli_predict_train(traced, tmp_path, capsys):
    out = tmp_path / "table.json"
    assert cli_main(["predict", "train", "--trace", str(traced), "--out", str(out)]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["test_requests"] == 3 and res["train_requests"] == 6 and out.is_file()
    train = requests_from_trace(Trace.load(traced))[:6]
    np.testing.assert_allclose(load_task_table(out).predict([], "python"), TaskFrequency().fit(train).predict([], "python"))
    assert cli_main(["predict", "train", "--trace", str(traced), "--cover", "2"]) == 2  # ValueError -> exit 2


def test_preloader_exact_and_periodic(ckpt, traced):
    train = requests_from_trace(Trace.load(traced))
    tf = TaskFrequency().fit(train)
    ref = moelite.load(ckpt, expert_budget="40%", cache_scope="layer", num_threads=1)
    base = Preloader(ref, "none")
    eng = moelite.load(ckpt, expert_budget="40%", cache_scope="layer", num_threads=1)
    pl = Preloader(eng, "task", tf, period=4, keep=False, fill=1.0)
    for i, (_, prompt) in enumerate(PROMPTS[:10]):
        want = base.generate(prompt, max_tokens=5, temperature=0)
        ids = eng.encode(prompt)
        info = pl.before(prompt, len(ids))
        # the plan is resident before prefill: top experts of the classified task, per layer
        per = pl.slots
        assert per == eng.pool.n_slots // len(eng.layout.layers)
        f = pl.freq[info["task"]]  # the prediction of the last invocation, reused in between
        for pos, layer in enumerate(eng.layout.layers):
            top = np.argsort(-f[pos], kind="stable")[:per]
            assert all(eng.manager.cache.resident((layer, int(e))) for e in top)
        got = eng.generate(ids, max_tokens=5, temperature=0)
        pl.after()
        assert got.token_ids == want.token_ids  # exact: preloading changes speed only
        assert info["predicted"] == (i % 4 == 0)  # predictor invoked every p = 4 prompts
    assert pl.stats()["predictor_calls"] == 3 and pl.requests == 10
    g = pl.generate(PROMPTS[12][1], max_tokens=5, temperature=0)
    pre, dec = g.stats["routed"]["prefill"], g.stats["routed"]["decode"]
    # in exact mode the routed residency equals the engine's own hit/miss counters
    assert (pre[0], pre[1]) == (g.stats["prefill_hits"], g.stats["prefill_misses"])
    assert (dec[0], dec[1]) == (g.stats["decode_hits"], g.stats["decode_misses"])
    assert g.stats["ttft_total_s"] >= g.stats["ttft_s"] and g.stats["request_s"] > 0
    assert pl.history[-1].counts.sum() == g.stats["completion_tokens"] * 4 * 4 + (g.stats["prompt_tokens"] - 1) * 4 * 4
    pl.close()
    assert pl._observe not in eng.manager.observers


def test_preloader_reroute_and_validation(ckpt, traced):
    tf = TaskFrequency().fit(requests_from_trace(Trace.load(traced)))
    eng = moelite.load(ckpt, expert_budget="40%", cache_scope="layer", num_threads=1)
    pl = Preloader(eng, "task", tf, reroute=True, fill=0.9)  # 5 of 6 slots per layer: >= k resident
    g = pl.generate(PROMPTS[1][1], max_tokens=5, temperature=0)
    assert g.stats["prefill_misses"] == 0 and g.stats["expert_substitutions"] > 0
    assert g.stats["prefill_hits"] >= 0 and eng.manager.call.hook is not None
    for kw, msg in ((dict(mode="x"), "mode: 'x' is not one of none, every, periodic, task"),
                    (dict(mode="task", predictor=tf, period=0), "period: 0 must be an int >= 1"),
                    (dict(mode="every"), "predictor: mode 'every' needs a fitted APredictor"),
                    (dict(mode="task", predictor=tf, fill=0), "fill: 0 must be in")):
        with pytest.raises(ValueError, match=msg):
            Preloader(eng, **kw)
    with pytest.raises(ValueError, match="fit: no requests"):
        RecentMean().fit([])
    with pytest.raises(ValueError, match="needs a task-aware predictor"):
        Preloader(eng, "task", PreviousPrompt().fit(requests_from_trace(Trace.load(traced))))


def test_preloader_keeps_the_plan_pinned_across_requests(ckpt, traced):
    tf = TaskFrequency().fit(requests_from_trace(Trace.load(traced)))
    eng = moelite.load(ckpt, expert_budget="60%", num_threads=1)  # global scope
    pl = Preloader(eng, "periodic", tf, period=100, keep=True, fill=0.5)
    assert pl.slots == int(eng.pool.n_slots * 0.5)
    exact = moelite.load(ckpt, expert_budget="100%", num_threads=1)
    for _, prompt in PROMPTS[:4]:
        g = pl.generate(prompt, max_tokens=4, temperature=0)
        assert g.token_ids == exact.generate(prompt, max_tokens=4, temperature=0).token_ids
        kept = dict(pl._kept)
        assert len(kept) == pl.slots and all(eng.manager.cache.slot_of[k] == s for k, s in kept.items())
        assert all(eng.manager.cache.pins.get(s, 0) >= 1 for s in kept.values())  # still pinned after the request
    assert g.stats["preloaded"] == 0  # same plan (one predictor call): nothing to read again
    pl.close()
    assert not eng.manager.cache.pins
    # task mode: a task switch swaps the pinned plan (the old plan's experts are unpinned, the new one pinned)
    pl = Preloader(eng, "task", tf, keep=True, fill=0.5)
    pl.generate(PROMPTS[0][1], max_tokens=2, temperature=0)
    first = dict(pl._kept)
    pl.generate(PROMPTS[6][1], max_tokens=2, temperature=0)
    second = dict(pl._kept)
    assert set(first) != set(second) and len(second) == pl.slots
    pinned = {s for s, n in eng.manager.cache.pins.items() if n > 0}
    assert pinned == set(second.values())
    pl.close()
    assert not eng.manager.cache.pins
    with pytest.raises(ValueError, match="fill: 0.95 with keep=True leaves no slots"):
        Preloader(eng, "task", tf, keep=True, fill=0.95)
