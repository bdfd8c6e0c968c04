"""Torch devices and dtypes resolved from an `EngineConfig` (which itself stays free of torch).

Contract:
  - `parse_device(device)` -> torch.device for 'cpu', 'cuda' or 'cuda:N'; ValueError naming `device` when the
    spelling is wrong, when no CUDA GPU is available, or when the index is beyond the devices present.
  - `slot_dtype(config, device, checkpoint_dtype)` -> the dtype of expert slots: `config.expert_dtype`, or for
    "auto" the checkpoint's floating dtype (a bf16 slot holds twice the experts of a float32 one, and a miss reads
    straight into it; the CPU kernels compute in float32 from 16-bit slots, `cpu_kernels.py`), except on the CPU
    for experts under SMALL_EXPERT_BYTES in float32 (`expert_numel` given): there float32 slots are faster.
"""

from __future__ import annotations

import torch

from moelite.config import EngineConfig, check_device


def parse_device(device: str | torch.device) -> torch.device:
    dev = torch.device(check_device(device))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device: {device!r} asked for, but no CUDA GPU is available here; use device='cpu'")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"device: {device!r}: only {torch.cuda.device_count()} CUDA device(s) exist")
    return dev


#: on the CPU, experts smaller than this (in float32) keep float32 slots under "auto": their compute is per-call
#: overhead, not reading weights, and converting 16-bit slots on every call measured slower (demo model, 2026-11-26)
SMALL_EXPERT_BYTES = 1 << 20


def slot_dtype(config: EngineConfig, device: torch.device, checkpoint_dtype: torch.dtype,
               expert_numel: int | None = None) -> torch.dtype:
    if checkpoint_dtype == torch.uint8:  # packed (quantized) experts: a slot holds their bytes as stored
        if config.expert_dtype != "auto":
            raise ValueError(f"expert_dtype: {config.expert_dtype!r}, but this checkpoint's experts are quantized and "
                             "their slots hold the packed bytes; leave expert_dtype at 'auto'")
        return torch.uint8
    if config.expert_dtype != "auto":
        return getattr(torch, config.expert_dtype)
    if not checkpoint_dtype.is_floating_point or checkpoint_dtype.itemsize > 4:
        return torch.float32  # quantized or float64 checkpoints: compute slots in float32
    if device.type == "cpu" and expert_numel is not None and expert_numel * 4 < SMALL_EXPERT_BYTES:
        return torch.float32
    return checkpoint_dtype
