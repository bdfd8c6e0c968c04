"""`moelite predict train|profile`: fit and score eMoE expert predictors on traces; profile task sensitivity.

Contract: `add_arguments(p)` declares the two subcommands; `run(args) -> int` dispatches to them:
  - `train`: fits every predictor (moelite.emoe.predictors) on a trace, scores it on a held-out trace (or the last
    30% of the requests), prints a table and one JSON line; `--out` also saves the per-task frequency table.
  - `profile`: the per-task layer sensitivity (moelite.emoe.sensitivity) of the built-in prompts (`--builtin`) or
    of the corpus prompts of the data folder (`--data-dir` / $MOELITE_DATA_DIR), as one JSON line (`--out`: a file).
Both check their flags before anything loads.
"""

from __future__ import annotations

import json
from pathlib import Path

from moelite.cli.flags import (HelpFormatter, add_data_dir_flag, add_engine_flags, add_model_flag, engine_config,
                               positive_int)
from moelite.emoe.classifier import TASKS
from moelite.eval.corpus import corpus_prompts, data_dir
from moelite.eval.prompts import PROMPTS

NAME = "predict"
HELP = "eMoE expert predictors: fit/evaluate on traces, profile task sensitivity"


def add_arguments(p) -> None:
    ps = p.add_subparsers(dest="predict_cmd", required=True, metavar="{train,profile}")
    t = ps.add_parser("train", help="fit every predictor on a trace, score on a held-out trace, save the tables",
                      formatter_class=HelpFormatter)
    t.add_argument("--trace", required=True, metavar="NPZ", help="training trace (.npz from `moelite trace`)")
    t.add_argument("--test-trace", default=None, metavar="NPZ",
                   help="held-out trace (default: the last 30%% of --trace's requests)")
    t.add_argument("--cover", type=float, default=0.4, help="L of coverage@L, as a fraction of the experts in (0, 1]")
    t.add_argument("--out", default=None, metavar="JSON",
                   help="write the per-task frequency table here (default: not written)")
    t.add_argument("--seed", type=int, default=0, help="seed of the predictors' random choices")
    t.set_defaults(predict_run=run_train)

    f = ps.add_parser("profile", help="per-task layer sensitivity to randomised routing (offline)",
                      formatter_class=HelpFormatter)
    add_model_flag(f)
    f.add_argument("--prompts-per-task", type=positive_int, default=4, help="prompts profiled per task")
    f.add_argument("--max-tokens", type=positive_int, default=16, help="tokens to generate per prompt")
    f.add_argument("--threshold", type=float, default=0.85,
                   help="similarity in (0, 1] at or above which a layer counts as insensitive")
    f.add_argument("--builtin", action="store_true", help="use the built-in prompts, not the data folder's corpora")
    add_data_dir_flag(f)
    f.add_argument("--out", default=None, metavar="JSON", help="write the profile JSON here (default: not written)")
    add_engine_flags(f)
    f.set_defaults(predict_run=run_profile)


def run(args) -> int:
    return args.predict_run(args)


def run_train(args) -> int:
    if not 0 < args.cover <= 1:
        raise ValueError(f"--cover: {args.cover!r} must be in (0, 1]")
    for name in ("trace", "test_trace"):
        path = getattr(args, name)
        if path is not None and not Path(path).is_file():
            raise ValueError(f"--{name.replace('_', '-')}: {path} does not exist")
    from moelite.core.traces import Trace
    from moelite.emoe.classifier import TaskClassifier
    from moelite.emoe.predictors import TaskFrequency, compare_predictors, requests_from_trace, save_task_table
    from moelite.emoe.scoring import table

    trace = Trace.load(args.trace)
    tr = requests_from_trace(trace)
    if args.test_trace:
        te = requests_from_trace(Trace.load(args.test_trace))
    else:
        cut = int(len(tr) * 0.7)
        tr, te = tr[:cut], tr[cut:]
    if not tr or not te:
        raise ValueError("--trace: need requests for both training and held-out scoring")
    cover = max(1, round(args.cover * trace.meta["num_experts"]))
    res = compare_predictors(tr, te, int(trace.meta["top_k"]), cover, TaskClassifier(), args.seed)
    print(table(res))
    if args.out:
        save_task_table(TaskFrequency().fit(tr), args.out)
        res["saved"] = args.out
    print(json.dumps(res))
    return 0


def run_profile(args) -> int:
    if not 0 < args.threshold <= 1:
        raise ValueError(f"--threshold: {args.threshold!r} must be in (0, 1]")
    config = engine_config(args)
    root = None if args.builtin else data_dir(args.data_dir)  # the corpora need the data folder: checked now
    from moelite.emoe.sensitivity import profile_sensitivity
    from moelite.engine import Engine

    if args.builtin:
        by_task = {t: [p for d, p in PROMPTS if d == t][: args.prompts_per_task] for t in TASKS}
    else:
        by_task = {t: corpus_prompts(t, args.prompts_per_task, "test", seed=7, root=root) for t in TASKS}
    engine = Engine(args.model, config, progress=True)
    prof = profile_sensitivity(engine, by_task, args.max_tokens, args.threshold)
    if args.out:
        Path(args.out).write_text(json.dumps(prof, indent=1))
    print(json.dumps(prof))
    return 0
