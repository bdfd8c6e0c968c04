"""Quality and speed evaluation of an offloaded engine against the exact model (`moelite eval`).

Contract:
  - `decode_logprobs(engine, ids, start, alpha)` -> float32 log-probabilities [len(ids) - start, V] of ids[start:],
    teacher-forced through the decode path (`engine.model` with a DynamicCache, one token per step, as generation
    does), so substitution applies exactly as in `generate`: ids[:start-1] are prefilled (exact unless
    `substitute_in_prefill`), then ids[start-1:-1] are fed one at a time.
  - `compare_text(engine, ids, alpha, reference=...)` -> perplexity over sliding windows (`window` tokens, advancing
    by `stride`, each token scored once with up to window - stride tokens of context), and, against a `Reference` (an
    exact engine: 100% budget, alpha 0, the same decode path), top-1 agreement and mean KL(exact || engine) per
    scored token; plus the expert accounting of the pass: exact hit rate and substituted rate apart.
  - `hellaswag(engine, path, limit, alpha)` -> multiple-choice accuracy by log-likelihood (sum and per-character
    normalised) on the 6-lines-per-item file (context, gold 0-3, 4 endings).
  - `measure_decode(engine, prompts, max_tokens, alpha)` -> decode speed (time per output token, tok/s) and hit
    rates of greedy generation of `max_tokens` tokens per prompt (eos ignored; the first prompt warms the cache).
  - `measure_interleaved({label: (engine, alpha)}, prompts, ...)`: the same, for engines alive together and run
    prompt by prompt in turn, so that on a shared machine every configuration sees the same background load.
  - `moelite eval`: a JSON line last; `--alpha-sweep 0,0.1,...` measures the speed of all alphas interleaved, then
    quality alpha by alpha, and writes a markdown table, a JSON file and a PNG (decode tok/s, hit rates and
    perplexity vs alpha at the given budget) under `--out`.
Data: `--data-dir` defaults to ../shared/data next to the repository when it exists; nothing is copied.
"""

from __future__ import annotations

import bz2
import gc
import json
import math
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from transformers import DynamicCache

from moelite.config import alpha_positive

REPO = Path(__file__).resolve().parents[2]


def default_data_dir() -> Path | None:
    for p in (REPO.parent / "shared" / "data",):
        if p.is_dir():
            return p
    return None


def parse_alphas(text: str) -> list[float]:
    from moelite.config import check_alpha

    try:
        vals = [float(t) for t in text.split(",") if t.strip()]
    except ValueError:
        raise ValueError(f"alpha_sweep: {text!r} is not a comma-separated list of numbers such as 0,0.1,0.25") from None
    if not vals:
        raise ValueError("alpha_sweep: empty list")
    for v in vals:
        try:
            check_alpha(v)
        except ValueError as exc:
            raise ValueError(f"alpha_sweep: {exc}") from None
    return vals


# ---- the decode path, teacher-forced ---------------------------------------------------------------------------
@torch.inference_mode()
def decode_logprobs(engine, ids: list[int], start: int, alpha=0.0) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) rows for t in [start, len(ids)) -> [len(ids)-start, V] float32 (see the contract)."""
    if not 1 <= start < len(ids):
        raise ValueError(f"start: {start} must be in [1, {len(ids)})")
    m = engine.manager
    old = m.alpha
    m.alpha = alpha
    try:
        cache = DynamicCache(config=engine.hf_config)
        dev = engine.device
        if start > 1:
            with m.prefilling():
                engine.model(input_ids=torch.tensor([ids[: start - 1]], device=dev), past_key_values=cache,
                             use_cache=True, logits_to_keep=1)
        rows = []
        for t in range(start - 1, len(ids) - 1):
            out = engine.model(input_ids=torch.tensor([[ids[t]]], device=dev), past_key_values=cache, use_cache=True)
            rows.append(out.logits[0, -1].float().cpu())
    finally:
        m.alpha = old
    return torch.log_softmax(torch.stack(rows), dim=-1)  # [T, V]


def windows(n: int, window: int, stride: int) -> list[tuple[int, int, int]]:
    """Sliding windows over n tokens: (begin, end, first scored position inside the window); each token scored once."""
    if window < 2 or not 1 <= stride <= window:
        raise ValueError(f"window/stride: need window >= 2 and 1 <= stride <= window (got {window}, {stride})")
    out, prev_end, begin = [], 0, 0
    while prev_end < n:
        end = min(begin + window, n)
        first = max(1, prev_end - begin)
        if first < end - begin:
            out.append((begin, end, first))
        prev_end = end
        begin += stride
    return out


def _counters(engine) -> tuple[int, ...]:
    c, m = engine.manager.cache, engine.manager
    return c.hits, c.misses, m.substitutions, getattr(m, "decode_hits", 0), getattr(m, "decode_misses", 0)


def accounting(before, after) -> dict:
    """Exact hits and substitutions reported apart, over all passes and over decode steps only (substitution runs in
    decode unless substitute_in_prefill); rates are of the expert evaluations the exact model asked for (batch 1)."""
    hits, misses, subs, d_hits, d_misses = (a - b for a, b in zip(after, before))
    n, d = hits + misses + subs, d_hits + d_misses + subs
    return {"expert_hits": hits, "expert_misses": misses, "expert_substitutions": subs,
            "decode_expert_hits": d_hits, "decode_expert_misses": d_misses,
            "exact_hit_rate": hits / n if n else 0.0, "substituted_rate": subs / n if n else 0.0,
            "hit_or_substituted_rate": (hits + subs) / n if n else 0.0,
            "decode_exact_hit_rate": d_hits / d if d else 0.0, "decode_substituted_rate": subs / d if d else 0.0,
            "decode_hit_or_substituted_rate": (d_hits + subs) / d if d else 0.0}


class Reference:
    """The exact model's decode-path log-probs, computed once per (text, window) and reused across alphas."""

    def __init__(self, engine):
        self.engine = engine
        self._memo: dict[tuple, torch.Tensor] = {}

    def remember(self, ids: list[int], start: int, logprobs: torch.Tensor) -> None:
        """Take `logprobs` (an exact decode pass of this reference's own engine) as the reference for (ids, start)."""
        self._memo.setdefault((tuple(ids), start), logprobs)

    def logprobs(self, ids: list[int], start: int) -> torch.Tensor:
        key = (tuple(ids), start)
        if key not in self._memo:
            self._memo[key] = decode_logprobs(self.engine, ids, start, 0.0)
        return self._memo[key]

    def loglik(self, ids: list[int], start: int) -> float:
        """Summed log-likelihood of ids[start:] (memoised as a number: multiple-choice items are many)."""
        key = ("ll", tuple(ids), start)
        if key not in self._memo:
            lp = decode_logprobs(self.engine, ids, start, 0.0)
            self._memo[key] = float(lp.gather(1, torch.tensor(ids[start:])[:, None]).sum())
        return self._memo[key]


@dataclass
class TextResult:
    tokens: int = 0
    nll: float = 0.0
    nll_exact: float = 0.0
    agree: int = 0
    kl: float = 0.0
    seconds: float = 0.0
    counts: dict = field(default_factory=dict)

    def summary(self) -> dict:
        n = max(self.tokens, 1)
        out = {"tokens": self.tokens, "perplexity": math.exp(self.nll / n),
               "decode_tok_s_teacher_forced": self.tokens / self.seconds if self.seconds else 0.0}
        if self.nll_exact:
            ppl_x = math.exp(self.nll_exact / n)
            out.update({"perplexity_exact": ppl_x, "perplexity_ratio": out["perplexity"] / ppl_x,
                        "top1_agreement": self.agree / n, "mean_kl": self.kl / n})
        out.update(self.counts)
        return out


def compare_text(engine, ids: list[int], alpha=0.0, reference: Reference | None = None, window: int = 256,
                 stride: int = 128, max_tokens: int | None = None) -> dict:
    """Perplexity of `engine` at `alpha` on `ids` and, with a reference, agreement/KL vs the exact model."""
    res = TextResult()
    before = _counters(engine)
    for begin, end, first in windows(len(ids), window, stride):
        if max_tokens is not None and res.tokens >= max_tokens:
            break
        if max_tokens is not None:
            end = min(end, begin + first + max_tokens - res.tokens)
        chunk = ids[begin:end]
        target = torch.tensor(chunk[first:])  # [T]
        t0 = time.perf_counter()
        lp = decode_logprobs(engine, chunk, first, alpha)  # [T, V]
        res.seconds += time.perf_counter() - t0
        res.nll -= float(lp.gather(1, target[:, None]).sum())
        res.tokens += len(target)
        if reference is not None:
            if reference.engine is engine and not alpha_positive(alpha):
                reference.remember(chunk, first, lp)  # this pass is the exact one: no second pass for the reference
            ref = reference.logprobs(chunk, first)  # [T, V]
            res.nll_exact -= float(ref.gather(1, target[:, None]).sum())
            res.agree += int((ref.argmax(-1) == lp.argmax(-1)).sum())
            # KL(exact || engine), summed over scored tokens; exactly 0 when the two paths agree bit for bit
            res.kl += float((ref.exp() * (ref - lp)).sum(-1).clamp_min(0).sum())
    res.counts = accounting(before, _counters(engine))
    return res.summary()


# ---- HellaSwag -------------------------------------------------------------------------------------------------
def read_hellaswag(path: str | Path, limit: int | None = None) -> list[tuple[str, int, list[str]]]:
    opener = bz2.open if str(path).endswith(".bz2") else open
    with opener(path, "rt", encoding="utf-8") as f:
        lines = f.read().split("\n")
    items = []
    for i in range(0, len(lines) - 5, 6):
        ctx, gold, endings = lines[i], lines[i + 1].strip(), lines[i + 2: i + 6]
        if not gold.isdigit() or not 0 <= int(gold) <= 3:
            raise ValueError(f"{path}: line {i + 2}: expected a gold label 0-3, got {gold!r}")
        items.append((ctx, int(gold), endings))
        if limit is not None and len(items) >= limit:
            break
    return items


def hellaswag(engine, path, limit: int | None = 200, alpha=0.0, reference=None) -> dict:
    """Accuracy by summed log-likelihood of each ending given the context (and per-character normalised)."""
    tok = engine.tokenizer
    if tok is None:
        raise ValueError("hellaswag: the model has no tokenizer")
    items = read_hellaswag(path, limit)
    before = _counters(engine)
    correct = correct_norm = agree = 0
    for ctx, gold, endings in items:
        ctx_ids = engine.encode(ctx)
        scores, norm, ref_scores = [], [], []
        for ending in endings:
            cont = tok.encode(" " + ending.strip(), add_special_tokens=False)
            ids = (ctx_ids + cont)[-engine.max_context:]
            start = len(ids) - len(cont)
            target = torch.tensor(cont)[:, None]
            ll = float(decode_logprobs(engine, ids, start, alpha).gather(1, target).sum())
            scores.append(ll)
            norm.append(ll / max(1, len(ending.strip())))
            if reference is not None:
                ref_scores.append(reference.loglik(ids, start))
        pick = max(range(4), key=scores.__getitem__)
        correct += pick == gold
        correct_norm += max(range(4), key=norm.__getitem__) == gold
        if ref_scores:
            agree += pick == max(range(4), key=ref_scores.__getitem__)
    n = len(items)
    out = {"items": n, "accuracy": correct / n if n else 0.0, "accuracy_norm": correct_norm / n if n else 0.0}
    if reference is not None:
        out["choice_agreement_with_exact"] = agree / n if n else 0.0
    out.update(accounting(before, _counters(engine)))
    return out


# ---- decode speed ----------------------------------------------------------------------------------------------
def prompts_from_ids(ids: list[int], n: int = 4, length: int = 48) -> list[list[int]]:
    """n prompts of `length` tokens taken at evenly spaced places of a token sequence."""
    if len(ids) < length + 1:
        raise ValueError(f"calibration text: {len(ids)} tokens, need at least {length + 1}")
    step = max(1, (len(ids) - length) // n)
    return [ids[i * step: i * step + length] for i in range(n)]


def measure_decode(engine, prompts: list[list[int]], max_tokens: int = 32, alpha=0.0, warmup: bool = True) -> dict:
    """Greedy decode of `max_tokens` per prompt; time per output token over all prompts but the warm-up one."""
    eos, engine.eos_ids = engine.eos_ids, set()
    try:
        if warmup and len(prompts) > 1:
            engine.generate(prompts[0], max_tokens=max_tokens, temperature=0, substitution_alpha=alpha)
            prompts = prompts[1:]
        before = _counters(engine)
        toks, secs, per, gen_toks = 0, 0.0, [], 0
        cpu0 = time.process_time()
        for p in prompts:
            s = engine.generate(p, max_tokens=max_tokens, temperature=0, substitution_alpha=alpha).stats
            toks += s["completion_tokens"] - 1  # decode steps after the first token
            gen_toks += s["completion_tokens"]
            secs += s["decode_s"]
            per.append(s["expert_substitutions"])
        cpu = time.process_time() - cpu0
    finally:
        engine.eos_ids = eos
    # CPU time (all threads, prefill included) per generated token: less sensitive than wall time to other
    # processes competing for the cores; it still counts the work every miss costs (reads, conversion, hand-offs)
    out = {"alpha": alpha, "decode_tokens": toks, "decode_seconds": secs,
           "tpot_ms": 1000 * secs / toks if toks else 0.0,
           "decode_tok_s": toks / secs if secs else 0.0, "cpu_ms_per_token": 1000 * cpu / gen_toks if gen_toks else 0.0,
           "cpu_seconds": cpu, "generated_tokens": gen_toks, "substitutions_per_request": per}
    out.update(accounting(before, _counters(engine)))
    return out


def measure_interleaved(engines: dict, prompts: list[list[int]], max_tokens: int = 32, rounds: int = 12,
                        log=None) -> dict[str, dict]:
    """Fair speed comparison on a busy machine. `engines` maps label -> (engine, alpha), all alive. Each engine is
    warmed with prompts[0]; then each round runs one prompt (rotating over prompts[1:]) on every engine, in an order
    rotated per round, so all see the same background load. Per label: median per-prompt TPOT, pooled CPU ms per
    token, decode hit rates over all measured steps."""
    labels = list(engines)
    for label in labels:
        eng, a = engines[label]
        measure_decode(eng, prompts[:1], max_tokens, a, warmup=False)
    per: dict[str, list[dict]] = {label: [] for label in labels}
    rest = prompts[1:] or prompts
    for rnd in range(rounds):
        shift = rnd % len(labels)
        for label in labels[shift:] + labels[:shift]:
            eng, a = engines[label]
            per[label].append(measure_decode(eng, [rest[rnd % len(rest)]], max_tokens, a, warmup=False))
        if log and (rnd + 1) % max(1, rounds // 4) == 0:
            log(f"round {rnd + 1}/{rounds}")
    out = {}
    for label, rs in per.items():
        tot = {k: sum(r[k] for r in rs) for k in ("decode_expert_hits", "decode_expert_misses", "expert_substitutions",
                                                  "decode_tokens", "decode_seconds", "cpu_seconds", "generated_tokens")}
        d = tot["decode_expert_hits"] + tot["decode_expert_misses"] + tot["expert_substitutions"]
        tp = statistics.median(r["tpot_ms"] for r in rs)
        out[label] = {"alpha": engines[label][1], "tpot_ms": tp, "decode_tok_s": 1000 / tp if tp else 0.0,
                      "tpot_ms_pooled": 1000 * tot["decode_seconds"] / max(1, tot["decode_tokens"]),
                      "cpu_ms_per_token": 1000 * tot["cpu_seconds"] / max(1, tot["generated_tokens"]),
                      "decode_exact_hit_rate": tot["decode_expert_hits"] / d if d else 0.0,
                      "decode_substituted_rate": tot["expert_substitutions"] / d if d else 0.0,
                      "decode_hit_or_substituted_rate": (tot["decode_expert_hits"] + tot["expert_substitutions"]) / d
                      if d else 0.0, "substitutions_per_request": [r["expert_substitutions"] for r in rs],
                      "prompts_measured": len(rs)}
    return out


# ---- CLI -------------------------------------------------------------------------------------------------------
def _load(args, **overrides):
    from moelite.cli import engine_config
    from moelite.engine import Engine

    return Engine(args.model, engine_config(args).replace(**overrides), progress=False)


def _texts(args) -> list[Path]:
    if args.text:
        return [Path(t) for t in args.text]
    data = Path(args.data_dir) if args.data_dir else None
    if args.hellaswag:
        return []
    if data is None or not (data / "wikitext-2" / "test.txt").is_file():
        raise ValueError("text: give --text FILE (no --data-dir with wikitext-2/test.txt was found)")
    return [data / "wikitext-2" / "test.txt"]


def text_name(path: Path) -> str:
    """A short label: the folder for generic file names (wikitext-2/test.txt -> wikitext-2), else the stem."""
    return path.parent.name if path.stem in ("test", "valid", "input", "train") and path.parent.name else path.stem


def _read_ids(engine, path: Path, max_tokens: int, window: int) -> list[int]:
    if not path.is_file():
        raise ValueError(f"text: {path} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    budget_chars = max(20_000, (max_tokens + window) * 12)  # tokenise only what can be scored
    if engine.tokenizer is None:
        raise ValueError("text: the model has no tokenizer")
    # one long sequence on purpose (scored in windows): silence the longer-than-the-context warning
    return engine.tokenizer.encode(text[:budget_chars], add_special_tokens=False, verbose=False)


def evaluate_at(args, alpha: float, reference: Reference | None, ids_by_file: dict, engine=None,
                speed: dict | None = None) -> dict:
    engine = engine or _load(args, substitution_alpha=alpha)
    row: dict = {"alpha": alpha, "expert_budget": args.expert_budget, "cache_policy": args.cache_policy}
    if speed is not None:
        row["speed"] = speed
    elif args.speed_prompts > 0 and ids_by_file:
        prompts = prompts_from_ids(next(iter(ids_by_file.values())), args.speed_prompts + 1)  # +1: warm-up
        row["speed"] = measure_decode(engine, prompts, args.speed_tokens, alpha)
    row["texts"] = {name: compare_text(engine, ids, alpha, reference, args.window, args.stride, args.max_tokens)
                    for name, ids in ids_by_file.items()}
    if args.hellaswag:
        row["hellaswag"] = hellaswag(engine, args.hellaswag_path, args.limit, alpha, reference)
    return row


def sweep_table(rows: list[dict]) -> str:
    names = list(rows[0]["texts"])
    head = ["alpha", "decode tok/s", "TPOT ms", "CPU ms/token", "exact hit (decode)", "substituted", "hit+sub"]
    for nm in names:
        head += [f"ppl {nm}", f"ppl/exact {nm}", f"top-1 {nm}", f"KL {nm}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        s = r.get("speed", {})
        cells = [f"{r['alpha']:g}", f"{s.get('decode_tok_s', 0):.2f}", f"{s.get('tpot_ms', 0):.1f}",
                 f"{s.get('cpu_ms_per_token', 0):.1f}",
                 f"{s.get('decode_exact_hit_rate', 0):.1%}", f"{s.get('decode_substituted_rate', 0):.1%}",
                 f"{s.get('decode_hit_or_substituted_rate', 0):.1%}"]
        for nm in names:
            t = r["texts"][nm]
            cells += [f"{t['perplexity']:.3f}", f"{t.get('perplexity_ratio', float('nan')):.4f}",
                      f"{t.get('top1_agreement', float('nan')):.2%}", f"{t.get('mean_kl', float('nan')):.4f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def sweep_plot(rows: list[dict], path: Path, title: str) -> None:
    """Left: decode tok/s and decode hit rates vs alpha. Right: perplexity vs alpha, relative to the exact model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    alphas = [r["alpha"] for r in rows]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(10, 4))
    sp = [r.get("speed", {}) for r in rows]
    ax.plot(alphas, [s.get("decode_tok_s", 0) for s in sp], "o-", color="tab:blue", label="decode tok/s")
    ax.set_xlabel("substitution alpha")
    ax.set_ylabel("decode tok/s", color="tab:blue")
    ax2 = ax.twinx()
    ax2.plot(alphas, [100 * s.get("decode_exact_hit_rate", 0) for s in sp], "s--", color="tab:gray",
             label="exact hit %")
    ax2.plot(alphas, [100 * s.get("decode_hit_or_substituted_rate", 0) for s in sp], "^--", color="tab:green",
             label="exact + substituted %")
    ax2.set_ylabel("decode hit rate (%)")
    ax2.set_ylim(0, 100)
    h1, l1 = ax.get_legend_handles_labels()
    h2, l2 = ax2.get_legend_handles_labels()
    ax.legend(h1 + h2, l1 + l2, fontsize=8, loc="lower right")
    ax.set_title("speed and hit rate", fontsize=9)
    colors = ("tab:orange", "tab:purple", "tab:red", "tab:brown")
    for name, color in zip(rows[0]["texts"], colors):
        ppl = [r["texts"][name]["perplexity"] for r in rows]
        exact = rows[0]["texts"][name].get("perplexity_exact")
        if exact:
            bx.plot(alphas, [100 * (p / exact - 1) for p in ppl], "o-", color=color,
                    label=f"{name} (exact ppl {exact:.2f})")
        else:
            bx.plot(alphas, ppl, "o-", color=color, label=name)
    if rows[0]["texts"] and next(iter(rows[0]["texts"].values())).get("perplexity_exact"):
        bx.axhline(2.0, color="tab:red", lw=0.8, ls=":", label="+2%")
        bx.set_ylabel("perplexity vs exact model (%)")
    else:
        bx.set_ylabel("perplexity")
    bx.set_xlabel("substitution alpha")
    if "top1_agreement" in next(iter(rows[0]["texts"].values()), {}):
        cx = bx.twinx()
        for name, color in zip(rows[0]["texts"], colors):
            cx.plot(alphas, [100 * r["texts"][name]["top1_agreement"] for r in rows], "x:", color=color,
                    label=f"top-1 agreement {name}")
        cx.set_ylabel("top-1 agreement with the exact model (%), dotted")
        h1, l1 = bx.get_legend_handles_labels()
        h2, l2 = cx.get_legend_handles_labels()
        bx.legend(h1 + h2, l1 + l2, fontsize=7, loc="lower left")
    else:
        bx.legend(fontsize=8)
    bx.set_title("perplexity and top-1 agreement (teacher-forced decode path)", fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def cmd_eval(args) -> int:
    if args.data_dir and not Path(args.data_dir).is_dir():
        raise ValueError(f"data_dir: {args.data_dir} does not exist")
    alphas = parse_alphas(args.alpha_sweep) if args.alpha_sweep else [args.substitution_alpha]
    if args.hellaswag:
        args.hellaswag_path = Path(args.hellaswag) if args.hellaswag != "auto" else (
            Path(args.data_dir or "") / "hellaswag" / "hellaswag_val_full.txt.bz2")
        if not args.hellaswag_path.is_file():
            raise ValueError(f"hellaswag: {args.hellaswag_path} does not exist (give --hellaswag FILE or --data-dir)")
    first = _load(args, substitution_alpha=alphas[0])
    ids_by_file = {text_name(p): _read_ids(first, p, args.max_tokens, args.window) for p in _texts(args)}
    reference = None if args.no_reference else Reference(_load(args, expert_budget="100%", substitution_alpha=0.0))
    speeds: dict = {}
    if len(alphas) > 1 and args.speed_prompts > 0 and ids_by_file:
        # speed of all alphas measured interleaved (fresh engines alive together), before any quality pass
        engines = {a: (_load(args, substitution_alpha=a), a) for a in alphas}
        prompts = prompts_from_ids(next(iter(ids_by_file.values())), args.speed_prompts + 1)
        speeds = measure_interleaved(engines, prompts, args.speed_tokens, args.speed_rounds,
                                     None if args.json else (lambda m: print(f"speed: {m}", file=sys.stderr)))
        del engines
        gc.collect()
    name, rows = first.path.name, []
    for a in alphas:
        row = evaluate_at(args, a, reference, ids_by_file, engine=first, speed=speeds.get(a))
        first = None
        rows.append(row)
        gc.collect()  # free this alpha's engine (a web of cycles) before loading the next
        if not args.json:
            print(json.dumps(row), file=sys.stderr)
    from moelite.cli import engine_config

    profile = engine_config(args).substitution_profile
    result = {"model": name, "expert_budget": args.expert_budget, "cache_policy": args.cache_policy,
              "substitution_mode": args.substitution_mode, "substitution_profile": profile and list(profile),
              "window": args.window, "stride": args.stride, "rows": rows}
    if args.alpha_sweep:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        tag = f"alpha_sweep_{str(args.expert_budget).replace('%', 'pct')}_{args.cache_policy}"
        if args.substitution_mode != "always":
            tag += f"_{args.substitution_mode}"
        if profile:
            tag += "_profile"
        (out / f"{tag}.md").write_text(f"`moelite eval` on {name}, budget {args.expert_budget}, policy "
                                       f"{args.cache_policy}, substitution mode {args.substitution_mode}, per-layer "
                                       f"alpha multipliers {list(profile) if profile else 'none (one alpha)'}\n\n"
                                       + sweep_table(rows))
        (out / f"{tag}.json").write_text(json.dumps(result, indent=1))
        sweep_plot(rows, out / f"{tag}.png", f"{name}: budget {args.expert_budget}, {args.cache_policy}")
        result["files"] = [str(out / f"{tag}.{x}") for x in ("md", "json", "png")]
        if not args.json:
            print(sweep_table(rows))
    print(json.dumps(result))
    return 0


def register_cli(sub) -> None:
    from moelite.cli import add_engine_flags

    data = default_data_dir()
    p = sub.add_parser("eval", help="perplexity, agreement with the exact model, HellaSwag, alpha sweep")
    p.add_argument("--model", default=None, help="checkpoint folder (default: the embedded demo model)")
    p.add_argument("--text", action="append", help="text file to score (repeatable; default: WikiText-2 test)")
    p.add_argument("--data-dir", default=str(data) if data else None, help="shared data folder (default: %(default)s)")
    p.add_argument("--window", type=int, default=256, help="tokens per sliding window")
    p.add_argument("--stride", type=int, default=128, help="tokens the window advances (= scored per window)")
    p.add_argument("--max-tokens", type=int, default=1024, help="scored tokens per text file")
    p.add_argument("--hellaswag", nargs="?", const="auto", default=None,
                   help="also score HellaSwag (default file: DATA_DIR/hellaswag/hellaswag_val_full.txt.bz2)")
    p.add_argument("--limit", type=int, default=200, help="HellaSwag items")
    p.add_argument("--alpha-sweep", default=None, help="comma-separated alphas, e.g. 0,0.1,0.25,0.4")
    p.add_argument("--speed-prompts", type=int, default=3, help="prompts for the decode-speed measurement (0: skip)")
    p.add_argument("--speed-tokens", type=int, default=32, help="tokens generated per speed prompt")
    p.add_argument("--speed-rounds", type=int, default=12,
                   help="with --alpha-sweep: prompts per alpha in the interleaved speed measurement")
    p.add_argument("--no-reference", action="store_true", help="skip the exact-model comparison")
    p.add_argument("--out", default="benchmarks/results/smoe", help="folder for the sweep table, JSON and PNG")
    p.add_argument("--json", action="store_true", help="print only the final JSON line")
    add_engine_flags(p)
    p.set_defaults(func=cmd_eval)
