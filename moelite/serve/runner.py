"""Model runners: the forward passes under the batcher's step. The batcher decides who runs and what they emit; a
runner turns sequences into next-token logits.

Contract (both runners; the batcher calls them with the engine's lock held and the step's alpha set):
  - `prefill(seqs) -> logits [B, V]` (float32, CPU): each sequence's prompt as prefill (`manager.prefilling()`,
    whatever its length), the logits of its last position; sets `seq.cache`.
  - `decode(seqs) -> logits [B, V]`: one decode step feeding each sequence's `last_token`.
  - `release(seq)`: the sequence left the batch (finished, cancelled, failed): its cache goes now.
  - `mark(seqs)` -> a token of the sequences' cache lengths, `rollback(seqs, token)` -> whether their caches could
    be brought back to those lengths (a decode step that failed part-way appended to some layers only); the
    DynamicRunner crops each layer, a sliding-window layer that has dropped its oldest entry cannot be restored.
  - `flush()`: deferred bookkeeping of the last step (the CUDA-graph decoder's), before counters are read.
  - `lock_step`: False: sequences join and leave between steps, prefilled one by one. True: all sequences are
    admitted and prefilled together once, and their rows keep decoding (a dummy token) until all are done.

`DynamicRunner(engine)`: a DynamicCache per sequence. One running sequence decodes with the plain
`engine.model(input_ids, past_key_values, use_cache=True, logits_to_keep=1)` forward. Several walk the decoder
layers: attention per sequence (its own cache, positions, rotary embedding and mask), then a single
`post_attention_layernorm` + `mlp` call on all sequences' tokens [B, 1, H], so each routed expert is computed once
per step for all tokens routed to it. A teacher-forced sequence with an empty prompt gets a zero logits row from
`prefill` (it is never sampled from) and an empty cache.

`StaticRunner(decoder)`: lock step over a `graph_decode.StaticDecoder` (static KV cache, CUDA graphs on CUDA); the
sequences share one alpha.
"""

from __future__ import annotations

import torch
from transformers import DynamicCache
from transformers.masking_utils import create_causal_mask, create_sliding_window_causal_mask

from moelite.core.graph_decode import StaticDecoder
from moelite.serve.sequence import Sequence


class DynamicRunner:
    lock_step = False

    def __init__(self, engine):
        self.engine = engine
        cfg = engine.hf_config
        n = len(engine.model.model.layers)
        types = getattr(cfg, "layer_types", None)
        if types:
            self.sliding = [t == "sliding_attention" for t in types[:n]]
        else:  # Mixtral / Qwen3-MoE style: one mask kind for all layers, chosen by config.sliding_window
            self.sliding = [getattr(cfg, "sliding_window", None) is not None] * n

    @torch.inference_mode()
    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        eng = self.engine
        rows = []
        for s in seqs:
            s.cache = DynamicCache(config=eng.hf_config)
            if not s.prompt_ids:  # teacher forcing from no context: the first forced token is fed by decode
                rows.append(torch.zeros(eng.hf_config.vocab_size))
                continue
            ids = torch.tensor([s.prompt_ids], dtype=torch.long, device=eng.device)  # [1, T]
            with eng.manager.prefilling():
                out = eng.model(input_ids=ids, past_key_values=s.cache, use_cache=True, logits_to_keep=1)
            rows.append(out.logits[0, -1].float().cpu())
        return torch.stack(rows)  # [B, V]

    @torch.inference_mode()
    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        eng = self.engine
        if eng.lean is not None and not eng.lean.hooked():  # the lean step (core/lean_decode.py): same functions
            return eng.lean.step([s.last_token for s in seqs], [s.cache for s in seqs]).cpu()  # [B, V]
        if len(seqs) == 1:  # the plain forward: batch-1 decode costs what a direct model call costs
            s = seqs[0]
            ids = torch.tensor([[s.last_token]], dtype=torch.long, device=eng.device)  # [1, 1]
            out = eng.model(input_ids=ids, past_key_values=s.cache, use_cache=True, logits_to_keep=1)
            return out.logits[:, -1].float().cpu()  # [1, V]
        core = eng.model.model
        toks = torch.tensor([[s.last_token] for s in seqs], dtype=torch.long, device=eng.device)  # [B, 1]
        h = core.embed_tokens(toks)  # [B, 1, H]
        per_seq = []  # (position ids [1, 1], rotary embedding, mask per layer)
        for i, s in enumerate(seqs):
            past = s.cache.get_seq_length()
            pos = torch.tensor([[past]], dtype=torch.long, device=eng.device)  # [1, 1]
            hi = h[i:i + 1]
            kw = dict(config=eng.hf_config, inputs_embeds=hi, attention_mask=None, past_key_values=s.cache,
                      position_ids=pos)
            full = create_causal_mask(**kw)
            slide = create_sliding_window_causal_mask(**kw) if any(self.sliding) else None
            masks = [slide if sl else full for sl in self.sliding]
            per_seq.append((pos, core.rotary_emb(hi, pos), masks))
        for li, layer in enumerate(core.layers):
            outs = []
            for i, s in enumerate(seqs):
                pos, rope, masks = per_seq[i]
                x = h[i:i + 1]  # [1, 1, H]
                a, _ = layer.self_attn(hidden_states=layer.input_layernorm(x), attention_mask=masks[li],
                                       position_ids=pos, past_key_values=s.cache, position_embeddings=rope)
                outs.append(x + a)
            h = torch.cat(outs, 0)  # [B, 1, H]
            # one MLP call for the whole batch: each routed expert runs once for all tokens routed to it
            h = h + layer.mlp(layer.post_attention_layernorm(h))
        return eng.model.lm_head(core.norm(h))[:, -1].float().cpu()  # [B, V]

    def release(self, s: Sequence) -> None:
        s.cache = None

    @staticmethod
    def mark(seqs: list[Sequence]) -> list[list[int]]:
        return [[layer.keys.shape[-2] if layer.is_initialized else 0 for layer in s.cache.layers] for s in seqs]

    @staticmethod
    def rollback(seqs: list[Sequence], token: list[list[int]]) -> bool:
        grown = []
        for s, lengths in zip(seqs, token):
            now = DynamicRunner.mark([s])[0]
            if len(now) < len(lengths) or any(n not in (b, b + 1) for n, b in zip(now, lengths)):
                return False  # a layer dropped an old entry (sliding window) or changed otherwise: not restorable
            grown.append((s, now, lengths))
        for s, now, lengths in grown:
            for layer, n, b in zip(s.cache.layers, now, lengths):
                if n > b:
                    layer.crop(b - n)
        return True

    def flush(self) -> None:
        pass


class StaticRunner:
    lock_step = True

    def __init__(self, decoder: StaticDecoder):
        self.decoder = decoder
        self.rows: list[Sequence] = []  # row i of the static cache, fixed at prefill

    def prefill(self, seqs: list[Sequence]) -> torch.Tensor:
        if self.rows:
            raise RuntimeError("StaticRunner.prefill: the rows are fixed at the first prefill; use a new runner")
        if len(seqs) != self.decoder.batch:
            raise ValueError(f"seqs: {len(seqs)} sequences for a static decoder of batch {self.decoder.batch}")
        self.rows = list(seqs)
        for i, s in enumerate(seqs):
            s.cache = i
        return self.decoder.prefill([s.prompt_ids for s in seqs])

    def decode(self, seqs: list[Sequence]) -> torch.Tensor:
        # every row steps; a finished row feeds its last token again and its logits are dropped
        logits = self.decoder.step([s.last_token for s in self.rows])  # [n, V]
        return logits[[s.cache for s in seqs]]

    def release(self, s: Sequence) -> None:
        s.cache = None

    def flush(self) -> None:
        self.decoder.flush()
