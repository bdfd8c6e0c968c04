"""`moelite predict train|profile`: fit and score eMoE expert predictors on traces; profile task sensitivity."""

from __future__ import annotations

import json
from pathlib import Path

from moelite.cli.flags import add_engine_flags, engine_config


def register_cli(sub) -> None:
    p = sub.add_parser("predict", help="eMoE expert predictors: fit/evaluate on traces, profile task sensitivity")
    ps = p.add_subparsers(dest="predict_cmd", required=True)
    t = ps.add_parser("train", help="fit every predictor on a trace, score on a held-out trace, save the tables")
    t.add_argument("--trace", required=True, help="training trace (.npz from `moelite trace`)")
    t.add_argument("--test-trace", default=None, help="held-out trace (default: the last 30%% of --trace)")
    t.add_argument("--cover", type=float, default=0.4, help="L for coverage@L as a fraction of the experts")
    t.add_argument("--out", default=None, help="write the per-task frequency table (JSON) here")
    t.add_argument("--seed", type=int, default=0)

    def run_train(args) -> int:
        from moelite.core.traces import Trace
        from moelite.emoe.classifier import TaskClassifier
        from moelite.emoe.predictors import TaskFrequency, compare_predictors, requests_from_trace, save_task_table
        from moelite.emoe.scoring import table

        tr = requests_from_trace(Trace.load(args.trace))
        if args.test_trace:
            te = requests_from_trace(Trace.load(args.test_trace))
        else:
            cut = int(len(tr) * 0.7)
            tr, te = tr[:cut], tr[cut:]
        if not tr or not te:
            raise ValueError("trace: need requests for both training and held-out scoring")
        meta = Trace.load(args.trace).meta
        if not 0 < args.cover <= 1:
            raise ValueError(f"cover: {args.cover!r} must be in (0, 1]")
        cover = max(1, round(args.cover * meta["num_experts"]))
        clf = TaskClassifier()
        res = compare_predictors(tr, te, int(meta["top_k"]), cover, clf, args.seed)
        print(table(res))
        if args.out:
            save_task_table(TaskFrequency().fit(tr), args.out)
            res["saved"] = args.out
        print(json.dumps(res))
        return 0

    t.set_defaults(func=run_train)

    register_profile_cli(ps)



def register_profile_cli(sub) -> None:
    """The `moelite predict profile` subcommand (registered by moelite.predictor)."""
    f = sub.add_parser("profile", help="per-task layer sensitivity to randomised routing (offline)")
    f.add_argument("--model", default=None, help="checkpoint folder (default: the demo model)")
    f.add_argument("--prompts-per-task", type=int, default=4)
    f.add_argument("--max-tokens", type=int, default=16)
    f.add_argument("--threshold", type=float, default=0.85)
    f.add_argument("--builtin", action="store_true", help="use the built-in prompts, not ../shared/data corpora")
    f.add_argument("--out", default=None, help="write the profile JSON here")
    add_engine_flags(f)
    f.set_defaults(func=lambda args: profile_cli(args, engine_config(args)))


def profile_cli(args, config) -> int:
    """`moelite predict profile`: the sensitivity profile of the built-in or corpus prompts, as JSON."""
    from moelite.emoe.classifier import TASKS
    from moelite.emoe.sensitivity import profile_sensitivity
    from moelite.engine import Engine
    from moelite.eval.corpus import corpus_prompts
    from moelite.eval.prompts import PROMPTS

    if args.prompts_per_task < 1:
        raise ValueError("prompts_per_task: must be >= 1")
    engine = Engine(args.model, config, progress=False)
    if args.builtin:
        by_task = {t: [p for d, p in PROMPTS if d == t][: args.prompts_per_task] for t in TASKS}
    else:
        by_task = {t: corpus_prompts(t, args.prompts_per_task, "test", seed=7) for t in TASKS}
    prof = profile_sensitivity(engine, by_task, args.max_tokens, args.threshold)
    if args.out:
        Path(args.out).write_text(json.dumps(prof, indent=1))
    print(json.dumps(prof))
    return 0
