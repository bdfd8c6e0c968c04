"""Quality and speed evaluation of an offloaded engine against the exact model (`moelite eval`).

Contract:
  - `decode_logprobs(engine, ids, start, alpha)` -> float32 log-probabilities [len(ids) - start, V] of ids[start:],
    teacher-forced through the decode path (`Engine.teacher_force`: a forced sequence through the batcher's step,
    the loop generation uses, one token per step with a DynamicCache), so substitution applies exactly as in
    `generate`: ids[:start-1] are prefilled (exact unless `substitute_in_prefill`), then ids[start-1:-1] are fed
    one at a time; `alpha` holds for this call only.
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
  - `read_text_ids(engine, path, max_tokens, window)`: token ids of the start of a text file (as much as can be
    scored); `sweep_table(rows)` / `sweep_plot(rows, path, title)`: the markdown table and PNG of an alpha sweep.
  - `compare_text`, `hellaswag` and `measure_interleaved` take an optional `progress` callable, called with the
    units just done (scored tokens, items, rounds), for a progress bar.
The command line (`moelite eval`, moelite/cli/eval.py) drives these functions.
"""

from __future__ import annotations

import bz2
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from moelite.config import alpha_positive
from moelite.core.counters import PhaseTotals, Snapshot


# ---- the decode path, teacher-forced ---------------------------------------------------------------------------
def decode_logprobs(engine, ids: list[int], start: int, alpha=0.0) -> torch.Tensor:
    """log p(ids[t] | ids[:t]) rows for t in [start, len(ids)) -> [len(ids)-start, V] float32 (see the contract)."""
    return torch.log_softmax(engine.teacher_force(ids, start, substitution_alpha=alpha), dim=-1)  # [T, V]


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


def accounting(spent: Snapshot) -> dict:
    """The expert accounting of some passes (`spent` = engine.counters() after - before): exact hits, misses, reads
    in flight and substitutions apart, over all passes and per phase, with their rates as moelite.core.counters
    defines them (of the expert evaluations the exact model asked for, at batch 1)."""
    return {k: v for k, v in spent.report().items() if "expert_" in k or k.endswith("_rate")}


def pooled_decode_rates(results: list[dict]) -> dict:
    """Decode rates over several `accounting` results pooled (their decode counts summed, then one division)."""
    total = sum((PhaseTotals(r["decode_expert_hits"], r["decode_expert_misses"], r["decode_expert_reads_in_flight"],
                             r["decode_expert_substitutions"]) for r in results), PhaseTotals())
    return total.rates("decode_")


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
                 stride: int = 128, max_tokens: int | None = None, progress=None) -> dict:
    """Perplexity of `engine` at `alpha` on `ids` and, with a reference, agreement/KL vs the exact model."""
    res = TextResult()
    before = engine.counters()
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
        if progress is not None:
            progress(len(target))
    res.counts = accounting(engine.counters() - before)
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


def hellaswag(engine, path, limit: int | None = 200, alpha=0.0, reference=None, progress=None) -> dict:
    """Accuracy by summed log-likelihood of each ending given the context (and per-character normalised)."""
    tok = engine.tokenizer
    if tok is None:
        raise ValueError("hellaswag: the model has no tokenizer")
    items = read_hellaswag(path, limit)
    before = engine.counters()
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
        if progress is not None:
            progress(1)
    n = len(items)
    out = {"items": n, "accuracy": correct / n if n else 0.0, "accuracy_norm": correct_norm / n if n else 0.0}
    if reference is not None:
        out["choice_agreement_with_exact"] = agree / n if n else 0.0
    out.update(accounting(engine.counters() - before))
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
        before = engine.counters()
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
    out.update(accounting(engine.counters() - before))
    return out


def measure_interleaved(engines: dict, prompts: list[list[int]], max_tokens: int = 32, rounds: int = 12,
                        log=None, progress=None) -> dict[str, dict]:
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
        if progress is not None:
            progress(1)
    out = {}
    for label, rs in per.items():
        tot = {k: sum(r[k] for r in rs) for k in ("decode_tokens", "decode_seconds", "cpu_seconds", "generated_tokens")}
        rates = pooled_decode_rates(rs)
        tp = statistics.median(r["tpot_ms"] for r in rs)
        out[label] = {"alpha": engines[label][1], "tpot_ms": tp, "decode_tok_s": 1000 / tp if tp else 0.0,
                      "tpot_ms_pooled": 1000 * tot["decode_seconds"] / max(1, tot["decode_tokens"]),
                      "cpu_ms_per_token": 1000 * tot["cpu_seconds"] / max(1, tot["generated_tokens"]),
                      **{k: rates[k] for k in ("decode_exact_hit_rate", "decode_substituted_rate",
                                               "decode_hit_or_substituted_rate", "decode_read_wait_rate")},
                      "substitutions_per_request": [r["expert_substitutions"] for r in rs],
                      "prompts_measured": len(rs)}
    return out


# ---- texts and reports ---------------------------------------------------------------------------------------
def text_name(path: Path) -> str:
    """A short label: the folder for generic file names (wikitext-2/test.txt -> wikitext-2), else the stem."""
    return path.parent.name if path.stem in ("test", "valid", "input", "train") and path.parent.name else path.stem


def read_text_ids(engine, path: Path, max_tokens: int, window: int) -> list[int]:
    """Token ids of the start of a text file: enough characters for `max_tokens` scored tokens in `window`s."""
    if not path.is_file():
        raise ValueError(f"text: {path} does not exist")
    text = path.read_text(encoding="utf-8", errors="replace")
    budget_chars = max(20_000, (max_tokens + window) * 12)  # tokenise only what can be scored
    if engine.tokenizer is None:
        raise ValueError("text: the model has no tokenizer")
    # one long sequence on purpose (scored in windows): silence the longer-than-the-context warning
    return engine.tokenizer.encode(text[:budget_chars], add_special_tokens=False, verbose=False)


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
