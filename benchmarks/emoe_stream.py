"""eMoE on moelite: predictor accuracy, task-aware preloading on a mixed-domain stream, memory/quality curve.

    nice -n 10 python benchmarks/emoe_stream.py [--model DIR] [--out benchmarks/results/emoe] [--parts ...]

Parts (each writes under --out; later parts reuse earlier outputs):
  traces      record routing traces of the "train" and held-out "test" prompt splits (../shared/data corpora of the
              three domains, interleaved in runs) with the exact model (100% budget: routing does not depend on it)
  predictors  fit eMoE-A / eMoE-L predictors on the train trace, score on the test trace (top-k accuracy,
              precision, recall, coverage@L, each beside a random expert set of the same size); task classifiers
  profile     per-task layer sensitivity to randomised routing (input side first)
  stream      a mixed-domain stream of held-out prompts at --budget: no prediction, prediction every prompt (eMoE-E),
              every --period prompts, task-aware (+ the lossy rerouting option); prefill/decode hit rates, TTFT
              (arrival -> first token, predictor and preload reads included), predictor cost, output identity
  curve       experts loaded 20..100% (predicted per task, misses rerouted to resident experts, eMoE's lossy mode)
              vs similarity of greedy continuations to the full model and perplexity on held-out text; PNG + table
The last line printed is one JSON object with the headline numbers.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import moelite  # noqa: E402
from moelite.eval.evaluate import decode_logprobs  # noqa: E402
from moelite.emoe.predictors import APredictor, GRUPredictor, PreviousPrompt, RecentMean, TaskFrequency, compare_predictors, requests_from_trace  # noqa: E402
from moelite.emoe.preloader import Preloader, make_resident  # noqa: E402
from moelite.emoe.scoring import table  # noqa: E402
from moelite.emoe.classifier import TASKS, TaskClassifier, accuracy  # noqa: E402
from moelite.eval.corpus import corpus_prompts, corpus_text, mixed_stream  # noqa: E402
from moelite.emoe.sensitivity import greedy, profile_sensitivity, reroute_to_resident, routing_override, similarity  # noqa: E402
from moelite.emoe.load_rule import plan_preload  # noqa: E402
from moelite.core.traces import Trace, record  # noqa: E402

PARTS = ("traces", "predictors", "profile", "stream", "curve")


def hardware() -> str:
    cpu = platform.machine()
    try:
        cpu = next(ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                   if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{os.cpu_count()}-core {cpu}, no GPU; torch threads 1"


def load(args, **kw):
    cfg = dict(expert_budget=args.budget, cache_scope=args.scope, num_threads=1, cache_policy=args.policy)
    cfg.update(kw)
    return moelite.load(args.model, **cfg)


def prompts(args, split: str, n: int, seed: int) -> dict[str, list[str]]:
    return {t: corpus_prompts(t, n, split, seed=seed, chars=args.prompt_chars) for t in TASKS}


# ---- parts ---------------------------------------------------------------------------------------------------------
def part_traces(args, out: Path) -> dict:
    eng = load(args, expert_budget="100%")
    res = {}
    for split, n, seed in (("train", args.train_per_task, 1), ("test", args.test_per_task, 2)):
        stream = mixed_stream(prompts(args, split, n, seed), n * len(TASKS), seed=seed)
        t0 = time.perf_counter()
        record(eng, stream, args.trace_tokens, out / f"trace_{split}.npz", seed=seed)
        res[split] = {"requests": len(stream), "seconds": time.perf_counter() - t0}
        print(f"# trace {split}: {len(stream)} requests in {res[split]['seconds']:.0f} s", flush=True)
    return res


def part_predictors(args, out: Path) -> dict:
    tr = Trace.load(out / "trace_train.npz")
    train, test = requests_from_trace(tr), requests_from_trace(Trace.load(out / "trace_test.npz"))
    k, n_exp = int(tr.meta["top_k"]), int(tr.meta["num_experts"])
    clf = TaskClassifier()
    res = compare_predictors(train, test, k, max(1, round(0.4 * n_exp)), clf, seed=0)
    labelled_test = [(r.task, r.prompt) for r in test]
    rules = accuracy(clf.classify, labelled_test)
    clf.fit([(r.task, r.prompt) for r in train])
    res["classifier"] = {"keyword_rules": rules, "learned_ngram_bayes": accuracy(clf.learned.classify, labelled_test),
                         "rules_then_learned": accuracy(clf.classify, labelled_test), "test_prompts": len(test)}
    md = (f"Predictors fitted on {len(train)} traced requests, scored on {len(test)} held-out requests "
          f"(top-k = {k}, L = {res['coverage_L']} of {n_exp} experts per layer; * = winner by top-k accuracy).\n\n"
          + table(res) + "\nTask classifier accuracy on the held-out prompts: " +
          ", ".join(f"{k_} {v:.1%}" for k_, v in res["classifier"].items() if k_ != "test_prompts") + "\n")
    (out / "predictors.md").write_text(md)
    print(md, flush=True)
    return res


def part_profile(args, out: Path) -> dict:
    eng = load(args, expert_budget="100%")
    by_task = prompts(args, "test", args.profile_prompts, seed=7)
    prof = profile_sensitivity(eng, by_task, args.profile_tokens, args.threshold)
    print("# sensitivity:", json.dumps({t: v["similarity_randomised_through_layer"] for t, v in prof["tasks"].items()}))
    return prof


def fitted(out: Path, name: str) -> APredictor:
    train = requests_from_trace(Trace.load(out / "trace_train.npz"))
    pred = {"task-frequency": TaskFrequency(), "recent-mean": RecentMean(), "gru": GRUPredictor(False),
            "gru+task": GRUPredictor(True), "previous-prompt": PreviousPrompt()}[name]
    return pred.fit(train)


def out_tokens(out: Path) -> dict:
    """Expected output tokens per task (W_o of the load rule): mean traced completion length."""
    reqs = requests_from_trace(Trace.load(out / "trace_train.npz"))
    return {t: float(np.mean([len(r.tokens[0]) - r.prompt_tokens for r in reqs if r.task == t])) for t in TASKS}


def summarise(eng, pl, rows: list[dict], pred, label: str) -> dict:
    s = pl.stats()
    ph, pm = sum(r["prefill_hits"] for r in rows), sum(r["prefill_misses"] for r in rows)  # engine counters
    pre = np.sum([r["routed"]["prefill"] for r in rows], axis=0)  # as routed, before any rerouting
    dec = np.sum([r["routed"]["decode"] for r in rows], axis=0)
    req_s = sum(r["request_s"] for r in rows)
    # exact-mode ceiling of the prefill hit rate: a layer's forward can hit at most `slots` of the d experts it needs
    need = np.concatenate([(r.prefill > 0).sum(1) for r in pl.history[-len(rows):]])
    n_l = len(eng.layout.layers)
    per = eng.pool.n_slots // n_l if s["scope"] == "layer" else eng.pool.n_slots / n_l
    return {
        "prefill_hit_rate_ceiling": float(np.minimum(per, need).sum() / need.sum()),
        "prefill_distinct_experts_per_layer": float(need.mean()),
        "mode": label, "predictor": getattr(pred, "name", None), "keep": pl.keep, "fill": pl.slots,
        "requests": len(rows), "prefill_hit_rate": pre[0] / max(pre[0] + pre[1], 1),
        "prefill_selection_hit_rate": pre[2] / max(pre[2] + pre[3], 1),
        "prefill_hit_rate_engine_counters": ph / (ph + pm) if ph + pm else 0.0,
        "decode_hit_rate": dec[0] / max(dec[0] + dec[1], 1), "decode_selection_hit_rate": dec[2] / max(dec[2] + dec[3], 1),
        "ttft_ms": 1000 * float(np.mean([r["ttft_total_s"] for r in rows])),
        "ttft_ms_median": 1000 * float(np.median([r["ttft_total_s"] for r in rows])),
        "prefill_only_ttft_ms": 1000 * float(np.mean([r["ttft_s"] for r in rows])),
        "request_ms": 1000 * req_s / len(rows), "preload_reads": sum(r["preloaded"] for r in rows),
        "expert_reads": eng.stats()["expert_bytes_read"] // eng.pool.layout.disk_bytes,
        "predictor_calls": s["predictor_calls"], "predict_s": s["predict_s"], "classify_s": s["classify_s"],
        "plan_s": s["plan_s"], "preload_s": s["preload_s"],
        "predictor_cost_share": s["predict_s"] / req_s if req_s else 0.0,
        "observe_s": s["observe_s"], "account_s_measurement_only": s["account_s"],
        "prediction_overhead_share": (s["predict_s"] + s["classify_s"] + s["plan_s"] + s["observe_s"]) / req_s
        if req_s else 0.0,
        "substitutions": eng.stats()["expert_substitutions"], "slots_per_plan": s["slots"], "scope": s["scope"],
    }


def run_arms(args, stream, arms: list[tuple], sens=None, wo=None) -> tuple[list[dict], dict]:
    """arms: (label, mode, predictor, Preloader overrides). All arms run in lockstep (request i on every arm, in a
    rotating order, before request i+1), so load from other processes on the shared machine hits every arm alike;
    each arm has its own engine and cache."""
    live = []
    for label, mode, pred, kw in arms:
        eng = load(args)
        opts = dict(period=args.period, sensitivity=sens, out_tokens=wo, keep=args.keep, fill=args.fill)
        opts.update(kw)
        live.append((label, eng, Preloader(eng, mode, pred, **opts), pred, [], []))
    for i, (task, prompt) in enumerate(stream):
        for j in range(len(live)):
            label, eng, pl, _, rows, outs = live[(i + j) % len(live)]
            g = pl.generate(prompt, max_tokens=args.max_tokens, temperature=0)
            rows.append(g.stats)
            outs.append(g.token_ids)
    res, outs = [], {}
    for label, eng, pl, pred, rows, o in live:
        pl.close()
        res.append(summarise(eng, pl, rows, pred, label))
        outs[label] = o
        eng.close()
        print(json.dumps(res[-1]), flush=True)
    return res, outs


def part_stream(args, out: Path, prof: dict | None, pred_res: dict | None) -> dict:
    by_task = prompts(args, "test", args.stream_per_task, seed=3)
    stream = mixed_stream(by_task, args.stream, run_len=(args.run_min, args.run_max), seed=args.stream_seed)
    acc = {n: m["topk_accuracy"] for n, m in (pred_res or {}).get("A", {}).items()}
    best = lambda names, dflt: max(names, key=lambda n: acc.get(n, -1)) if acc else dflt  # noqa: E731
    task_name = best(("task-frequency", "gru+task"), "task-frequency")  # held-out winners, task-aware or not
    plain_name = best(("previous-prompt", "recent-mean", "gru"), "recent-mean")
    plain, task_pred = fitted(out, plain_name), fitted(out, task_name)
    sens = {t: v["s"] for t, v in prof["tasks"].items()} if prof else None
    wo = out_tokens(out)
    arms, outs = run_arms(args, stream, [
        ("none", "none", None, {}), ("every", "every", plain, {}), ("periodic", "periodic", plain, {}),
        ("task", "task", task_pred, {}), ("task/shield-only", "task", task_pred, dict(keep=False, fill=1.0)),
        ("task+reroute", "task", task_pred, dict(reroute=True))], sens, wo)
    ref = outs["none"]
    for a in arms:
        sims = [similarity(r, g) for r, g in zip(ref, outs[a["mode"]])]
        a["identical_outputs"] = sum(r == g for r, g in zip(ref, outs[a["mode"]])) / len(ref)
        a["token_agreement"] = float(np.mean([s["token_agreement"] for s in sims]))
        a["ngram_f1"] = float(np.mean([s["ngram_f1"] for s in sims]))
    base = arms[0]
    for a in arms:
        a["prefill_hit_rate_vs_none"] = a["prefill_hit_rate"] / base["prefill_hit_rate"] if base["prefill_hit_rate"] else 0.0
        a["prefill_selection_hit_rate_vs_none"] = (a["prefill_selection_hit_rate"] / base["prefill_selection_hit_rate"]
                                                   if base["prefill_selection_hit_rate"] else 0.0)
        a["ttft_vs_none"] = a["ttft_ms"] / base["ttft_ms"] if base["ttft_ms"] else 0.0
    # every predictor's measured call cost (predictors part) as a share of the mean request time, at p and p = 1
    req_ms = base["request_ms"]
    cost = {f"eMoE-{v}/{n}": {"call_ms": m["call_ms"], "share_at_p": m["call_ms"] / (args.period * req_ms),
                              "share_every_prompt": m["call_ms"] / req_ms}
            for v in ("A", "L") for n, m in (pred_res or {}).get(v, {}).items()}
    head = ("| arm | predictor | prefill hit | ceiling | x none | prefill hit by selections | x none | decode hit | TTFT ms (mean / median) | prefill-only TTFT ms | "
            "request ms | preload reads | all reads | predictor calls | predictor cost | all prediction overhead "
            "| identical outputs | n-gram F1 |")  # overhead: classifier + predictor + planning + routing observer
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for a in arms:
        lines.append(f"| {a['mode']} | {a['predictor'] or '-'} | {a['prefill_hit_rate']:.1%} | "
                     f"{a['prefill_hit_rate_ceiling']:.1%} | "
                     f"{a['prefill_hit_rate_vs_none']:.2f} | {a['prefill_selection_hit_rate']:.1%} | "
                     f"{a['prefill_selection_hit_rate_vs_none']:.2f} | {a['decode_hit_rate']:.1%} | {a['ttft_ms']:.1f} / "
                     f"{a['ttft_ms_median']:.1f} | {a['prefill_only_ttft_ms']:.1f} | {a['request_ms']:.1f} | "
                     f"{a['preload_reads']} | {a['expert_reads']} | {a['predictor_calls']} | "
                     f"{a['predictor_cost_share']:.3%} | {a['prediction_overhead_share']:.3%} | "
                     f"{a['identical_outputs']:.0%} | {a['ngram_f1']:.3f} |")
    runs = "".join(t[0][0] for t in stream)
    md = (f"Mixed-domain stream: {len(stream)} held-out prompts in runs of {args.run_min}-{args.run_max} "
          f"(s=shakespeare, p=python, w=wiki: `{runs}`), budget {args.budget}, cache_scope {args.scope}, "
          f"{args.policy}, {args.max_tokens} greedy tokens, period p = {args.period}, predicted set "
          f"{'kept pinned' if args.keep else 'shielded until used'} in {args.fill:.0%} of the slots; arms run in "
          "lockstep (each request on every arm, rotating order); TTFT = arrival to first token (classifier, "
          "predictor, planning and expert reads included).\n\n" + "\n".join(lines) + "\n")
    if cost:
        md += (f"\nPredictor cost per invocation (measured in the predictors part) as a share of the mean request time "
               f"({req_ms:.1f} ms, no-prediction arm):\n\n| predictor | ms per call | share at p = {args.period} | "
               "share every prompt |\n|---|---|---|---|\n" +
               "".join(f"| {n} | {c['call_ms']:.3f} | {c['share_at_p']:.4%} | {c['share_every_prompt']:.3%} |\n"
                       for n, c in cost.items()))
    (out / "stream.md").write_text(md)
    print(md, flush=True)
    return {"arms": arms, "stream_tasks": runs, "predictor_cost": cost}


def part_curve(args, out: Path) -> dict:
    fractions = [float(f) for f in args.curve.split(",")]
    exact = load(args, expert_budget="100%")
    pred = fitted(out, "task-frequency")
    by_task = prompts(args, "test", args.curve_prompts, seed=5)
    texts = {t: exact.encode(corpus_text(t, 6000))[: args.ppl_tokens + 1] for t in TASKS}
    refs = {t: [greedy(exact, p, args.curve_tokens) for p in ps] for t, ps in by_task.items()}
    ref_lp = {t: decode_logprobs(exact, ids, 1) for t, ids in texts.items()}  # [T, V] exact decode path
    exact.close()
    rows = []
    for frac in fractions:
        for kind in ("predicted", "random"):
            if frac >= 100 and kind == "random":
                continue
            eng = load(args, expert_budget=f"{frac:g}%", cache_scope="layer")
            layers = eng.layout.layers
            per = eng.pool.n_slots // len(layers)
            rng = np.random.default_rng(0)
            agg = {"token_agreement": [], "ngram_f1": [], "nll": 0.0, "nll_exact": 0.0, "n": 0, "top1": 0}
            for t in TASKS:
                f = pred.predict([], t) if kind == "predicted" else rng.random((len(layers), eng.num_experts))
                keys = [(layers[p], e) for p, e in plan_preload(f, per, "layer")]
                make_resident(eng, keys)
                with routing_override(eng, reroute_to_resident):
                    for ref, p in zip(refs[t], by_task[t]):
                        s = similarity(ref, greedy(eng, p, args.curve_tokens, alpha=routing_override.ON))
                        agg["token_agreement"].append(s["token_agreement"])
                        agg["ngram_f1"].append(s["ngram_f1"])
                    lp = decode_logprobs(eng, texts[t], 1, alpha=routing_override.ON)  # [T, V]
                tgt = torch.tensor(texts[t][1:])[:, None]
                agg["nll"] -= float(lp.gather(1, tgt).sum())
                agg["nll_exact"] -= float(ref_lp[t].gather(1, tgt).sum())
                agg["top1"] += int((lp.argmax(-1) == ref_lp[t].argmax(-1)).sum())
                agg["n"] += len(tgt)
            row = {"experts_loaded_pct": frac, "resident_set": kind, "per_layer": per,
                   "token_agreement": float(np.mean(agg["token_agreement"])), "ngram_f1": float(np.mean(agg["ngram_f1"])),
                   "perplexity": math.exp(agg["nll"] / agg["n"]), "perplexity_exact": math.exp(agg["nll_exact"] / agg["n"]),
                   "teacher_forced_top1_agreement": agg["top1"] / agg["n"], "substitutions": eng.stats()["expert_substitutions"]}
            eng.close()
            rows.append(row)
            print(json.dumps(row), flush=True)
    head = "| experts loaded | resident set | per layer | n-gram F1 | token agreement | top-1 agreement (teacher-forced) | perplexity | exact ppl |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        lines.append(f"| {r['experts_loaded_pct']:g}% | {r['resident_set']} | {r['per_layer']} | {r['ngram_f1']:.3f} | "
                     f"{r['token_agreement']:.3f} | {r['teacher_forced_top1_agreement']:.3f} | {r['perplexity']:.2f} | "
                     f"{r['perplexity_exact']:.2f} |")
    cmd = "nice -n 10 python benchmarks/emoe_stream.py " + " ".join(sys.argv[1:])
    md = (f"Memory/quality trade-off (lossy mode: the top experts per layer predicted for the prompt's task are "
          f"resident, every other selection is rerouted to the next-ranked resident expert; prefill and decode). "
          f"{args.curve_prompts} held-out prompts per task x {args.curve_tokens} greedy tokens vs the full model; "
          f"perplexity over {args.ppl_tokens} held-out tokens per task through the decode path.\n\n"
          f"Command: `{cmd.strip()}`\n\n" + "\n".join(lines) + "\n")
    (out / "tradeoff.md").write_text(md)
    plot_curve(rows, out / "tradeoff.png")
    print(md, flush=True)
    return {"rows": rows}


def plot_curve(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.6, 4.2))
    for kind, style in (("predicted", "-"), ("random", ":")):
        rs = [r for r in rows if r["resident_set"] == kind or (kind == "random" and r["experts_loaded_pct"] >= 100)]
        if not rs:
            continue
        x = [r["experts_loaded_pct"] for r in rs]
        ax.plot(x, [r["ngram_f1"] for r in rs], "o" + style, color="tab:blue", label=f"n-gram F1 ({kind} set)")
        ax.plot(x, [r["teacher_forced_top1_agreement"] for r in rs], "s" + style, color="tab:green",
                label=f"top-1 agreement ({kind} set)")
    ax.set_xlabel("experts loaded (% per layer), misses rerouted to resident experts")
    ax.set_ylabel("similarity to the full model")
    ax.set_ylim(0, 1.05)
    ax2 = ax.twinx()
    for kind, style in (("predicted", "-"), ("random", ":")):
        rs = [r for r in rows if r["resident_set"] == kind or (kind == "random" and r["experts_loaded_pct"] >= 100)]
        if rs:
            ax2.plot([r["experts_loaded_pct"] for r in rs], [r["perplexity"] for r in rs], "^" + style,
                     color="tab:red", label=f"perplexity ({kind} set)")
    ax2.set_ylabel("perplexity (held-out text)", color="tab:red")
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower right")
    ax.set_title("moelite eMoE lossy mode: memory vs quality (demo model)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="checkpoint folder (default: the demo model)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "emoe"))
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {', '.join(PARTS)}")
    p.add_argument("--budget", default="40%")
    p.add_argument("--scope", default="global", choices=("layer", "global"), help="cache_scope of every engine")
    p.add_argument("--keep", action=argparse.BooleanOptionalAction, default=True,
                   help="predicted set stays pinned across requests (else shielded only until its layer's prefill)")
    p.add_argument("--fill", type=float, default=0.6, help="share of the slots the predicted set may take")
    p.add_argument("--policy", default="lru")
    p.add_argument("--period", type=int, default=40)
    p.add_argument("--prompt-chars", type=int, default=200)
    p.add_argument("--train-per-task", type=int, default=60)
    p.add_argument("--test-per-task", type=int, default=20)
    p.add_argument("--trace-tokens", type=int, default=16)
    p.add_argument("--stream", type=int, default=120)
    p.add_argument("--stream-per-task", type=int, default=40)
    p.add_argument("--stream-seed", type=int, default=4, help="seed of the stream's task runs")
    p.add_argument("--run-min", type=int, default=3)
    p.add_argument("--run-max", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--profile-prompts", type=int, default=4)
    p.add_argument("--profile-tokens", type=int, default=16)
    p.add_argument("--threshold", type=float, default=0.85)
    p.add_argument("--curve", default="20,40,60,80,100")
    p.add_argument("--curve-prompts", type=int, default=6)
    p.add_argument("--curve-tokens", type=int, default=24)
    p.add_argument("--ppl-tokens", type=int, default=256)
    args = p.parse_args(argv)
    parts = [x.strip() for x in args.parts.split(",") if x.strip()]
    bad = [x for x in parts if x not in PARTS]
    if bad:
        raise SystemExit(f"--parts: {bad} not among {', '.join(PARTS)}")
    torch.set_num_threads(1)  # 2 shared cores: more threads only spin (measured 30x slower with 2 under load)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    results = json.loads(path.read_text()) if path.is_file() else {}
    results.update(hardware=hardware(), model=str(args.model or "demo model"), argv=sys.argv[1:])
    t0 = time.perf_counter()
    if "traces" in parts:
        results["traces"] = part_traces(args, out)
    if "predictors" in parts:
        results["predictors"] = part_predictors(args, out)
    if "profile" in parts:
        results["profile"] = part_profile(args, out)
    if "stream" in parts:
        results["stream"] = part_stream(args, out, results.get("profile"), results.get("predictors"))
    if "curve" in parts:
        results["curve"] = part_curve(args, out)
    results["seconds"] = time.perf_counter() - t0
    path.write_text(json.dumps(results, indent=1))
    print(json.dumps(headline(results)))
    return 0


def headline(r: dict) -> dict:
    h: dict = {"hardware": r.get("hardware"), "results": "results.json"}
    if "predictors" in r:
        pr = r["predictors"]
        for v in ("A", "L"):
            w = pr[f"winner_{v}"]
            h[f"emoe_{v}_winner"] = w
            h[f"emoe_{v}_topk_accuracy"] = round(pr[v][w]["topk_accuracy"], 4)
            h[f"emoe_{v}_vs_random"] = round(pr[v][w]["topk_accuracy_vs_random"], 2)
    if "stream" in r:
        arms = {a["mode"]: a for a in r["stream"]["arms"]}
        for m, a in arms.items():
            h[f"{m}_prefill_hit_rate"] = round(a["prefill_hit_rate"], 4)
            h[f"{m}_ttft_ms"] = round(a["ttft_ms"], 2)
        if "task" in arms:
            h["task_vs_none_prefill_hit"] = round(arms["task"]["prefill_hit_rate_vs_none"], 2)
        if "task" in arms:
            h["ttft_task_vs_none"] = round(arms["task"]["ttft_vs_none"], 3)
        for m in ("every", "periodic", "task"):
            if m in arms:
                h[f"{m}_predictor_cost_share"] = round(arms[m]["predictor_cost_share"], 6)
    if "curve" in r:
        h["curve"] = {f"{x['experts_loaded_pct']:g}%": round(x["ngram_f1"], 3) for x in r["curve"]["rows"]
                      if x["resident_set"] == "predicted"}
    return h


if __name__ == "__main__":
    sys.exit(main())
