"""Write a checkpoint whose routed experts (and, with `dense=True`, its dense linear layers) are weight-only
quantized, in compressed-tensors' pack-quantized layout (core/quant.py), which moelite loads directly.

Contract: `quantize_checkpoint(src, dst, bits, group_size=128, dense=False, progress=True) -> dst`
  - src is a Hugging Face MoE folder moelite loads (safetensors, unquantized); it is refused, before anything is
    written, when it is already quantized, when its sizes are not multiples of the group size, or when dst exists
    and is not empty.
  - Routed experts: every expert's gate/up/down weight W [O, I] becomes `weight_packed` / `weight_scale` /
    `weight_shape` under per-expert names (fused 3D expert tensors are split per expert), round to nearest with one
    scale per group of `group_size` inputs (None: per output row).
  - dense=True: every other nn.Linear weight (attention, shared experts, dense MLPs, lm_head unless tied to the
    embedding) is quantized the same way, except routers and layers narrower than 32 outputs; embeddings and norms
    stay as they are, as gpt-fast's weight-only handlers do.
  - Everything else is copied bit for bit; one output shard per input shard (written shard by shard, so memory holds
    one shard at a time); config.json gains `quantization_config`; tokenizer and generation files are copied.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig

from moelite.core.arch import adapter_for
from moelite.core.checkpoint import Checkpoint, CheckpointError, TensorInfo
from moelite.core.expert_store import ExpertLayout, preadv_all
from moelite.core.integrity import forget
from moelite.core.model import meta_model, moe_blocks, quiet_transformers_deprecations
from moelite.core.quant import BITS, QuantSpec, quantize

#: files of a model folder copied as they are (everything but weights and config.json)
COPY_PREFIXES = ("tokenizer", "special_tokens", "generation_config", "vocab", "merges", "chat_template")


def _read(info: TensorInfo) -> torch.Tensor:
    out = torch.empty(info.shape, dtype=info.dtype)
    fd = os.open(info.file, os.O_RDONLY)
    try:
        preadv_all(fd, memoryview(out.view(-1).view(torch.uint8).numpy()), info.offset)
    except OSError as exc:
        raise CheckpointError(f"{info.file.name}: tensor {info.name!r} is truncated ({exc})") from exc
    finally:
        os.close(fd)
    return out


def _dense_targets(ckpt: Checkpoint, adapter, hf_config, layout: ExpertLayout, group: int | None) -> dict[str, str]:
    """Checkpoint weight name -> module name of the dense linear layers to quantize (see the contract)."""
    quiet_transformers_deprecations()
    model = meta_model(hf_config, torch.float32)
    routers = {id(getattr(b, "gate", None)) for b in moe_blocks(model, layout).values()}
    tied = bool(getattr(hf_config, "tie_word_embeddings", False))
    mods = dict(model.named_modules())
    expert_names = layout.expert_tensor_names()
    out = {}
    for name in ckpt.tensors:
        if name in expert_names or not name.endswith(".weight"):
            continue
        target = adapter.rename(name).removesuffix(".weight")
        mod = mods.get(target)
        if type(mod) is not nn.Linear or id(mod) in routers or ".experts." in target:
            continue
        if (tied and mod is model.get_output_embeddings()) or mod.out_features < 32:
            continue
        if mod.in_features % (group or mod.in_features) or mod.in_features % 32:
            continue
        out[name] = target
    return out


def _expert_names(adapter, layout: ExpertLayout) -> dict[str, tuple[int, int, str]]:
    """Source tensor part name -> (layer, expert, projection), and the per-expert name each is written under."""
    inverse = {v: k for k, v in adapter.proj_names.items()}
    names = {}
    for (layer, e), t in layout.experts.items():
        for proj, info in zip(("gate", "up", "down"), t.parts):
            base = f"model.layers.{layer}.mlp.experts.{e}.{inverse[proj]}.weight"
            m = adapter.expert_key.match(info.name)
            if m:  # per-expert source: keep its name
                base = info.name
            elif not adapter.expert_key.match(base):
                raise CheckpointError(f"cannot name expert {e} of layer {layer} for the {adapter.__class__.__name__} "
                                      "architecture")
            names[base] = (layer, e, proj)
    return names


def quantize_checkpoint(src: str | Path, dst: str | Path, bits: int, group_size: int | None = 128,
                        dense: bool = False, progress: bool = True, force: bool = False) -> Path:
    src, dst = Path(src), Path(dst)
    if bits not in BITS:
        raise ValueError(f"bits: {bits} is not one of {', '.join(map(str, BITS))}")
    if group_size is not None and (group_size <= 0 or group_size % 32):
        raise ValueError(f"group_size: {group_size} must be a positive multiple of 32 (or per-channel)")
    if dst.exists() and (not dst.is_dir() or (any(dst.iterdir()) and not force)):
        raise ValueError(f"dst: {dst} exists and is not an empty folder; give another folder, or --force")
    if dst.resolve() == src.resolve():
        raise ValueError("dst: must differ from the source folder")
    ckpt = Checkpoint.open(src)
    adapter = adapter_for(ckpt.model_type)
    hf_config = AutoConfig.from_pretrained(str(src), trust_remote_code=False)
    if QuantSpec.from_config(hf_config) is not None:
        raise ValueError(f"src: {src.name!r} is already quantized (config.json has quantization_config)")
    spec = QuantSpec(bits, group_size)
    layout = ExpertLayout.build(ckpt, adapter, adapter.num_experts(hf_config))
    for size, what in ((layout.hidden, "hidden_size"), (layout.intermediate, "expert intermediate size")):
        if size % 32 or size % spec.group_for(size):
            raise ValueError(f"group_size: the model's {what} {size} is not a multiple of {spec.group_for(size)} "
                             "(and of 32); pick a group size that divides it")
    dense_map = _dense_targets(ckpt, adapter, hf_config, layout, group_size) if dense else {}
    # every expert part, by the file it lives in: (source info, output name)
    experts_by_file: dict[Path, list[tuple[TensorInfo, str]]] = {}
    parts = {(layer, e, proj): info for (layer, e), t in layout.experts.items()
             for proj, info in zip(("gate", "up", "down"), t.parts)}
    for out_name, key in _expert_names(adapter, layout).items():
        info = parts[key]
        experts_by_file.setdefault(info.file, []).append((info, out_name))
    expert_sources = {p.name.split("[")[0] for p in parts.values()}
    files = sorted({t.file for t in ckpt.tensors.values()})

    dst.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    quantized_dense: list[str] = []
    for i, file in enumerate(tqdm(files, desc=f"quantizing to int{bits}", unit="shard", disable=not progress)):
        fname = file.name if len(files) > 1 else "model.safetensors"
        state: dict[str, torch.Tensor] = {}

        def put(name: str, w: torch.Tensor) -> None:
            packed, scale = quantize(w, bits, group_size)
            base = name.removesuffix(".weight")
            state[base + ".weight_packed"] = packed
            state[base + ".weight_scale"] = scale
            state[base + ".weight_shape"] = torch.tensor(list(w.shape), dtype=torch.int64)

        for info, out_name in experts_by_file.get(file, []):
            put(out_name, _read(info))
        for name, info in ckpt.tensors.items():
            if info.file != file or name in expert_sources:
                continue
            t = _read(info)
            if name in dense_map:
                put(name, t)
                quantized_dense.append(dense_map[name])
            else:
                state[name] = t
        if state:
            save_file(state, str(dst / fname), metadata={"format": "pt"})
            weight_map.update({n: fname for n in state})
        del state
    if len(files) > 1:
        (dst / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map},
                                                                     indent=1))
    config = json.loads((src / "config.json").read_text())
    targets = ["re:.*\\.experts\\..*"] + [f"re:^{n.replace('.', '[.]')}$" for n in sorted(quantized_dense)]
    config["quantization_config"] = spec.config(targets, ignore=[])
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for f in src.iterdir():
        if f.is_file() and not f.is_symlink() and f.name.startswith(COPY_PREFIXES):
            shutil.copy(f, dst / f.name)
    forget(dst)  # written on purpose (perhaps over an earlier one, --force): its checksums are recorded anew
    return dst
