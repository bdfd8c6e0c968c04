"""Task classifier, similarity, load rule, preload planning, routing overrides and the sensitivity profiler."""

import numpy as np
import pytest

import moelite
from moelite.eval.prompts import PROMPTS
from moelite.emoe.classifier import NGramBayes, TaskClassifier, accuracy
from moelite.eval.corpus import corpus_prompts, data_dir, mixed_stream
from moelite.emoe.load_rule import load_scores, plan_preload
from moelite.emoe.sensitivity import profile_sensitivity, random_router, reroute_to_resident, routing_override, similarity


def test_keyword_rules_classify_builtin_prompts():
    clf = TaskClassifier()
    assert clf.tasks == ["shakespeare", "python", "wiki"]
    assert accuracy(clf.classify, PROMPTS) >= 17 / 18
    assert clf.classify("def f(self):\n    return None\n") == "python"
    assert clf.classify("KING LEAR:\nThou art a lord, and hath\n") == "shakespeare"


def test_user_defined_task_and_validation():
    clf = TaskClassifier(tasks={"sql": [r"\bSELECT\b", r"\bFROM\b", r"\bWHERE\b"]})
    assert "sql" in clf.tasks
    assert clf.classify("SELECT name FROM users WHERE id = 3") == "sql"
    only = TaskClassifier(tasks={"sql": [r"\bSELECT\b"]}, extend_defaults=False, default="sql")
    assert only.tasks == ["sql"] and only.classify("no keywords here") == "sql"
    with pytest.raises(ValueError, match="tasks: 'bad': bad regex"):
        TaskClassifier(tasks={"bad": ["("]})
    with pytest.raises(ValueError, match="tasks: 'empty' needs a non-empty list"):
        TaskClassifier(tasks={"empty": []})
    with pytest.raises(ValueError, match="default: 'nope' is not one of the tasks"):
        TaskClassifier(default="nope")
    with pytest.raises(ValueError, match=r"fit: tasks \['x'\] have no rules"):
        TaskClassifier().fit([("x", "text")])


def test_learned_classifier_decides_when_no_rule_matches():
    train = [("a", "apple apricot avocado"), ("a", "apple banana apricot"), ("b", "zebra zucchini zinc"),
             ("b", "zinc zoo zebra")]
    nb = NGramBayes().fit(train)
    assert nb.classify("apricot pie") == "a" and nb.classify("zoo zebra") == "b"
    clf = TaskClassifier(tasks={"a": [r"\bqqq\b"], "b": [r"\bwww\b"]}, extend_defaults=False).fit(train)
    assert clf.classify("zinc zebra") == "b"  # no rule matches: the learned classifier decides
    assert clf.classify("qqq zebra") == "a"  # a rule matches: rules first


def test_similarity_values():
    assert similarity([1, 2, 3, 4], [1, 2, 3, 4]) == {"token_agreement": 1.0, "ngram_f1": 1.0}
    assert similarity([1, 2, 3, 4], [5, 6, 7, 8]) == {"token_agreement": 0.0, "ngram_f1": 0.0}
    s = similarity([1, 2, 3, 4], [1, 2, 9, 4])
    assert s["token_agreement"] == 0.75
    # unigram F1 3/4, bigram 1/3, trigram 0, 4-gram 0 -> mean
    assert s["ngram_f1"] == pytest.approx((0.75 + 1 / 3 + 0 + 0) / 4)


def test_load_rule_matches_the_formula():
    f = {"a": np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]), "b": np.array([[0.0, 0.1, 0.9], [1.0, 0.0, 0.0]])}
    n = load_scores([("a", 10), ("a", 20), ("b", 5)], f, {"a": [1, 0], "b": [1, 1]}, {"a": 4, "b": 2})
    want = (30 + 2 * 4) * np.array([[1], [0]]) * f["a"] + (5 + 1 * 2) * f["b"]
    np.testing.assert_allclose(n, want)
    with pytest.raises(ValueError, match="task 'c' has no predicted frequencies"):
        load_scores([("c", 1)], f)
    with pytest.raises(ValueError, match="running: no requests"):
        load_scores([], f)


def test_plan_preload_scopes():
    s = np.array([[0.1, 0.5, 0.0, 0.4], [0.9, 0.0, 0.05, 0.05]])
    assert plan_preload(s, 2, "layer") == [(0, 1), (1, 0), (0, 3), (1, 2)]
    assert plan_preload(s, 3, "global") == [(1, 0), (0, 1), (0, 3)]
    assert (0, 2) not in plan_preload(s, 4, "layer") and (1, 1) not in plan_preload(s, 4, "layer")  # zero scores
    with pytest.raises(ValueError, match="scope: 'x' is not one of layer, global"):
        plan_preload(s, 2, "x")


def test_mixed_stream_runs():
    st = mixed_stream({"a": ["a1", "a2"], "b": ["b1"], "c": ["c1"]}, 40, run_len=(2, 4), seed=1)
    assert len(st) == 40
    runs, cur = [], 1
    for x, y in zip(st, st[1:]):
        if x[0] == y[0]:
            cur += 1
        else:
            runs.append(cur)
            cur = 1
    assert all(2 <= r <= 4 for r in runs)  # the last run may be cut by n
    assert [p for t, p in st if t == "a"][:3] == ["a1", "a2", "a1"]  # round robin
    with pytest.raises(ValueError, match="every task needs"):
        mixed_stream({"a": []}, 3)


def test_corpus_prompts_splits_are_disjoint():
    try:
        data_dir()
    except ValueError:
        pytest.skip("../shared/data not present")
    for task in ("shakespeare", "wiki", "python"):
        tr, te = set(corpus_prompts(task, 30, "train")), set(corpus_prompts(task, 30, "test"))
        assert len(tr) >= 25 and len(te) >= 25 and not tr & te
    with pytest.raises(ValueError, match="split: 'dev' is not one of train, test"):
        corpus_prompts("wiki", 2, "dev")


@pytest.fixture(scope="module")
def engine(tiny):
    path = tiny("qwen2_moe", tokenizer=True, vocab_size=300, num_experts=16, num_experts_per_tok=4,
                num_hidden_layers=4)
    return moelite.load(path, expert_budget="100%", num_threads=1)


def test_reroute_keeps_routing_when_all_resident_and_reroutes_to_residents(tiny, engine):
    ids = engine.encode(PROMPTS[0][1])[:20]
    exact = engine.generate(ids, max_tokens=6, temperature=0).token_ids
    with routing_override(engine, reroute_to_resident):  # 100% budget, all resident after the first pass
        again = engine.generate(ids, max_tokens=6, temperature=0, substitution_alpha=routing_override.ON).token_ids
    assert again == exact and engine.stats()["expert_substitutions"] == 0
    small = moelite.load(engine.path, expert_budget="50%", cache_scope="layer", num_threads=1)
    keep = {layer: [0, 1, 2, 3, 4, 5, 6, 7] for layer in small.layout.layers}
    small.preload(keep)
    seen = []
    hook = reroute_to_resident

    def spy(ctx, layer, block, routing, alpha):
        out = hook(ctx, layer, block, routing, alpha)
        seen.append((layer, out.idx.clone(), routing.idx.clone()))
        return out

    before = small.counters()
    with routing_override(small, spy):
        small.generate(ids, max_tokens=4, temperature=0, substitution_alpha=0.5)
    spent = small.counters() - before
    assert spent.total.misses == spent.total.in_flight == 0  # no expert was read: every selection was resident
    assert spent.total.substitutions > 0 and spent.bytes_read == 0
    for layer, new, old in seen:
        assert set(new.reshape(-1).tolist()) <= set(keep[layer])
        assert all(len(set(row)) == new.shape[1] for row in new.tolist())  # k distinct experts per token


def test_random_router_and_profiler(engine):
    prompts = {"shakespeare": [PROMPTS[0][1]], "python": [PROMPTS[6][1]]}
    hook = random_router(engine.adapter, {engine.layout.layers[0]}, seed=0)
    ids = engine.encode(PROMPTS[0][1])
    with routing_override(engine, hook):
        out = engine.generate(ids, max_tokens=4, temperature=0, substitution_alpha=routing_override.ON)
    assert len(out.token_ids) >= 1
    assert engine.manager.call.hook is not hook and engine.manager.call.in_prefill is False  # restored
    prof = profile_sensitivity(engine, prompts, max_tokens=6, threshold=0.9)
    for task, v in prof["tasks"].items():
        sims = v["similarity_randomised_through_layer"]
        assert len(sims) == len(engine.layout.layers) and all(0 <= x <= 1 for x in sims)
        ok = np.cumprod([x >= 0.9 for x in sims]).astype(bool)  # progressive from the input side
        assert v["s"] == [0.0 if o else 1.0 for o in ok]
    assert min(min(v["similarity_randomised_through_layer"]) for v in prof["tasks"].values()) < 1.0
    with pytest.raises(ValueError, match="threshold"):
        profile_sensitivity(engine, prompts, threshold=0)
