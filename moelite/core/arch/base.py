"""Architecture adapter contract.

An adapter maps one Hugging Face MoE architecture onto moelite: which checkpoint keys are routed experts
(and which projection each is), how on-disk names of the other weights map onto transformers' modules, the routing
function (gate scores -> top-k experts and their combine weights) and the shared-expert path. Everything else
(attention, norms, embeddings, the router's and shared experts' modules) is transformers' own implementation.

Routing is split in three so that substitution and prediction can reuse it:
  scores(block, x[N,H]) -> probs[N,E] (the gate score of every expert, SMoE's "importance"),
                           choice[N,E] (what top-k ranks: probs, or probs masked by group / biased)
  select(choice, k)     -> idx[N,k]
  weigh(block, probs, idx[N,k]) -> w[N,k] (combine weights, normalised only where the architecture does)
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class Routing:
    probs: torch.Tensor  # [N, E] float32 gate scores
    choice: torch.Tensor  # [N, E] ranking scores
    idx: torch.Tensor  # [N, k] int64 selected experts
    weights: torch.Tensor  # [N, k] combine weights
    #: [N, k] bool: entries the SMoE cache router put in place of a missing expert (None = none); the expert
    #: manager counts their evaluations as substitutions, never as cache hits
    substituted: torch.Tensor | None = None


class ArchAdapter:
    #: config.json model_type values this adapter serves
    model_types: tuple[str, ...] = ()
    #: per-expert checkpoint key -> groups (layer, expert, proj); proj mapped through `proj_names`
    expert_key = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
    proj_names = {"gate_proj": "gate", "up_proj": "up", "down_proj": "down"}
    #: fused 3D expert tensors as transformers 5 holds them in memory: (layer, kind) with kind gate_up_proj|down_proj
    fused_key = re.compile(r"^model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)$")
    #: substring renames from checkpoint keys to transformers module keys
    renames: tuple[tuple[str, str], ...] = ()

    def num_experts(self, config) -> int:
        return int(config.num_experts)

    def top_k(self, config) -> int:
        return int(config.num_experts_per_tok)

    def rename(self, key: str) -> str:
        for old, new in self.renames:
            key = key.replace(old, new)
        return key

    # ---- routing -------------------------------------------------------------------------------------------
    def logits(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, block.gate.weight)  # [N, E]

    def scores(self, block: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = torch.softmax(self.logits(block, x), dim=-1, dtype=torch.float32)
        return probs, probs

    def select(self, choice: torch.Tensor, k: int) -> torch.Tensor:
        return torch.topk(choice, k, dim=-1).indices

    def weigh(self, block: nn.Module, probs: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
        return probs.gather(1, idx)

    def route(self, block: nn.Module, x: torch.Tensor, k: int) -> Routing:
        probs, choice = self.scores(block, x)
        idx = self.select(choice, k)
        return Routing(probs, choice, idx, self.weigh(block, probs, idx))

    # ---- shared experts -----------------------------------------------------------------------------------
    def shared(self, block: nn.Module, x: torch.Tensor) -> torch.Tensor | None:
        return None


def normalise(w: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    return w / (w.sum(dim=-1, keepdim=True) + eps)
