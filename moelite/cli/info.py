"""`moelite info [DIR]`: a checkpoint's architecture and sizes, and which expert budgets fit this machine.

Contract: `add_arguments(p)` declares the flags; `run(args) -> int` opens the checkpoint (no weights are read into
memory), prints a summary (--json: one JSON object) and returns 0. A budget that would hold every routed expert is
reported as "all experts resident".
"""

from __future__ import annotations

import json
from pathlib import Path

from moelite.cli.flags import add_json_flag
from moelite.config import format_bytes

NAME = "info"
HELP = "describe a checkpoint and which budgets fit this machine"


def add_arguments(p) -> None:
    p.add_argument("model", nargs="?", default=None, metavar="DIR",
                   help="Hugging Face checkpoint folder (default: the embedded demo model)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept .bin/.pt pickle weights (can run code: only for trusted files)")
    add_json_flag(p)


def run(args) -> int:
    import torch
    from transformers import AutoConfig

    from moelite.core.arch import adapter_for
    from moelite.config import EngineConfig
    from moelite.core.checkpoint import Checkpoint
    from moelite.core import native
    from moelite.core.cpu_kernels import ResidentKernel
    from moelite.core.dense import dense_bytes, dense_dtype
    from moelite.core.device import slot_dtype
    from moelite.core.expert_store import ExpertLayout
    from moelite.core.memory import auto_budget
    from moelite.core.quant import QuantSpec, quant_label, quantized_linears
    from moelite.demo import demo_model_path

    path = Path(args.model) if args.model else demo_model_path()
    ckpt = Checkpoint.open(path, allow_pickle=args.allow_pickle)
    adapter = adapter_for(ckpt.model_type)
    cfg = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
    n_exp, top_k = adapter.num_experts(cfg), adapter.top_k(cfg)
    layout = ExpertLayout.build(ckpt, adapter, n_exp, QuantSpec.from_config(cfg))
    names = layout.expert_tensor_names()
    dense = sum(t.nbytes for n, t in ckpt.tensors.items() if n not in names)
    expert_bytes = layout.total_disk_bytes
    cpu = torch.device("cpu")
    dense16 = dense_dtype("auto", cpu, layout.float_dtype)  # as the engine picks
    cpu_dense = dense_bytes(ckpt.tensors, names, dense16, torch.float32)
    slot = slot_dtype(EngineConfig(), cpu, layout.disk_dtype, layout.numel)
    per_expert = layout.disk_bytes * slot.itemsize / layout.disk_dtype.itemsize
    auto = auto_budget("cpu", cpu_dense, cfg, torch.float32, int(per_expert * len(layout.experts)))
    kernel = ResidentKernel(torch.nn.SiLU(), "auto")
    info = {
        "model": path.name, "model_type": ckpt.model_type, "layers": int(cfg.num_hidden_layers),
        "moe_layers": len(layout.layers), "routed_experts_per_layer": n_exp, "top_k": top_k,
        "hidden": layout.hidden, "expert_intermediate": layout.intermediate, "checkpoint_dtype": str(layout.float_dtype),
        "expert_quant": quant_label(layout.quant), "dense_quantized_layers": len(quantized_linears(
            n for n in ckpt.tensors if n not in names)),
        "dense_bytes": dense, "cpu_dense_bytes": cpu_dense,
        "cpu_dense_dtype": str(dense16 or torch.float32).removeprefix("torch."), "native_kernels": native.status(),
        "routed_expert_bytes": expert_bytes, "expert_bytes_each": layout.disk_bytes,
        "cpu_slot_dtype": str(slot).removeprefix("torch."), "min_budget_bytes_cpu": int(top_k * per_expert),
        "available_ram_bytes": auto.available, "available_ram_source": auto.source,
        "max_budget_fitting_ram_cpu": auto.bytes, "cpu_expert_kernel": kernel.kind, "cpu_expert_kernel_why": kernel.why,
        "all_experts_resident_cpu": auto.all_resident, "auto_budget_note_cpu": auto.note,
    }
    gpu = None
    if torch.cuda.is_available():
        gpu = auto_budget("cuda", dense, cfg, layout.disk_dtype, expert_bytes)
        info.update(auto_budget_bytes_cuda=gpu.bytes, all_experts_resident_cuda=gpu.all_resident,
                    auto_budget_note_cuda=gpu.note)
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"{info['model']}: {ckpt.model_type}, {info['layers']} layers ({info['moe_layers']} MoE), "
          f"{n_exp} routed experts/layer, top-{top_k}, hidden {layout.hidden}, expert intermediate {layout.intermediate}")
    print(f"  dense weights      {format_bytes(dense)} ({layout.float_dtype} on disk); on the CPU "
          f"{format_bytes(cpu_dense)} (large layers as {info['cpu_dense_dtype']}, small ones float32)")
    packed = f", {info['expert_quant']} packed" if layout.quant else ""
    print(f"  routed experts     {format_bytes(expert_bytes)} = {len(layout.experts)} x {format_bytes(layout.disk_bytes)}"
          f"{packed}")
    if info["dense_quantized_layers"]:
        print(f"  quantized dense    {info['dense_quantized_layers']} linear layers packed")
    how = " packed" if layout.quant else f" as {info['cpu_slot_dtype']}"
    print(f"  minimum budget     {format_bytes(info['min_budget_bytes_cpu'])} (top-{top_k} experts{how} on CPU)")
    print(f"  this machine (CPU) {auto.note}" + _share(auto, per_expert * len(layout.experts), how))
    print(f"  expert kernel      {kernel.kind}: {kernel.why}")
    print(f"  native kernels     {info['native_kernels']}")
    if gpu is not None:
        print(f"  this machine (GPU) {gpu.note}" + _share(gpu, expert_bytes, ""))
    return 0


def _share(auto, all_bytes: float, how: str) -> str:
    """The share of the experts the auto budget holds, or nothing when the note already says all are resident."""
    return "" if auto.all_resident else f" ({auto.bytes / all_bytes:.0%} of the experts{how})"
