"""One set of counters with one definition per rate; per-call state that ends with the call; typed hooks; no private
attribute used outside the module that defines it; an expert whose read is in flight is not an exact hit."""

import ast
import dataclasses
from concurrent.futures import Future
from pathlib import Path

import pytest

import moelite
from moelite.core.counters import RATE_KEYS, Counters, PhaseTotals, Snapshot
from moelite.core.loader import Loader, timed_read
from moelite.core.call_state import ManagerOptions

PACKAGE = Path(moelite.__file__).resolve().parent
CFG = dict(num_experts=16, num_experts_per_tok=4, num_hidden_layers=4)


# ---- counters and rates ----------------------------------------------------------------------------------------
def test_snapshot_is_immutable_and_deltas_add_up():
    c = Counters()
    c.decode.hits += 3
    c.prefill.misses += 2
    c.bytes_read += 100
    before = c.snapshot()
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.bytes_read = 0
    with pytest.raises(dataclasses.FrozenInstanceError):
        before.decode.hits = 0
    c.decode.hits += 5
    c.decode.in_flight += 1
    c.bytes_read += 50
    d = c.delta(before)
    assert (d.decode.hits, d.decode.in_flight, d.prefill.misses, d.bytes_read) == (5, 1, 0, 50)
    assert before.decode.hits == 3  # the snapshot did not move with the counters
    assert (before + d).decode == c.snapshot().decode and (before + d).bytes_read == 150


def test_each_rate_is_defined_once_over_all_evaluations():
    s = Snapshot(prefill=PhaseTotals(hits=6, misses=2, in_flight=0, substitutions=0),
                 decode=PhaseTotals(hits=5, misses=2, in_flight=1, substitutions=2), prefetch_used=3, prefetch_wasted=1)
    r = s.report()
    assert r["expert_evaluations"] == 18 and r["expert_hits"] == 11 and r["expert_reads_in_flight"] == 1
    assert r["exact_hit_rate"] == 11 / 18 and r["substituted_rate"] == 2 / 18
    assert r["hit_or_substituted_rate"] == 13 / 18 and r["read_wait_rate"] == 5 / 18
    assert r["decode_exact_hit_rate"] == 5 / 10 and r["decode_read_wait_rate"] == 3 / 10
    assert r["prefill_exact_hit_rate"] == 6 / 8
    assert r["prefetch_precision"] == 3 / 4 and r["prefetch_recall"] == 3 / 5
    assert "expert_hit_rate" not in r and "decode_hit_rate" not in r  # the ambiguous names are gone
    assert {k for k in r if k.endswith("_rate")} <= RATE_KEYS
    assert Snapshot().report()["exact_hit_rate"] == 0.0  # nothing counted: 0, not a division error


def test_engine_stats_generation_stats_and_metrics_agree(tiny, one_thread):
    """engine.stats(), a Generation's stats and the counters' report give the same numbers for the same counts."""
    eng = moelite.load(tiny("qwen2_moe", **CFG), expert_budget="25%", substitution_alpha=0.0)
    eng.eos_ids = set()
    before = eng.counters()
    g = eng.generate([5, 9, 14, 20], max_tokens=8, temperature=0, substitution_alpha=0.5)
    delta = eng.counters() - before
    rep = delta.report()
    for key in ("expert_hits", "expert_misses", "expert_substitutions", "expert_bytes_read"):
        assert g.stats[key] == rep[key]
    s = eng.stats()
    n = s["expert_hits"] + s["expert_misses"] + s["expert_reads_in_flight"] + s["expert_substitutions"]
    assert n == s["expert_evaluations"] > 0 and s["exact_hit_rate"] == s["expert_hits"] / n
    assert s["decode_expert_hits"] + s["prefill_expert_hits"] == s["expert_hits"]
    # decode at batch 1: every step evaluates top-k experts in every MoE layer, counted exactly once
    d = delta.decode
    assert d.evaluations == 7 * eng.top_k * len(eng.layout.layers)


# ---- the bug: reads in flight counted as hits ------------------------------------------------------------------
class _LandsWhenWaitedOn(Future):
    """A read that has not landed until someone waits for it: a prefetch always still in flight when needed."""

    def __init__(self, read):
        super().__init__()
        self.read = read

    def result(self, timeout=None):
        if not self.done():
            self.set_result(self.read())
        return super().result(timeout)


def test_in_flight_prefetch_is_not_an_exact_hit(tiny, monkeypatch, one_thread):
    """Pins: an expert whose prefetch read has not landed when its layer needs it is a read in flight (waited on),
    not an exact hit. On commit 164b6cf such experts were counted as hits (166 counted, 162 resident)."""
    monkeypatch.setattr(Loader, "submit", lambda self, key, slot: _LandsWhenWaitedOn(
        lambda: timed_read(self.reader, key, slot)))
    eng = moelite.load(tiny("qwen2_moe", **CFG), expert_budget="50%", prefetch=True, io_threads=2)
    eng.eos_ids = set()
    m = eng.manager
    want = {"hits": 0, "in_flight": 0}

    def observe(layer, routing, phase):  # residency as the layer is about to run (no read lands before it waits)
        if phase == "decode":
            for e in set(routing.idx.reshape(-1).tolist()):
                want["hits"] += m.cache.resident((layer, e))
                want["in_flight"] += (layer, e) in m.inflight

    m.add_observer(observe)
    eng.generate([5, 9, 14, 20], max_tokens=12, temperature=0)
    s = eng.stats()
    assert s["prefetch_hits"] > 0 and want["in_flight"] > 0  # the case happened
    assert s["decode_expert_hits"] == want["hits"]
    assert s["decode_expert_reads_in_flight"] == want["in_flight"]


# ---- per-call state ----------------------------------------------------------------------------------------------
def test_request_state_is_restored_on_exit_and_on_error(tiny):
    eng = moelite.load(tiny("qwen2_moe", **CFG), expert_budget="25%", substitution_alpha=0.1)
    m = eng.manager
    own = m.call
    assert own.alpha == 0.1 and own.hook is not None and own.in_prefill is False

    def hook(ctx, layer, block, routing, alpha):
        return routing

    with pytest.raises(RuntimeError, match="boom"):
        with eng.request(alpha=0.5, hook=hook, in_prefill=True, alpha_scale={eng.layout.layers[0]: 0.0}):
            with m.request(alpha=0.25):  # nested: only alpha changes, the rest is the enclosing call's
                assert (m.call.alpha, m.call.hook, m.call.in_prefill) == (0.25, hook, True)
                assert dict(m.route_ctx.alpha_scale) == {eng.layout.layers[0]: 0.0}
            assert m.call.alpha == 0.5
            raise RuntimeError("boom")
    assert m.call == own and dict(m.route_ctx.alpha_scale) == {}
    with pytest.raises(ValueError, match="substitution_alpha"):
        with m.request(alpha=1.5):
            pass
    with pytest.raises(ValueError, match="hook: 3 is not callable"):
        with m.request(hook=3):
            pass
    assert m.call == own


def test_manager_options_are_frozen_and_validated():
    opts = ManagerOptions(alpha_scale={1: 0.5})
    with pytest.raises(dataclasses.FrozenInstanceError):
        opts.prefetch = True
    with pytest.raises(TypeError):
        opts.alpha_scale[1] = 2.0  # a read-only mapping
    with pytest.raises(ValueError, match="miss_policy: 'lazy' is not one of load, direct, hybrid"):
        ManagerOptions(miss_policy="lazy")
    with pytest.raises(ValueError, match="io_parallel: 0 must be an int >= 1"):
        ManagerOptions(io_parallel=0)


def test_routing_hook_gets_the_adapter_and_observers_get_the_phase(tiny, one_thread):
    """Typed hooks: a routing hook receives a RouteContext (the architecture adapter, residency); an observer
    receives "prefill" or "decode", and a one-token prompt's forward is prefill."""
    eng = moelite.load(tiny("qwen2_moe", **CFG), expert_budget="25%")
    eng.eos_ids = set()
    phases, seen = [], []

    def hook(ctx, layer, block, routing, alpha):
        seen.append((ctx.adapter is eng.adapter, ctx.resident((layer, int(routing.idx[0, 0]))) in (True, False)))
        return routing

    eng.manager.add_observer(lambda layer, routing, phase: phases.append(phase))
    with eng.request(hook=hook):
        eng.generate([5], max_tokens=3, temperature=0, substitution_alpha=0.3)
    n = len(eng.layout.layers)
    assert phases == ["prefill"] * n + ["decode"] * (2 * n)
    assert seen and all(a and b for a, b in seen) and len(seen) == 2 * n  # decode only (in_prefill off)
    assert eng.manager.call.hook is not hook


# ---- no private attribute used outside the module that defines it ----------------------------------------------
def _private_defined(tree: ast.AST) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.name.startswith("_"):
            names.add(node.name)
        elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and isinstance(node.ctx, ast.Store):
            names.add(node.attr)
        elif isinstance(node, ast.Name) and node.id.startswith("_") and isinstance(node.ctx, ast.Store):
            names.add(node.id)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name) and node.target.id.startswith("_"):
            names.add(node.target.id)
    return {n for n in names if not n.startswith("__")}


def private_uses_outside_their_module(root: Path = PACKAGE) -> list[str]:
    """`x._name` (x not self/cls) or `from moelite... import _name` where `_name` is defined in another moelite
    module and not in this one."""
    trees = {f: ast.parse(f.read_text(encoding="utf-8")) for f in sorted(root.rglob("*.py"))}
    defined = {f: _private_defined(t) for f, t in trees.items()}
    everywhere = set().union(*defined.values())
    bad = []
    for f, tree in trees.items():
        own = defined[f]
        for node in ast.walk(tree):
            if isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                    continue
                if node.attr in everywhere and node.attr not in own:
                    bad.append(f"{f.relative_to(root.parent)}:{node.lineno}: {ast.unparse(node)}")
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("moelite"):
                for alias in node.names:
                    if alias.name.startswith("_") and not alias.name.startswith("__"):
                        bad.append(f"{f.relative_to(root.parent)}:{node.lineno}: import {alias.name}")
    return bad


def test_no_private_attribute_used_outside_its_module():
    assert private_uses_outside_their_module() == []


def test_the_private_attribute_check_finds_a_violation(tmp_path):
    pkg = tmp_path / "moelite"
    pkg.mkdir()
    (pkg / "a.py").write_text("class A:\n    def _submit(self):\n        return 1\n")
    (pkg / "b.py").write_text("from moelite.a import A\n\ndef f(m: A):\n    return m._submit()\n")
    (pkg / "c.py").write_text("from moelite.a import _helper\n")
    assert private_uses_outside_their_module(pkg) == ["moelite/b.py:4: m._submit", "moelite/c.py:1: import _helper"]
