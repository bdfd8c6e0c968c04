"""Evaluate moelite's demo model and draw the figures of its model card.

Computes, on the held-out split defined in ``demo_data.py``:

* perplexity per domain of the model, and of two add-one-smoothed unigram baselines
  with the same tokenizer (fitted on the domain's training tokens, and on all
  training tokens of the three domains);
* routed-expert usage per layer and domain (top-k selections counted over all
  held-out tokens evaluated), drawn as a heat map, and the Jensen-Shannon divergence
  (base 2, so in [0, 1]) between the domains' per-layer expert distributions, with a
  within-domain noise floor (JS between two halves of the same domain's windows);
* a few sampled continuations with transformers' ``generate`` (``ROMEO:`` first).

It also plots the training loss log (``training_log.jsonl``) as ``loss.png``.

Usage (from the repository root)::

    python training/evaluate_demo.py --model moelite/demo_model

Writes ``eval_results.json``, ``loss.png`` and ``expert_usage.png`` into the model
folder (``--out-dir`` to change) and prints Markdown tables for the model card.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_data  # noqa: E402

# "ROMEO:" is the prompt a new user tries first; the training corpus writes speakers as
# "ROMEO:" on their own line (demo_data.colon_speakers), so both forms are in distribution.
PROMPTS = ("ROMEO:", "ROMEO:\n", "def fibonacci(n):", " = The Battle of Hastings = \n")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="moelite/demo_model")
    p.add_argument("--out-dir", default=None, help="where to write results/plots (default: --model)")
    p.add_argument("--data-dir", default=str(demo_data.DEFAULT_DATA_DIR))
    p.add_argument("--cache-dir", default=str(demo_data.DEFAULT_CACHE_DIR))
    p.add_argument("--shakespeare-dir", default=None)
    p.add_argument("--speakers", choices=demo_data.SPEAKER_FORMATS, default="colon",
                   help="Shakespeare speaker-line format of the held-out text (as in training)")
    p.add_argument("--seq-len", type=int, default=256, help="evaluation window (tokens)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--max-eval-tokens", type=int, default=131072,
                   help="cap per domain; evenly spaced windows are kept when the split is larger")
    p.add_argument("--samples", type=int, default=3, help="continuations per prompt")
    p.add_argument("--max-new-tokens", type=int, default=120)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    return p.parse_args(argv)


def encode(tokenizer, docs):
    eos = tokenizer.eos_token_id
    ids = []
    for enc in tokenizer.backend_tokenizer.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eos)
    return np.asarray(ids, dtype=np.int64)


def windows_of(stream: np.ndarray, T: int, cap: int) -> np.ndarray:
    """Non-overlapping (T+1)-token windows (inputs + shifted targets), evenly thinned to cap."""
    n = (len(stream) - 1) // T
    idx = np.arange(n)
    keep = max(1, cap // T)
    if n > keep:
        idx = idx[np.linspace(0, n - 1, keep).round().astype(int)]
    return np.stack([stream[i * T: i * T + T + 1] for i in idx])


def js_divergence(p: np.ndarray, q: np.ndarray) -> float:
    p = p / p.sum()
    q = q / q.sum()
    m = 0.5 * (p + q)

    def kl(a, b):
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / b[nz])))

    return 0.5 * kl(p, m) + 0.5 * kl(q, m)


@torch.no_grad()
def evaluate_domain(model, wins: np.ndarray, batch: int, top_k: int, n_experts: int):
    """Return summed NLL, token count, per-window expert counts (windows, layers, experts)."""
    nll, ntok = 0.0, 0
    per_window = []
    for i in range(0, len(wins), batch):
        x = torch.from_numpy(wins[i:i + batch])
        out = model(input_ids=x[:, :-1], output_router_logits=True, use_cache=False)
        logits = out.logits.float()
        nll += F.cross_entropy(logits.reshape(-1, logits.size(-1)), x[:, 1:].reshape(-1),
                               reduction="sum").item()
        ntok += x[:, 1:].numel()
        b, t = x.shape[0], x.shape[1] - 1
        layer_counts = []
        for rl in out.router_logits:
            sel = rl.float().topk(top_k, dim=-1).indices.view(b, t * top_k)
            c = torch.zeros(b, n_experts, dtype=torch.long)
            c.scatter_add_(1, sel, torch.ones_like(sel))
            layer_counts.append(c)
        per_window.append(torch.stack(layer_counts, 1).numpy())
    return nll, ntok, np.concatenate(per_window, 0)


def plot_loss(log_path: Path, out: Path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    recs = [json.loads(line) for line in log_path.read_text().splitlines() if line.strip()]
    tr = [r for r in recs if "train_ce" in r]
    ho = [r for r in recs if any(k.startswith("heldout_ce_") for k in r)]
    fig, ax = plt.subplots(figsize=(8, 4.8))
    tok = np.array([r["tokens"] for r in tr]) / 1e6
    ax.plot(tok, [r["train_ce"] for r in tr], color="0.3", lw=0.9,
            label="train (all domains; thin: per domain)")
    colors = {"shakespeare": "C3", "python": "C0", "wikipedia": "C2"}
    for d in demo_data.DOMAINS:
        key = f"train_ce_{d}"
        pts = [(r["tokens"] / 1e6, r[key]) for r in tr if key in r]
        if pts:
            ax.plot(*zip(*pts), color=colors[d], lw=0.6, alpha=0.35)
    for d in demo_data.DOMAINS:
        key = f"heldout_ce_{d}"
        pts = [(r["tokens"] / 1e6, r[key]) for r in ho if key in r]
        if pts:
            ax.plot(*zip(*pts), "o-", ms=3, color=colors[d], label=f"held-out {d}")
    ax.set_xlabel("training tokens (millions)")
    ax.set_ylabel("cross-entropy (nats / token)")
    ax.set_ylim(top=min(8.5, ax.get_ylim()[1]))
    ax.grid(alpha=0.3)
    ax.legend()
    ax.set_title("moelite demo model: training loss")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_usage(usage: dict[str, np.ndarray], out: Path, top_k: int):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    doms = list(usage)
    n_layers, n_exp = usage[doms[0]].shape
    fig, axes = plt.subplots(len(doms), 1, figsize=(11, 1.0 + 0.55 * n_layers * len(doms)), sharex=True)
    vmax = max(float(u.max()) for u in usage.values())
    for ax, d in zip(axes, doms):
        im = ax.imshow(usage[d], aspect="auto", cmap="viridis", vmin=0, vmax=vmax, interpolation="nearest")
        ax.set_ylabel(f"{d}\nlayer")
        ax.set_yticks(range(n_layers))
    axes[-1].set_xlabel("routed expert")
    cbar = fig.colorbar(im, ax=axes, fraction=0.025, pad=0.01)
    cbar.set_label(f"share of top-{top_k} selections (uniform = {1 / n_exp:.3f})")
    fig.suptitle("Routed-expert usage per layer on held-out text, by domain")
    fig.savefig(out, dpi=110, bbox_inches="tight")
    plt.close(fig)


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(args.model)
    out_dir = Path(args.out_dir or model_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    cfg = model.config
    V, k, E = cfg.vocab_size, cfg.num_experts_per_tok, cfg.num_experts

    corpus = demo_data.load_corpus(Path(args.data_dir), Path(args.cache_dir), args.shakespeare_dir,
                                   speakers=args.speakers)
    train_counts = {}
    results = {"model": str(model_dir), "seq_len": args.seq_len, "domains": {}}
    for d in demo_data.DOMAINS:
        train_counts[d] = np.bincount(encode(tokenizer, corpus[d]["train"]), minlength=V)
    all_counts = sum(train_counts.values())

    def unigram_logp(counts):
        return np.log((counts + 1.0) / (counts.sum() + V))

    usage, usage_halves = {}, {}
    for d in demo_data.DOMAINS:
        stream = encode(tokenizer, corpus[d]["heldout"])
        wins = windows_of(stream, args.seq_len, args.max_eval_tokens)
        nll, ntok, counts = evaluate_domain(model, wins, args.batch, k, E)
        targets = wins[:, 1:].reshape(-1)
        uni_dom = -unigram_logp(train_counts[d])[targets].mean()
        uni_all = -unigram_logp(all_counts)[targets].mean()
        results["domains"][d] = {
            "heldout_tokens_total": int(len(stream)),
            "eval_tokens": int(ntok),
            "ppl": math.exp(nll / ntok),
            "unigram_ppl_domain": math.exp(uni_dom),
            "unigram_ppl_all": math.exp(uni_all),
            "train_tokens": int(train_counts[d].sum()),
        }
        tot = counts.sum(0).astype(np.float64)  # (layers, experts)
        usage[d] = tot / tot.sum(1, keepdims=True)
        usage_halves[d] = (counts[0::2].sum(0), counts[1::2].sum(0))  # even / odd windows
        print(f"{d}: ppl {results['domains'][d]['ppl']:.2f} "
              f"(unigram {math.exp(uni_dom):.1f} domain / {math.exp(uni_all):.1f} all) "
              f"over {ntok} tokens", flush=True)

    n_layers = usage[demo_data.DOMAINS[0]].shape[0]
    pairs = [("shakespeare", "python"), ("shakespeare", "wikipedia"), ("python", "wikipedia")]
    js = {f"{a}|{b}": [js_divergence(usage[a][l], usage[b][l]) for l in range(n_layers)] for a, b in pairs}
    floor = {d: [js_divergence(usage_halves[d][0][l].astype(float), usage_halves[d][1][l].astype(float))
                 for l in range(n_layers)] for d in demo_data.DOMAINS}
    stats = {}
    for d in demo_data.DOMAINS:
        u = usage[d]
        ent = -(u * np.log2(np.where(u > 0, u, 1))).sum(1)
        stats[d] = {"entropy_bits_per_layer": ent.tolist(), "max_entropy_bits": math.log2(E),
                    "experts_used_per_layer": (u > 0).sum(1).tolist(),
                    "max_share_per_layer": u.max(1).tolist()}
    results["expert_usage"] = {d: usage[d].tolist() for d in demo_data.DOMAINS}
    results["js_divergence_bits"] = js
    results["js_within_domain_halves_bits"] = floor
    results["usage_stats"] = stats

    torch.manual_seed(args.seed)
    samples = {}
    for prompt in PROMPTS:
        enc = tokenizer(prompt, return_tensors="pt")
        outs = []
        for _ in range(args.samples):
            gen = model.generate(**enc, max_new_tokens=args.max_new_tokens, do_sample=True,
                                 temperature=0.8, top_p=0.95)
            outs.append(tokenizer.decode(gen[0], skip_special_tokens=True))
        samples[prompt] = outs
    results["samples"] = samples

    log_path = model_dir / "training_log.jsonl"
    if log_path.exists():
        plot_loss(log_path, out_dir / "loss.png")
    plot_usage(usage, out_dir / "expert_usage.png", k)
    (out_dir / "eval_results.json").write_text(json.dumps(results, indent=1) + "\n")

    # Markdown for the model card
    print("\n| domain | held-out tokens evaluated | model ppl | unigram ppl (domain train) | unigram ppl (all train) |")
    print("|---|---:|---:|---:|---:|")
    for d, r in results["domains"].items():
        print(f"| {d} | {r['eval_tokens']:,} | {r['ppl']:.2f} | {r['unigram_ppl_domain']:.1f} | "
              f"{r['unigram_ppl_all']:.1f} |")
    print("\n| layer | " + " | ".join(f"JS {a} vs {b}" for a, b in pairs)
          + " | within-domain floor (max) |")
    print("|---:|" + "---:|" * (len(pairs) + 1))
    for l in range(n_layers):
        cells = [f"{js[f'{a}|{b}'][l]:.3f}" for a, b in pairs]
        fl = max(floor[d][l] for d in demo_data.DOMAINS)
        print(f"| {l} | " + " | ".join(cells) + f" | {fl:.4f} |")
    means = [np.mean(js[f"{a}|{b}"]) for a, b in pairs]
    print("| mean | " + " | ".join(f"{m:.3f}" for m in means)
          + f" | {np.mean([max(floor[d][l] for d in demo_data.DOMAINS) for l in range(n_layers)]):.4f} |")
    for prompt, outs in samples.items():
        print(f"\n--- {prompt!r}\n{outs[0]}")


if __name__ == "__main__":
    main()
