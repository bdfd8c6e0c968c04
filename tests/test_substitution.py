"""SMoE cache router: Algorithm 1 against a literal per-token reference, alpha = 0 bit for bit, accounting."""

import dataclasses

import pytest
import torch

import moelite
from moelite.core.arch.base import Routing
from moelite.core.substitution import _stall_keep, cache_router, plan, plan_batch



pytestmark = pytest.mark.usefixtures("one_thread")

def reference(probs, choice, idx, alpha, resident):
    """Algorithm 1 written out token by token with Python sets (the spec the vectorised router must match)."""
    n, e = probs.shape
    k = idx.shape[1]
    out = idx.clone()
    subs = torch.zeros_like(idx, dtype=torch.bool)
    a = [float(alpha[i]) if isinstance(alpha, torch.Tensor) else float(alpha) for i in range(n)]
    s = []
    for i in range(n):
        order = sorted(range(e), key=lambda x: -float(choice[i, x]))  # the architecture's own ranking
        s.append(float(probs[i, order[k]]))
    union = {int(idx[i, j]) for i in range(n) for j in range(k) if float(probs[i, idx[i, j]]) > (1 + a[i]) * s[i]}
    res = {x for x in range(e) if resident[x]}
    for i in range(n):
        sel = {int(x) for x in idx[i]}
        misses = [j for j in range(k) if float(probs[i, idx[i, j]]) <= (1 + a[i]) * s[i]
                  and int(idx[i, j]) not in res | union]
        misses.sort(key=lambda j: float(probs[i, idx[i, j]]))  # lowest score first
        cands = [x for x in range(e) if x not in sel and (x in res or x in union)
                 and (1 - a[i]) * s[i] < float(probs[i, x]) <= s[i] and torch.isfinite(choice[i, x])]
        cands.sort(key=lambda x: -float(probs[i, x]))  # highest score first
        for j, c in zip(misses, cands):
            out[i, j] = c
            subs[i, j] = True
    return out, subs


def random_routing(n, e, k, seed, sharp=2.0):
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n, e, generator=g) * sharp, -1)
    idx = torch.topk(probs, k, -1).indices
    return Routing(probs, probs, idx, probs.gather(1, idx)), g


@pytest.mark.parametrize("seed", range(8))
def test_plan_matches_reference(seed):
    n, e, k = 1 + seed % 4, 16, 4
    r, g = random_routing(n, e, k, seed, sharp=0.7)
    resident = torch.rand(e, generator=g) < 0.4
    alphas = [0.1, 0.3, 0.6, torch.rand(n, generator=g) * 0.8]
    n_sub = 0
    for alpha in alphas:
        want_idx, want_sub = reference(r.probs, r.choice, r.idx, alpha, resident)
        got = plan(r, k, alpha, resident)
        # the one-token list path and the batched tensor path are the same algorithm
        assert (got is None) == (plan_batch(r, k, alpha, resident) is None)
        if got is None:
            assert not want_sub.any()
            continue
        batch = plan_batch(r, k, alpha, resident)
        assert torch.equal(got[0], want_idx) and torch.equal(got[1], want_sub)
        assert torch.equal(batch[0], want_idx) and torch.equal(batch[1], want_sub)
        n_sub += int(got[1].sum())
        for i in range(n):  # each token still runs k distinct experts
            assert len(set(got[0][i].tolist())) == k
    if seed < 3:
        assert n_sub > 0, "the test data should exercise substitution"


@pytest.mark.parametrize("mask_value", [0.0, float("-inf")])
def test_group_limited_ranking(mask_value):
    """DeepSeek group-limited / biased ranking: S is the best still-eligible expert's score; experts of groups the
    architecture masked out (0 for V2, -inf for V3) never substitute, however close their score."""
    probs = torch.tensor([[0.30, 0.20, 0.02, 0.01, 0.045, 0.048, 0.05, 0.03]])
    choice = probs.clone()
    choice[0, 4:6] = mask_value  # group 2 (experts 4, 5) masked
    idx = torch.tensor([[0, 1]])
    r = Routing(probs, choice, idx, probs.gather(1, idx))
    resident = torch.tensor([False, False, True, True, True, True, True, True])
    # S = 0.05 (expert 6); expert 1 (0.20) is top-score at alpha 0.5, so nothing to substitute
    assert plan(r, 2, 0.5, resident) is None and plan_batch(r, 2, 0.5, resident) is None
    # expert 6 (0.05) a low-score miss: window (0.025, 0.05] holds resident 4, 5 (masked) and 7 (0.03): 7 substitutes
    r.idx = torch.tensor([[0, 6]])
    resident[6] = False
    for fn in (plan, plan_batch):
        new, sub = fn(r, 2, 0.5, resident)
        assert new.tolist() == [[0, 7]] and sub.tolist() == [[False, True]]


def test_alpha_zero_changes_nothing():
    r, g = random_routing(3, 16, 4, 7)
    resident = torch.zeros(16, dtype=torch.bool)
    assert plan(r, 4, 0.0, resident) is None
    assert plan(r, 4, torch.zeros(3), resident) is None


def test_substitute_weighted_by_own_score(tiny):
    eng = moelite.load(tiny("mixtral"), expert_budget="25%")  # Mixtral renormalises over the top-k
    block = eng.model.model.layers[0].mlp.block
    probs = torch.tensor([[0.30, 0.26, 0.24, 0.08, 0.07, 0.05, 0.0, 0.0]])
    idx = torch.tensor([[0, 1]])
    r = Routing(probs, probs, idx, probs.gather(1, idx))
    layer = eng.layout.layers[0]
    cache = eng.manager.cache
    for e in list(cache.resident_experts(layer)):  # make expert 2 resident, 0 and 1 not
        cache.slot_of.pop((layer, e))
    cache.slot_of[(layer, 2)] = 0
    ctx = eng.manager.route_ctx
    out = cache_router(ctx, layer, block, r, 0.25)  # S = 0.24; 0.26 is low-score, 0.30 > 1.25*0.24 is top
    assert out.idx.tolist() == [[0, 2]]
    assert out.substituted.tolist() == [[False, True]]
    assert torch.allclose(out.weights, torch.tensor([[0.30 / 0.54, 0.24 / 0.54]]))
    assert cache_router(ctx, layer, block, r, 0.0) is r


def test_run_counts_substitutes_apart_from_hits(tiny):
    eng = moelite.load(tiny("mixtral"), expert_budget="100%")
    m = eng.manager
    layer = eng.layout.layers[0]
    x = torch.randn(2, eng.hf_config.hidden_size)
    idx = torch.tensor([[0, 1], [2, 1]])  # expert 1: a substitute for token 0, selected by token 1
    w = torch.full((2, 2), 0.5)
    m.run(layer, x, idx, w)  # make 0, 1, 2 resident
    sub = torch.tensor([[False, True], [True, False]])  # expert 2 appears only as a substitute
    before = eng.counters()
    m.run(layer, x, idx, w, substituted=sub)
    spent = eng.counters() - before
    assert spent.total.substitutions == 2  # two substituted evaluations
    assert spent.total.hits == 2  # experts 0 and 1 were asked for; 2 is a substitution, not a hit
    assert m.counters.layer(layer).substitutions == 2


def _decode_logits(eng, ids, alpha):
    from transformers import DynamicCache

    cache = DynamicCache(config=eng.hf_config)
    outs = []
    with torch.inference_mode(), eng.manager.request(alpha=alpha):
        eng.model(input_ids=torch.tensor([ids[:4]]), past_key_values=cache, use_cache=True)
        for t in ids[4:]:
            outs.append(eng.model(input_ids=torch.tensor([[t]]), past_key_values=cache, use_cache=True).logits[0, -1])
    return torch.stack(outs)


@pytest.mark.parametrize("arch_name", ["qwen2_moe", "deepseek_v3"])
def test_alpha_zero_is_bit_for_bit_exact(tiny, arch_name):
    path = tiny(arch_name)
    ids = torch.randint(3, 128, (24,), generator=torch.Generator().manual_seed(3)).tolist()
    plain = moelite.load(path, expert_budget="25%")
    routed = moelite.load(path, expert_budget="25%")
    assert routed.manager.call.hook is cache_router
    with plain.manager.request(hook=None):  # no router at all
        want = _decode_logits(plain, ids, 0.0)
    assert torch.equal(_decode_logits(routed, ids, 0.0), want)
    assert routed.stats()["expert_substitutions"] == 0
    # a per-token alpha of zeros is also the exact path; alpha > 0 changes something on this budget
    assert torch.equal(_decode_logits(moelite.load(path, expert_budget="25%"), ids, torch.zeros(1)), want)
    sub = moelite.load(path, expert_budget="25%")
    got = _decode_logits(sub, ids, 0.6)
    assert sub.stats()["expert_substitutions"] > 0 and not torch.equal(got, want)


def test_generate_accounting_keeps_exact_hits_apart(tiny):
    path = tiny("olmoe")
    prompt = list(range(3, 15))
    eng = moelite.load(path, expert_budget="25%", substitution_alpha=0.5)
    eng.eos_ids = set()
    pre = moelite.load(path, expert_budget="25%").generate(prompt, max_tokens=1, temperature=0).stats
    prefill_evals = pre["expert_hits"] + pre["expert_misses"]  # prefill is exact; counted per expert group
    g = eng.generate(prompt, max_tokens=16, temperature=0)
    s = g.stats
    decode_evals = 15 * len(eng.layout.layers) * eng.top_k  # batch 1: every decode step asks k per layer
    assert s["substitution_alpha"] == 0.5 and s["expert_substitutions"] > 0
    assert s["expert_hits"] + s["expert_misses"] + s["expert_substitutions"] == prefill_evals + decode_evals
    # per-request override back to exact: no substitutions in that request
    g0 = eng.generate(prompt, max_tokens=8, temperature=0, substitution_alpha=0.0)
    assert g0.stats["expert_substitutions"] == 0 and eng.stats()["expert_substitutions"] == s["expert_substitutions"]


def test_full_budget_never_substitutes(tiny):
    path = tiny("qwen3_moe")
    full = moelite.load(path, expert_budget="100%", warm_start=True)
    full.eos_ids = set()
    g = full.generate(list(range(3, 12)), max_tokens=12, temperature=0, substitution_alpha=0.9)
    assert g.stats["expert_substitutions"] == 0 and g.stats["expert_misses"] == 0


@pytest.mark.parametrize("n_missing,n_sub,parallel,want", [
    (3, 2, 2, 1),  # 2 rounds -> 1 round needs one substitution, not two
    (2, 1, 2, 0),  # one read round either way: substituting would cost accuracy for nothing
    (2, 2, 2, 2),  # no read at all
    (5, 3, 2, 3),
    (3, 1, 1, 1),  # one reader: every miss is a round
])
def test_stall_mode_substitutes_only_what_removes_a_round(n_missing, n_sub, parallel, want):
    assert _stall_keep(n_missing, n_sub, parallel) == want


def test_stall_mode_router(tiny):
    eng = moelite.load(tiny("mixtral", num_experts=8, num_experts_per_tok=4), expert_budget="100%",
                       substitution_mode="stall", io_threads=2)
    m = eng.manager
    block = eng.model.model.layers[0].mlp.block
    layer = eng.layout.layers[0]
    probs = torch.tensor([[0.20, 0.19, 0.18, 0.17, 0.16, 0.10, 0.0, 0.0]])
    idx = torch.tensor([[0, 1, 2, 3]])  # S = 0.16: with alpha 0.25 all four are low-score
    r = Routing(probs, probs, idx, probs.gather(1, idx))
    m.cache.slot_of.clear()
    m.cache.slot_of[(layer, 4)], m.cache.slot_of[(layer, 3)] = 0, 1  # 3 resident; 0, 1, 2 miss; 4 a candidate
    ctx = m.route_ctx
    assert ctx.substitution_mode == "stall" and ctx.io_parallel == 2
    out = cache_router(ctx, layer, block, r, 0.25)  # 3 misses = 2 rounds; one substitution -> 1 round
    assert out.idx.tolist() == [[0, 1, 4, 3]] and out.substituted.sum() == 1  # the lowest-score miss (2) goes
    m.cache.slot_of.pop((layer, 3))  # now 4 misses, one candidate: 2 rounds either way
    assert cache_router(ctx, layer, block, r, 0.25) is r
    always = dataclasses.replace(ctx, substitution_mode="always")
    assert cache_router(always, layer, block, r, 0.25).substituted.sum() == 1


def test_profile_scales_alpha_per_layer(tiny):
    """Layer L substitutes at alpha * m[L]: the same routing is substituted at m = 1, kept at m = 0, and a small
    alpha that alone opens no window does once the multiplier widens it."""
    path = tiny("mixtral")
    eng = moelite.load(path, expert_budget="25%", substitution_profile="1,0,0")
    m = eng.manager
    first, second, third = eng.layout.layers  # the tiny checkpoints have 3 MoE layers
    assert dict(m.call.alpha_scale) == dict(m.route_ctx.alpha_scale) == {first: 1.0, second: 0.0, third: 0.0}
    block = eng.model.model.layers[0].mlp.block
    probs = torch.tensor([[0.30, 0.26, 0.24, 0.08, 0.07, 0.05, 0.0, 0.0]])
    r = Routing(probs, probs, torch.tensor([[0, 1]]), probs[:, :2])
    for layer in (first, second):
        for e in list(m.cache.resident_experts(layer)):
            m.cache.slot_of.pop((layer, e))
        m.cache.slot_of[(layer, 2)] = layer  # expert 2 resident, 0 and 1 missing, in both layers
    ctx = m.route_ctx
    assert cache_router(ctx, first, block, r, 0.25).substituted.tolist() == [[False, True]]
    assert cache_router(ctx, second, block, r, 0.25) is r  # multiplier 0: this layer stays exact
    assert cache_router(ctx, second, block, r, torch.tensor([0.25])) is r
    # 0.26 <= (1 + 0.05) * 0.24 is false: at alpha 0.05 expert 1 is top-score; times 4 = 0.2 it is low-score
    with m.request(alpha_scale={first: 4.0, second: 1.0, third: 1.0}):  # one call's profile
        ctx = m.route_ctx
        assert cache_router(ctx, second, block, r, 0.05) is r
        assert cache_router(ctx, first, block, r, 0.05).substituted.tolist() == [[False, True]]
    assert dict(m.route_ctx.alpha_scale) == {first: 1.0, second: 0.0, third: 0.0}  # the engine's own again
    from moelite.config import ALPHA_CAP, layer_alpha

    assert layer_alpha(0.5, 100.0) == ALPHA_CAP < 1  # capped below 1: the window stays above score 0
    assert torch.equal(layer_alpha(torch.tensor([0.1, 0.5]), 4.0), torch.tensor([0.4, ALPHA_CAP]))


def test_profile_of_zeros_is_exact_and_bad_profiles_are_refused(tiny, tmp_path):
    path = tiny("qwen2_moe")
    ids = torch.randint(3, 128, (20,), generator=torch.Generator().manual_seed(5)).tolist()
    want = _decode_logits(moelite.load(path, expert_budget="25%"), ids, 0.0)
    zero = moelite.load(path, expert_budget="25%", substitution_profile=[0.0, 0.0, 0.0])
    assert torch.equal(_decode_logits(zero, ids, 0.6), want) and zero.stats()["expert_substitutions"] == 0
    plain = moelite.load(path, expert_budget="25%")  # the same alpha without the profile does substitute here
    assert not torch.equal(_decode_logits(plain, ids, 0.6), want) and plain.stats()["expert_substitutions"] > 0
    with pytest.raises(ValueError, match="2 multipliers for the 3 MoE layers"):
        moelite.load(path, expert_budget="25%", substitution_profile="1,1")
    with pytest.raises(ValueError, match="finite number >= 0"):
        moelite.load(path, substitution_profile=[1.0, -1.0])
    bad = tmp_path / "p.json"
    bad.write_text('{"layers": [0, 1]}')
    with pytest.raises(ValueError, match='no "profile" list'):
        moelite.load(path, substitution_profile=str(bad))
    with pytest.raises(ValueError, match="neither a comma list"):
        moelite.load(path, substitution_profile=str(tmp_path / "missing.json"))
    other = tmp_path / "other.json"  # another model's calibration with the same number of layers
    other.write_text('{"profile": [1, 1, 1], "layers": [1, 2, 3], "num_experts": 8}')
    with pytest.raises(ValueError, match="calibrated on MoE layers"):
        moelite.load(path, substitution_profile=str(other))


def test_profile_from_costs():
    from moelite.eval.calibrate import profile_from_costs

    p = profile_from_costs([4.0, 1.0, None], gamma=2.0)
    assert p[2] == 1.0 and p[0] < 1.0 < p[1]  # costlier layer -> smaller multiplier; unmeasured layer -> 1
    assert p[1] / p[0] == pytest.approx(16.0, rel=1e-3)  # (cost ratio 4) ** gamma
    assert sum(p[:2]) / 2 == pytest.approx(1.0, abs=1e-3)
    assert profile_from_costs([1.0, 1.0], gamma=2.0) == [1.0, 1.0]
    with pytest.raises(ValueError, match="gamma"):
        profile_from_costs([1.0], gamma=-1)


def test_calibrate_writes_a_profile_the_engine_loads(tiny, tmp_path):
    from moelite.eval.calibrate import calibrate

    path = tiny("qwen2_moe")
    eng = moelite.load(path, expert_budget="25%")
    ids = torch.randint(3, 128, (160,), generator=torch.Generator().manual_seed(2)).tolist()
    res = calibrate(eng, ids, probe_alpha=0.6, max_tokens=96, window=64, stride=32)
    assert res["layers"] == eng.layout.layers and len(res["profile"]) == len(eng.layout.layers)
    rows = res["per_layer"]
    assert any(r["substitutions_per_token"] > 0 for r in rows)  # each layer alone was substituted at the probe
    assert dict(eng.manager.call.alpha_scale) == {} and eng.manager.call.alpha == 0.0  # restored
    out = tmp_path / "profile.json"
    import json

    out.write_text(json.dumps(res))
    again = moelite.load(path, expert_budget="25%", substitution_profile=str(out))
    assert list(again.manager.call.alpha_scale.values()) == res["profile"]


def test_calibrate_refuses_bad_input_before_any_pass(tiny):
    from moelite.eval.calibrate import calibrate

    path = tiny("qwen2_moe")
    ids = list(range(3, 60))
    eng = moelite.load(path, expert_budget="25%")
    for kw, msg in (({"gamma": float("nan")}, "gamma"), ({"max_tokens": 0}, "max_tokens"),
                    ({"probe_alpha": 1.0}, "probe_alpha")):
        with pytest.raises(ValueError, match=msg):
            calibrate(eng, ids, **kw)
    assert eng.stats()["expert_evaluations"] == 0  # nothing ran
    full = moelite.load(path, expert_budget="100%", warm_start=True)  # nothing can be substituted: say so
    with pytest.raises(ValueError, match="no layer substituted anything"):
        calibrate(full, ids, probe_alpha=0.6, max_tokens=24, window=16, stride=8)
