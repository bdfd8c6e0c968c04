"""One fused routed-expert computation per MoE layer on the GPU, reading weights straight from the slot pool.

Contract:
  - `fused_experts(x, buffer, H, I, slots, weights, host_offsets=None)` -> out [N, H] (dtype of x) =
        sum_j weights[n, j] * down_e @ (silu(g) * u),  (g, u) = gate_up_e @ x[n]
    where e is what the code slots[n, j] names: >= 0 a VRAM slot (a row of the pool `buffer`, [gate | up | down]),
    <= -2 the pinned host row -code-2 (the Triton kernels read it over the bus, zero-copy: a miss computed in
    place, without a copy into VRAM or leaving a CUDA graph), -1 nothing (a miss computed elsewhere, or masked).
    No weight is gathered or copied.
  - Every tensor stays on the device and every shape depends only on N and k, so the call is CUDA-graph safe (no
    host synchronisation, no data-dependent shape). The slot table is data, not shape.
  - Backends: "triton" (two kernels: gate_up + SiLU-and-multiply, then down + combine weight; tokens grouped by
    slot so that each expert's weights are read once per call for all the tokens routed to it), and "torch" (the
    reference: gather + batched matmul; also the fallback where Triton is missing). fp32 weights are multiplied
    in full fp32 (no TF32), bf16/fp16 weights accumulate in fp32.

Shapes: N tokens, k choices per token, P = N*k (token, choice) pairs, S slots, H hidden, I expert intermediate.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F

try:  # optional: CUDA machines carry it with torch; CPU CI does not need it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised where Triton is absent
    triton = None

BLOCK_M = 16  # pairs per program (tl.dot needs >= 16 rows); each token picks an expert once, so a block holds
# the pairs of one slot for up to 16 tokens


def triton_available() -> bool:
    return triton is not None


_ONE_TOKEN: dict = {}  # (P, block_m, device) -> constant (order, rows) of a one-token plan

#: plan_blocks' sort key of a pair to skip (slot -1); programs of blocks holding it return at once
SKIP = 1 << 62


def plan_blocks(slots: torch.Tensor, block_m: int = BLOCK_M):
    """Group the P pairs by slot code into blocks of at most `block_m` pairs of one code, with static shapes.

    slots [N, k] int (>= 0 VRAM slot, <= -2 host row, -1 skip) -> (order [P] pair id of each sorted position,
    block_rows [P, block_m] sorted positions of each block's pairs (-1 = empty), block_code [P] code of each block
    (SKIP = nothing to do)). At most P blocks exist (every pair alone), so P is the static grid size."""
    flat = slots.reshape(-1).to(torch.int64)
    p = flat.numel()
    dev = flat.device
    if slots.shape[0] == 1:  # one token: its k choices are k blocks already (a token picks an expert once)
        const = _ONE_TOKEN.get((p, block_m, dev))
        if const is None:
            rows = torch.full((p, block_m), -1, dtype=torch.int64, device=dev)
            rows[:, 0] = torch.arange(p, device=dev)
            const = _ONE_TOKEN[(p, block_m, dev)] = (torch.arange(p, device=dev), rows)
        return const[0], const[1], torch.where(flat == -1, SKIP, flat)
    key = torch.where(flat == -1, torch.full_like(flat, SKIP), flat)
    sorted_key, order = torch.sort(key, stable=True)
    pos = torch.arange(p, device=dev)
    new_group = torch.ones(p, dtype=torch.bool, device=dev)
    new_group[1:] = sorted_key[1:] != sorted_key[:-1]
    group_start = torch.cummax(torch.where(new_group, pos, torch.zeros_like(pos)), 0).values
    in_group = pos - group_start
    block_id = torch.cumsum(((in_group % block_m) == 0).to(torch.int64), 0) - 1
    block_rows = torch.full((p, block_m), -1, dtype=torch.int64, device=dev)
    block_rows[block_id, in_group % block_m] = pos
    block_code = torch.full((p,), SKIP, dtype=torch.int64, device=dev)
    block_code[block_id] = sorted_key  # every pair of a block has the same code
    return order, block_rows, block_code


if triton is not None:

    @triton.jit
    def _weights_offset(code, slot_stride, host_off_ptr):
        """Element offset, from the pool's base, of the expert a block code names: a VRAM slot, or (zero-copy,
        through unified addressing) a pinned host row."""
        hrow = tl.maximum(-code - 2, 0)
        hoff = tl.load(host_off_ptr + hrow)
        return tl.where(code >= 0, code * slot_stride, hoff)

    @triton.jit
    def _block_pairs(rows_ptr, order_ptr, b, BLOCK_M: tl.constexpr):
        """Block b's sorted positions (-1 = empty), their mask, the positions clamped to 0, and their pair ids."""
        rows = tl.load(rows_ptr + b * BLOCK_M + tl.arange(0, BLOCK_M))
        valid = rows >= 0
        safe = tl.where(valid, rows, 0)
        pair = tl.load(order_ptr + safe, mask=valid, other=0)
        return rows, valid, safe, pair

    @triton.jit
    def _dot(a, w, IEEE: tl.constexpr):
        """a @ w accumulated in fp32; IEEE: full fp32 products (fp32 weights), not TF32."""
        if IEEE:
            out = tl.dot(a, w, input_precision="ieee")
        else:
            out = tl.dot(a, w)
        return out

    @triton.jit
    def _gate_up_kernel(x_ptr, w_ptr, host_off_ptr, h_ptr, order_ptr, rows_ptr, code_ptr,
                        stride_xn, slot_stride, stride_hp,
                        k: tl.constexpr, H: tl.constexpr, I: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
        b = tl.program_id(0)
        j = tl.program_id(1)
        code = tl.load(code_ptr + b)
        if code == 4611686018427387904:  # SKIP
            return
        rows, valid, safe, pair = _block_pairs(rows_ptr, order_ptr, b, BLOCK_M)
        tok = pair // k
        rn = j * BLOCK_N + tl.arange(0, BLOCK_N)
        nmask = rn < I
        rk = tl.arange(0, BLOCK_K)
        wbase = w_ptr + _weights_offset(code, slot_stride, host_off_ptr)  # [gate (I*H) | up (I*H) | down (H*I)]
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, H, BLOCK_K):
            kk = k0 + rk
            kmask = kk < H
            xt = tl.load(x_ptr + tok[:, None] * stride_xn + kk[None, :], mask=valid[:, None] & kmask[None, :],
                         other=0.0)
            wg = tl.load(wbase + rn[None, :] * H + kk[:, None], mask=nmask[None, :] & kmask[:, None],
                         other=0.0)  # [BLOCK_K, BLOCK_N]
            wu = tl.load(wbase + (rn[None, :] + I) * H + kk[:, None], mask=nmask[None, :] & kmask[:, None],
                         other=0.0)
            xt = xt.to(wg.dtype)
            acc_g += _dot(xt, wg, IEEE)
            acc_u += _dot(xt, wu, IEEE)
        h = acc_g / (1.0 + tl.exp(-acc_g)) * acc_u  # SiLU(g) * u, fp32
        tl.store(h_ptr + rows[:, None] * stride_hp + rn[None, :], h, mask=valid[:, None] & nmask[None, :])

    @triton.jit
    def _down_kernel(h_ptr, w_ptr, host_off_ptr, y_ptr, wt_ptr, order_ptr, rows_ptr, code_ptr,
                     stride_hp, slot_stride, stride_yp,
                     H: tl.constexpr, I: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr, IEEE: tl.constexpr):
        b = tl.program_id(0)
        j = tl.program_id(1)
        code = tl.load(code_ptr + b)
        if code == 4611686018427387904:  # SKIP
            return
        rows, valid, safe, pair = _block_pairs(rows_ptr, order_ptr, b, BLOCK_M)
        rn = j * BLOCK_N + tl.arange(0, BLOCK_N)  # output (hidden) rows
        nmask = rn < H
        rk = tl.arange(0, BLOCK_K)
        wbase = w_ptr + _weights_offset(code, slot_stride, host_off_ptr) + 2 * I * H
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, I, BLOCK_K):
            kk = k0 + rk
            kmask = kk < I
            ht = tl.load(h_ptr + safe[:, None] * stride_hp + kk[None, :], mask=valid[:, None] & kmask[None, :],
                         other=0.0)
            wd = tl.load(wbase + rn[None, :] * I + kk[:, None], mask=nmask[None, :] & kmask[:, None],
                         other=0.0)  # [BLOCK_K, BLOCK_N]
            ht = ht.to(wd.dtype)
            acc += _dot(ht, wd, IEEE)
        wt = tl.load(wt_ptr + pair, mask=valid, other=0.0)
        acc = acc * wt[:, None]
        tl.store(y_ptr + pair[:, None] * stride_yp + rn[None, :], acc, mask=valid[:, None] & nmask[None, :])


#: (BLOCK_N, BLOCK_K, num_warps, num_stages) per kernel; small N tiles give enough programs to keep every SM
#: reading at batch 1 (benchmarks/gpu_kernels.py compares tiles on the GPU at hand)
GATE_UP_TILE = (32, 128, 4, 3)
DOWN_TILE = (32, 128, 4, 3)


def _fused_triton(x, buffer, hidden, inter, slots, weights, host_offsets):
    n, h = x.shape
    k = slots.shape[1]
    p = n * k
    assert h == hidden and buffer.stride(1) == 1
    order, rows, code = plan_blocks(slots)
    ieee = buffer.dtype == torch.float32
    if host_offsets is None:
        host_offsets = torch.zeros(1, dtype=torch.int64, device=x.device)
    hbuf = torch.empty((p, inter), dtype=torch.float32, device=x.device)  # indexed by sorted position
    y = torch.zeros((p, h), dtype=torch.float32, device=x.device)  # indexed by pair; skipped pairs stay 0
    wts = weights.reshape(-1).to(torch.float32).contiguous()
    xc = x.contiguous()
    bn, bk, warps, stages = GATE_UP_TILE
    _gate_up_kernel[(p, triton.cdiv(inter, bn))](
        xc, buffer, host_offsets, hbuf, order, rows, code,
        xc.stride(0), buffer.stride(0), hbuf.stride(0),
        k=k, H=h, I=inter, BLOCK_M=BLOCK_M, BLOCK_N=bn, BLOCK_K=bk, IEEE=ieee, num_warps=warps, num_stages=stages)
    bn, bk, warps, stages = DOWN_TILE
    _down_kernel[(p, triton.cdiv(h, bn))](
        hbuf, buffer, host_offsets, y, wts, order, rows, code,
        hbuf.stride(0), buffer.stride(0), y.stride(0),
        H=h, I=inter, BLOCK_M=BLOCK_M, BLOCK_N=bn, BLOCK_K=bk, IEEE=ieee, num_warps=warps, num_stages=stages)
    return y.view(n, k, h).sum(1).to(x.dtype)


def _fused_torch(x, buffer, hidden, inter, slots, weights):
    """Reference: gather the selected slots (a copy) and run batched matmuls. Same function, any device; host
    rows (codes <= -2) are not reachable here and count as skipped."""
    n, h = x.shape
    k = slots.shape[1]
    s = buffer.shape[0]
    gate_up = buffer[:, : 2 * inter * hidden].view(s, 2 * inter, hidden)
    down = buffer[:, 2 * inter * hidden:].view(s, hidden, inter)
    valid = slots >= 0
    idx = torch.where(valid, slots, torch.zeros_like(slots)).reshape(-1).to(torch.int64)
    wt = torch.where(valid, weights.to(torch.float32), torch.zeros_like(weights, dtype=torch.float32)).reshape(-1)
    gu = gate_up.index_select(0, idx)  # [P, 2I, H]
    dn = down.index_select(0, idx)  # [P, H, I]
    xs = x.repeat_interleave(k, 0).to(gu.dtype)  # [P, H]
    hv = torch.bmm(gu, xs.unsqueeze(-1)).squeeze(-1).float()  # [P, 2I]
    g, u = hv.chunk(2, dim=-1)
    act = (F.silu(g) * u).to(dn.dtype)
    y = torch.bmm(dn, act.unsqueeze(-1)).squeeze(-1).float() * wt[:, None]  # [P, H]
    return y.view(n, k, h).sum(1).to(x.dtype)


def fused_experts(x: torch.Tensor, buffer: torch.Tensor, hidden: int, inter: int, slots: torch.Tensor,
                  weights: torch.Tensor, backend: str = "auto", host_offsets: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """x [N, H]; buffer [S, 3*I*H] the slot pool (each row [gate | up | down], row-major); slots [N, k] codes;
    weights [N, k]; host_offsets [R] int64: element offset of host row r from buffer's first element (pinned
    memory, read by the kernels through unified addressing; Triton only) -> [N, H]."""
    if backend == "auto":
        backend = "triton" if triton is not None and (x.is_cuda or _interpreting()) else "torch"
    if backend == "triton":
        if triton is None:
            raise RuntimeError("expert_kernel: 'triton' asked for, but Triton is not installed; use 'torch'")
        return _fused_triton(x, buffer, hidden, inter, slots, weights, host_offsets)
    return _fused_torch(x, buffer, hidden, inter, slots, weights)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"
