"""Build a transformers model whose routed experts are offloaded.

Contract: `build_model(ckpt, adapter, hf_config, device, dtype, manager_factory)` creates the transformers model on
the meta device, removes the routed `experts` module of every MoE block, swaps large dense layers for 16-bit ones
when `dense16` is given (the CPU with a bf16/fp16 checkpoint, `core/dense.py`), materialises the rest on `device`, loads
every non-expert tensor from the checkpoint with positional reads (strict: a missing or unexpected tensor is an
error), wraps each MoE block in an `OffloadedMoEBlock` and hands the blocks to the manager (`ExpertManager.attach`).
Routed-expert bytes are never read here. Building a model also silences transformers' FutureWarnings
(`quiet_transformers_deprecations`): transformers 5.x warns on every forward that `past_key_values` is deprecated,
which would splice into streamed text and fill logs; the keyword stays, as older 5.x releases lack its successor.
"""

from __future__ import annotations

import re
import warnings

import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoModelForCausalLM

from moelite.core.arch.base import ArchAdapter
from moelite.core import dense, quant
from moelite.core.checkpoint import Checkpoint, CheckpointError
from moelite.core.expert_store import ExpertLayout, ExpertReader
from moelite.core.moe_layer import ExpertManager, OffloadedMoEBlock


#: transformers 5.x's notice for the keyword moelite passes to forwards and mask builders (kept: 5.17 lacks `cache=`)
PAST_KEY_VALUES_NOTICE = r"`past_key_values` is deprecated"


def quiet_transformers_deprecations() -> None:
    """Ignore transformers' FutureWarnings: those raised from its own modules, and its `past_key_values` notice,
    which is attributed to the caller (moelite's modules call its mask builders directly). Deprecation notices about
    transformers' API are meaningless to moelite's users; every other warning is left as it is. Idempotent
    (warnings drops duplicate filters)."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"transformers\.")
    warnings.filterwarnings("ignore", message=PAST_KEY_VALUES_NOTICE, category=FutureWarning)


def meta_model(hf_config, dtype: torch.dtype) -> nn.Module:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype, trust_remote_code=False)
    return model


def moe_blocks(model: nn.Module, layout: ExpertLayout) -> dict[int, nn.Module]:
    layers = model.model.layers
    blocks = {}
    for i in layout.layers:
        if i >= len(layers) or not hasattr(layers[i].mlp, "experts"):
            raise CheckpointError(f"checkpoint has routed experts for layer {i}, but config.json makes layer {i} "
                                  "dense (check num_hidden_layers, first_k_dense_replace, mlp_only_layers)")
        blocks[i] = layers[i].mlp
    missing = [i for i, layer in enumerate(layers) if hasattr(layer.mlp, "experts") and i not in blocks]
    if missing:
        raise CheckpointError(f"config.json makes layers {missing} MoE layers but the checkpoint has no routed "
                              "experts for them")
    return blocks


def _rebuild_nonpersistent(model: nn.Module, device: torch.device) -> None:
    """to_empty() leaves non-persistent buffers (rotary inv_freq) uninitialised: rebuild those modules."""
    for name, mod in list(model.named_modules()):
        if not mod._non_persistent_buffers_set:
            continue
        parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
        try:
            fresh = type(mod)(config=mod.config, device=device)
        except TypeError:
            fresh = type(mod)(config=mod.config).to(device)
        setattr(parent, name.rsplit(".", 1)[-1], fresh)


def build_model(ckpt: Checkpoint, adapter: ArchAdapter, hf_config, layout: ExpertLayout, reader: ExpertReader,
                manager: ExpertManager, device: torch.device, dtype: torch.dtype, top_k: int,
                progress: bool = True, dense16: torch.dtype | None = None) -> nn.Module:
    quiet_transformers_deprecations()
    model = meta_model(hf_config, dtype)
    blocks = moe_blocks(model, layout)
    act_fn = None
    for block in blocks.values():
        act_fn = act_fn or block.experts.act_fn
        del block.experts
    quant.convert(model, ckpt, quant.QuantSpec.from_config(hf_config), adapter.rename)  # linear layers stored packed (core/quant.py)
    if dense16 is not None:  # large dense weights stay 16-bit on the CPU (core/dense.py), swapped before allocation
        dense.convert(model, dense16)
    model.to_empty(device=device)
    _rebuild_nonpersistent(model, device)

    expert_names = layout.expert_tensor_names()
    targets = dict(model.named_parameters())
    targets.update({f"{mn}.{bn}" if mn else bn: b for mn, m in model.named_modules() for bn, b in m._buffers.items()
                    if b is not None and bn not in m._non_persistent_buffers_set})
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    loaded: set[str] = set()
    unexpected: list[str] = []
    names = [n for n in ckpt.tensors if n not in expert_names]
    for name in tqdm(names, desc="loading dense weights", unit="tensor", disable=not progress, leave=False):
        target = adapter.rename(name)
        dest = targets.get(target)
        if dest is None:
            if not any(p.search(name) for p in ignore):
                unexpected.append(name)
            continue
        info = ckpt.tensors[name]
        if tuple(dest.shape) != info.shape:
            raise CheckpointError(f"{ckpt.display(info.file)}: tensor {name!r} has shape {list(info.shape)}, "
                                  f"config.json implies {list(dest.shape)}")
        with torch.no_grad():
            dest.copy_(reader.read_tensor(info))
        loaded.add(target)
    reader.drop_file_pages()
    if unexpected:
        raise CheckpointError(f"checkpoint tensors not used by the {ckpt.model_type} architecture: "
                              f"{unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    missing = [n for n in targets if n not in loaded and not (tied and n == "lm_head.weight")]
    if missing:
        raise CheckpointError(f"checkpoint lacks tensors the {ckpt.model_type} architecture needs: "
                              f"{missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if tied:
        model.get_output_embeddings().weight = model.get_input_embeddings().weight
    dense.fuse_swiglu(model)  # shared experts / dense MLPs in one native call (16-bit or quantized dense weights)
    dense.fuse_projections(model)  # q/k/v in one native call at decode (16-bit or quantized dense weights)

    wrapped = {i: OffloadedMoEBlock(blocks[i], i, adapter, manager, top_k) for i in sorted(blocks)}
    for i, block in wrapped.items():
        model.model.layers[i].mlp = block
    manager.attach(adapter, act_fn, wrapped)
    model.eval().requires_grad_(False)
    return model
