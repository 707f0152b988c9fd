"""The row kernels behind ``gated_residual``, ``modulated_layer_norm`` and ``gated_residual_modulated_layer_norm``.

One forward and one backward kernel, parametrised by ``tl.constexpr`` flags (the shape of flash-attention's
``ops/triton/layer_norm.py``): ``HAS_RESIDUAL`` adds the gated branch (``r = x + gate * y``), ``HAS_NORM`` applies the
modulated LayerNorm (to ``x``, or to ``r`` when both are set), ``HAS_DR`` adds an incoming gradient of ``r`` in the
backward. Each op's file holds the other layers: its launchers (which call :func:`row_forward` /
:func:`row_backward` here with its flags), its ``torch.library.triton_op`` registration with autograd, and the public
function beside its plain-PyTorch ``_ref``.

Precision: every input may have its own float dtype (fp32/fp16/bf16): the residual stream ``x`` fp32 under autocast
while gate/y/shift/scale are bf16, or all in one dtype. Loads convert to fp32, all math is fp32, each output is
rounded once on store: ``r`` in x's dtype, the normalised output in shift/scale's dtype, each gradient in its input's
dtype; row statistics and the backward's partial sums are fp32.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from ._common import last_dim_contiguous, next_power_of_2, prev_power_of_2, tl, triton_kernel

# ----------------------------------------------------------------------------------------------- launch heuristics

# Widest row the row kernels keep in registers (fp32 working copies of a few rows of this width).
MAX_FUSED_DIM = 16384
# The forward row kernels shrink their row tiles until they launch at least this many programs (when there are that
# many tiles to cut): about two per SM of a 132-SM GPU, so small batches still fill the device.
FWD_MIN_PROGRAMS = 256
# Backward programs aimed at where no SM count is known (CPU, the interpreter, compile_check): a fixed number, so the
# partition depends on the shapes alone. Each program writes one fp32 partial row per reduced parameter.
BWD_TARGET_PROGRAMS = 1024
# On a GPU the backward grid is a whole multiple of the SM count, about this many programs per SM (see
# backward_partition): 8 is a multiple of every power-of-two residency (1, 2, 4 or 8 programs per SM), so the grid is
# whole waves, and few enough partial rows that writing and summing them stays small beside the activations.
BWD_PROGRAMS_PER_SM = 8
# Columns each backward thread holds of each row it carries across its token loop (up to five fp32 rows: gate,
# 1 + scale and the three partial sums). At DiT-XL's D = 1152 four warps meant 9 columns a row, 45 registers of
# loop-carried state, and up to 128 registers per thread in all (16 warps resident per SM of 64); 4 columns a row
# asks for 8 warps there.
BWD_COLS_PER_THREAD = 4


@dataclass(frozen=True)
class RowConfig:
    """Launch configuration of the row kernels for rows of one width.

    A row of D elements is two register tiles: a head of ``block_d`` = the largest power of two <= D columns (never
    masked) and a tail of ``block_tail`` = next_power_of_2(D - block_d) columns (masked; 0 when D is a power of two),
    so DiT's widths are covered with no idle lanes (384 = 256 + 128, 768 = 512 + 256, 1152 = 1024 + 128) and the
    row still stays in registers between the statistics and the normalisation. ``block_m`` rows (tokens of one
    batch element) are processed together, ``num_warps`` warps per program.
    """

    block_m: int
    block_d: int
    block_tail: int
    num_warps: int

    @property
    def meta(self) -> dict[str, int]:
        """The kernels' launch keywords."""
        return {"BLOCK_M": self.block_m, "BLOCK_D": self.block_d, "BLOCK_TAIL": self.block_tail,
                "num_warps": self.num_warps}


def row_config(dim: int, tokens: int, programs: Callable[[int], int] | None = None,
               backward: bool = False) -> RowConfig:
    """Row-kernel launch configuration for rows of ``dim`` elements, ``tokens`` rows per batch element.

    The forward aims at ~4096 elements per tile (16 per thread), the backward at ~2048 (8 per thread) and, for the
    rows it carries across its loop, at most ``BWD_COLS_PER_THREAD`` columns per thread; at most 16 rows a tile,
    never more than a batch element has, at most 8 warps. ``programs(block_m)``, when given, is the program count a
    tile height gives: tiles shrink until at least ``FWD_MIN_PROGRAMS`` programs run (or one row per tile).
    """
    block_d = prev_power_of_2(dim)
    block_tail = next_power_of_2(dim - block_d) if dim > block_d else 0
    width = block_d + block_tail
    target, per_thread = (2048, 8) if backward else (4096, 16)
    block_m = min(prev_power_of_2(max(target // width, 1)), 16, next_power_of_2(tokens))
    while programs is not None and block_m > 1 and programs(block_m) < FWD_MIN_PROGRAMS:
        block_m //= 2
    num_warps = prev_power_of_2(max(block_m * width // (32 * per_thread), 1))
    if backward:
        num_warps = max(num_warps, next_power_of_2(-(-width // (32 * BWD_COLS_PER_THREAD))))
    return RowConfig(block_m, block_d, block_tail, min(num_warps, 8))


def bwd_rows_per_program(batch: int, tokens: int) -> int:
    """Tokens each backward program walks where no SM count is known, so that about ``BWD_TARGET_PROGRAMS`` run.

    More rows per program means fewer fp32 partial sums to write and reduce, fewer means more parallelism.
    """
    rows = next_power_of_2(-(-batch * tokens // BWD_TARGET_PROGRAMS))
    return max(1, min(rows, 128, next_power_of_2(tokens)))


def check_row_dim(dim: int) -> None:
    """ValueError for rows wider than the row kernels hold in registers."""
    if dim > MAX_FUSED_DIM:
        raise ValueError(f"hidden size {dim} exceeds the fused kernels' limit of {MAX_FUSED_DIM}; "
                         "use the <op>_ref functions")


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def device_sm_count(device: torch.device) -> int | None:
    """Streaming multiprocessors of ``device`` when it is a visible CUDA GPU, else None (cached per device)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    return _cuda_sm_count(torch.cuda.current_device() if device.index is None else device.index)


def forward_config(B: int, T: int, D: int) -> RowConfig:
    """The forward's launch configuration for (B, T, D) inputs (tiles shrink until enough programs run)."""
    return row_config(D, T, programs=lambda block_m: B * -(-T // block_m))


def backward_partition(B: int, T: int, D: int, sm_count: int | None = None) -> tuple[RowConfig, int]:
    """The backward's ``(config, token blocks per batch element)`` for (B, T, D) inputs; ``B * blocks`` programs.

    Program ``j`` of batch element ``b`` walks tokens ``[j * T // blocks, (j + 1) * T // blocks)`` (block sizes differ
    by at most one). With ``sm_count`` (a GPU's SMs) the grid is a whole multiple of it, near ``BWD_PROGRAMS_PER_SM``
    per SM: blocks is a multiple of ``sm_count / gcd(B, sm_count)``, so every wave of the grid is full. Without (or
    when T is too short for such a multiple), a power-of-two partition aiming at ``BWD_TARGET_PROGRAMS`` programs.
    The partition fixes the order of the fp32 partial sums: gradients are bitwise reproducible for given shapes and
    SM count (so on one GPU model), and may differ in the last bits between GPUs with different SM counts.
    """
    config = row_config(D, T, backward=True)
    if sm_count is not None:
        unit = sm_count // math.gcd(B, sm_count)  # fewest blocks per batch element making B * blocks whole waves
        if unit <= T:
            multiple = max(1, round(BWD_PROGRAMS_PER_SM * sm_count / (B * unit)))
            return config, unit * min(multiple, T // unit)
    rows = max(bwd_rows_per_program(B, T), config.block_m)
    return config, -(-T // rows)


# Forward: one program per (batch element b, tile of BLOCK_M tokens of b); every row held in registers as two tiles:
#   head: columns [0, BLOCK_D), BLOCK_D = the largest power of two <= D (never masked),
#   tail: columns [BLOCK_D, BLOCK_D + BLOCK_TAIL), BLOCK_TAIL = next_power_of_2(D - BLOCK_D) (masked; 0: none).
# Why two tiles and not one BLOCK = next_power_of_2(D) (the usual single-block LayerNorm): DiT's D = 1152 would pad to
# 2048 lanes, 44% of every load, FMA and register idle; head + tail covers 1152 as 1024 + 128, 384 as 256 + 128 and
# 768 as 512 + 256 exactly, and the row still stays in registers between the statistics and the normalisation (a
# chunked loop over D would re-read the row from cache). Several rows per program (BLOCK_M, ~4096 elements a tile,
# 16 per thread) give each thread independent loads in flight instead of one short row per program.
# Math (fp32):
#   HAS_RESIDUAL: r = x + gate[b] * y, rounded to r's dtype and stored; the norm then reads that rounded r (what the
#                 unfused sequence normalises, and what the backward recomputes r-hat from). Else r = x.
#   HAS_NORM:     mean = sum(r) / D, var = sum((r - mean)^2) / D (two-pass, from registers), rstd = 1 / sqrt(var + eps),
#                 out = (r - mean) * rstd * (1 + scale[b]) + shift[b]; mean, rstd stored (fp32) for the backward.
# Limits: D <= MAX_FUSED_DIM; gate/shift/scale take any strides (adaLN chunks are (B, D) views with stride (6D, 1));
# x's and y's last dims are unit stride; r and out are contiguous; offsets are 64-bit.


@triton_kernel
def _row_fwd_kernel(
    x_ptr, gate_ptr, y_ptr, shift_ptr, scale_ptr, r_ptr, out_ptr, mean_ptr, rstd_ptr,
    T, D, n_tblocks,
    stride_xb, stride_xt,
    stride_yb, stride_yt,
    stride_gate_b, stride_gate_d,
    stride_shift_b, stride_shift_d,
    stride_scale_b, stride_scale_d,
    eps,
    HAS_RESIDUAL: tl.constexpr, HAS_NORM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_TAIL: tl.constexpr,
):
    pid = tl.program_id(0)  # b * n_tblocks + token tile
    b = pid // n_tblocks
    t = (pid % n_tblocks) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = (t < T)[:, None]  # (BLOCK_M, 1)
    b64 = b.to(tl.int64)
    t64 = t[:, None].to(tl.int64)
    row = b64 * T + t64  # (BLOCK_M, 1) row index of the contiguous outputs and statistics
    cols = tl.arange(0, BLOCK_D)[None, :]
    x_rows = x_ptr + b64 * stride_xb + t64 * stride_xt
    r = tl.load(x_rows + cols, mask=rmask, other=0.0).to(tl.float32)
    if BLOCK_TAIL > 0:
        tcols = BLOCK_D + tl.arange(0, BLOCK_TAIL)[None, :]
        cmask = tcols < D
        tmask = rmask & cmask
        r_tail = tl.load(x_rows + tcols, mask=tmask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        y_rows = y_ptr + b64 * stride_yb + t64 * stride_yt
        gate_row = gate_ptr + b64 * stride_gate_b
        gate = tl.load(gate_row + cols * stride_gate_d).to(tl.float32)
        r = (r + gate * tl.load(y_rows + cols, mask=rmask, other=0.0).to(tl.float32)).to(r_ptr.dtype.element_ty)
        tl.store(r_ptr + row * D + cols, r, mask=rmask)
        r = r.to(tl.float32)
        if BLOCK_TAIL > 0:
            gate_tail = tl.load(gate_row + tcols * stride_gate_d, mask=cmask, other=0.0).to(tl.float32)
            y_tail = tl.load(y_rows + tcols, mask=tmask, other=0.0).to(tl.float32)
            r_tail = (r_tail + gate_tail * y_tail).to(r_ptr.dtype.element_ty)
            tl.store(r_ptr + row * D + tcols, r_tail, mask=tmask)
            r_tail = r_tail.to(tl.float32)
    if HAS_NORM:
        total = tl.sum(r, axis=1)
        if BLOCK_TAIL > 0:
            total += tl.sum(r_tail, axis=1)
        mean = (total / D)[:, None]
        rc = r - mean
        sq = tl.sum(rc * rc, axis=1)
        if BLOCK_TAIL > 0:
            rc_tail = tl.where(tmask, r_tail - mean, 0.0)
            sq += tl.sum(rc_tail * rc_tail, axis=1)
        rstd = (1.0 / tl.sqrt(sq / D + eps))[:, None]
        shift_row = shift_ptr + b64 * stride_shift_b
        scale_row = scale_ptr + b64 * stride_scale_b
        shift = tl.load(shift_row + cols * stride_shift_d).to(tl.float32)
        scale = tl.load(scale_row + cols * stride_scale_d).to(tl.float32)
        out = rc * rstd * (1.0 + scale) + shift
        tl.store(out_ptr + row * D + cols, out.to(out_ptr.dtype.element_ty), mask=rmask)
        if BLOCK_TAIL > 0:
            shift_tail = tl.load(shift_row + tcols * stride_shift_d, mask=cmask, other=0.0).to(tl.float32)
            scale_tail = tl.load(scale_row + tcols * stride_scale_d, mask=cmask, other=0.0).to(tl.float32)
            out_tail = rc_tail * rstd * (1.0 + scale_tail) + shift_tail
            tl.store(out_ptr + row * D + tcols, out_tail.to(out_ptr.dtype.element_ty), mask=tmask)
        tl.store(mean_ptr + row, mean, mask=rmask)
        tl.store(rstd_ptr + row, rstd, mask=rmask)


# Backward: one program per (batch element b, block of ~T / n_blocks tokens of b), walking its rows BLOCK_M at a time
# (the same head/tail tiles as the forward). z is the normalised input (x, or the forward's rounded r),
# zhat = (z - mean) * rstd, g = dout * (1 + scale[b]):
#   HAS_NORM:     d = rstd * (g - mean_D(g) - zhat * mean_D(g * zhat)) (+ dr if HAS_DR), stored as dz;
#                 dshift[b] = sum_t dout,  dscale[b] = sum_t dout * zhat
#   else:         d = dr (the gated residual alone: its dx is dr itself, nothing stored)
#   HAS_RESIDUAL: dy = gate[b] * d (stored),  dgate[b] = sum_t d * y
# The token sums are fp32 partial rows, one per program ((B, n_blocks, D) buffers), summed over blocks by the
# launcher: no atomics, a partition fixed by the shapes and the SM count (backward_partition), so gradients are bitwise
# deterministic. Tiles are ~2048 elements (8 per thread) and the fp32 partial-sum rows and gate/scale rows, live across
# the loop, at most BWD_COLS_PER_THREAD columns per thread (8 warps at D = 1152).


@triton_kernel
def _row_bwd_kernel(
    dr_ptr, dout_ptr, z_ptr, y_ptr, gate_ptr, scale_ptr, mean_ptr, rstd_ptr,
    dz_ptr, dy_ptr, dgate_part_ptr, dshift_part_ptr, dscale_part_ptr,
    T, D, n_blocks,
    stride_drb, stride_drt,
    stride_dob, stride_dot,
    stride_zb, stride_zt,
    stride_yb, stride_yt,
    stride_gate_b, stride_gate_d,
    stride_scale_b, stride_scale_d,
    HAS_DR: tl.constexpr, HAS_NORM: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_TAIL: tl.constexpr,
):
    pid = tl.program_id(0)  # b * n_blocks + token block
    b = pid // n_blocks
    b64 = b.to(tl.int64)
    block = pid % n_blocks
    t_start = block * T // n_blocks
    t_end = (block + 1) * T // n_blocks
    offs = tl.arange(0, BLOCK_D)
    cols = offs[None, :]
    if BLOCK_TAIL > 0:
        toffs = BLOCK_D + tl.arange(0, BLOCK_TAIL)
        tcols = toffs[None, :]
        cmask = tcols < D
    if HAS_RESIDUAL:
        gate_row = gate_ptr + b64 * stride_gate_b
        gate = tl.load(gate_row + cols * stride_gate_d).to(tl.float32)
        acc_gate = tl.zeros([BLOCK_D], dtype=tl.float32)
        if BLOCK_TAIL > 0:
            gate_tail = tl.load(gate_row + tcols * stride_gate_d, mask=cmask, other=0.0).to(tl.float32)
            acc_gate_tail = tl.zeros([BLOCK_TAIL], dtype=tl.float32)
    if HAS_NORM:
        scale_row = scale_ptr + b64 * stride_scale_b
        scale1 = 1.0 + tl.load(scale_row + cols * stride_scale_d).to(tl.float32)
        acc_shift = tl.zeros([BLOCK_D], dtype=tl.float32)
        acc_scale = tl.zeros([BLOCK_D], dtype=tl.float32)
        if BLOCK_TAIL > 0:
            scale1_tail = 1.0 + tl.load(scale_row + tcols * stride_scale_d, mask=cmask, other=0.0).to(tl.float32)
            acc_shift_tail = tl.zeros([BLOCK_TAIL], dtype=tl.float32)
            acc_scale_tail = tl.zeros([BLOCK_TAIL], dtype=tl.float32)
    for t0 in range(t_start, t_end, BLOCK_M):
        t = t0 + tl.arange(0, BLOCK_M)
        rmask = (t < t_end)[:, None]  # (BLOCK_M, 1)
        t64 = t[:, None].to(tl.int64)
        row = b64 * T + t64  # (BLOCK_M, 1) row index of the contiguous outputs and statistics
        if BLOCK_TAIL > 0:
            tmask = rmask & cmask
        dr_rows = dr_ptr + b64 * stride_drb + t64 * stride_drt
        if HAS_NORM:
            z_rows = z_ptr + b64 * stride_zb + t64 * stride_zt
            dout_rows = dout_ptr + b64 * stride_dob + t64 * stride_dot
            mean = tl.load(mean_ptr + row, mask=rmask, other=0.0)
            rstd = tl.load(rstd_ptr + row, mask=rmask, other=0.0)  # 0 on padding rows: their d is 0
            zhat = (tl.load(z_rows + cols, mask=rmask, other=0.0).to(tl.float32) - mean) * rstd
            dout = tl.load(dout_rows + cols, mask=rmask, other=0.0).to(tl.float32)
            acc_shift += tl.sum(dout, axis=0)
            acc_scale += tl.sum(dout * zhat, axis=0)
            g = dout * scale1
            c_zhat = tl.sum(g * zhat, axis=1)
            c_mean = tl.sum(g, axis=1)
            if BLOCK_TAIL > 0:
                z_tail = tl.load(z_rows + tcols, mask=tmask, other=0.0).to(tl.float32)
                zhat_tail = tl.where(tmask, (z_tail - mean) * rstd, 0.0)
                dout_tail = tl.load(dout_rows + tcols, mask=tmask, other=0.0).to(tl.float32)
                acc_shift_tail += tl.sum(dout_tail, axis=0)
                acc_scale_tail += tl.sum(dout_tail * zhat_tail, axis=0)
                g_tail = dout_tail * scale1_tail
                c_zhat += tl.sum(g_tail * zhat_tail, axis=1)
                c_mean += tl.sum(g_tail, axis=1)
            c_zhat = (c_zhat / D)[:, None]
            c_mean = (c_mean / D)[:, None]
            d = (g - zhat * c_zhat - c_mean) * rstd
            if HAS_DR:
                d += tl.load(dr_rows + cols, mask=rmask, other=0.0).to(tl.float32)
            tl.store(dz_ptr + row * D + cols, d.to(dz_ptr.dtype.element_ty), mask=rmask)
            if BLOCK_TAIL > 0:
                d_tail = (g_tail - zhat_tail * c_zhat - c_mean) * rstd
                if HAS_DR:
                    d_tail += tl.load(dr_rows + tcols, mask=tmask, other=0.0).to(tl.float32)
                tl.store(dz_ptr + row * D + tcols, d_tail.to(dz_ptr.dtype.element_ty), mask=tmask)
        else:
            d = tl.load(dr_rows + cols, mask=rmask, other=0.0).to(tl.float32)
            if BLOCK_TAIL > 0:
                d_tail = tl.load(dr_rows + tcols, mask=tmask, other=0.0).to(tl.float32)
        if HAS_RESIDUAL:
            y_rows = y_ptr + b64 * stride_yb + t64 * stride_yt
            acc_gate += tl.sum(d * tl.load(y_rows + cols, mask=rmask, other=0.0).to(tl.float32), axis=0)
            tl.store(dy_ptr + row * D + cols, (gate * d).to(dy_ptr.dtype.element_ty), mask=rmask)
            if BLOCK_TAIL > 0:
                y_tail = tl.load(y_rows + tcols, mask=tmask, other=0.0).to(tl.float32)
                acc_gate_tail += tl.sum(d_tail * y_tail, axis=0)
                tl.store(dy_ptr + row * D + tcols, (gate_tail * d_tail).to(dy_ptr.dtype.element_ty), mask=tmask)
    part = pid.to(tl.int64) * D
    if HAS_RESIDUAL:
        tl.store(dgate_part_ptr + part + offs, acc_gate)
        if BLOCK_TAIL > 0:
            tl.store(dgate_part_ptr + part + toffs, acc_gate_tail, mask=toffs < D)
    if HAS_NORM:
        tl.store(dshift_part_ptr + part + offs, acc_shift)
        tl.store(dscale_part_ptr + part + offs, acc_scale)
        if BLOCK_TAIL > 0:
            tl.store(dshift_part_ptr + part + toffs, acc_shift_tail, mask=toffs < D)
            tl.store(dscale_part_ptr + part + toffs, acc_scale_tail, mask=toffs < D)


def _strides(t: torch.Tensor | None, dims: tuple[int, int] = (0, 1)) -> tuple[int, int]:
    return (0, 0) if t is None else (t.stride(dims[0]), t.stride(dims[1]))


def row_forward(
    x: torch.Tensor, gate: torch.Tensor | None, y: torch.Tensor | None, shift: torch.Tensor | None,
    scale: torch.Tensor | None, eps: float,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Launch the forward row kernel: ``(r, out, mean, rstd)``, None for what the flags leave out.

    x (B, T, D) (checked by the caller); ``gate`` (B, D) and ``y`` (B, T, D) for the gated residual (r, x's dtype),
    ``shift``/``scale`` (B, D) for the modulated LayerNorm (out in their dtype, fp32 (B, T) mean/rstd).
    """
    has_residual, has_norm = gate is not None, shift is not None
    x = last_dim_contiguous(x)
    y = last_dim_contiguous(y) if has_residual else None
    B, T, D = x.shape
    check_row_dim(D)
    r = torch.empty((B, T, D), dtype=x.dtype, device=x.device) if has_residual else None
    out = mean = rstd = None
    if has_norm:
        out = torch.empty((B, T, D), dtype=shift.dtype, device=x.device)
        mean = torch.empty((B, T), dtype=torch.float32, device=x.device)
        rstd = torch.empty((B, T), dtype=torch.float32, device=x.device)
    if B * T > 0:
        config = forward_config(B, T, D)
        n_tblocks = -(-T // config.block_m)
        _row_fwd_kernel[(B * n_tblocks,)](
            x, x if gate is None else gate, x if y is None else y, x if shift is None else shift,
            x if scale is None else scale, x if r is None else r, x if out is None else out,
            x if mean is None else mean, x if rstd is None else rstd,
            T, D, n_tblocks,
            *_strides(x), *_strides(y), *_strides(gate), *_strides(shift), *_strides(scale),
            eps,
            HAS_RESIDUAL=has_residual, HAS_NORM=has_norm, **config.meta,
        )
    return r, out, mean, rstd


def row_backward(
    grad_r: torch.Tensor | None, grad_out: torch.Tensor | None, z: torch.Tensor | None, y: torch.Tensor | None,
    gate: torch.Tensor | None, scale: torch.Tensor | None, mean: torch.Tensor | None, rstd: torch.Tensor | None,
    shape: tuple[int, int, int],
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
    """Launch the backward row kernel: ``(dz, dy, dgate, dshift, dscale)``, None for what the flags leave out.

    ``shape`` = (B, T, D). With ``grad_out`` (the norm's output grad): z the normalised input, scale, mean, rstd give
    dz (z's dtype) and dshift/dscale (scale's dtype), plus ``grad_r`` when given. With ``y``/``gate``: dy (y's dtype)
    and dgate (gate's dtype) of the gated residual, from ``grad_r`` alone when there is no norm.
    """
    has_norm, has_residual, has_dr = grad_out is not None, y is not None, grad_r is not None
    B, T, D = shape
    device = (grad_out if has_norm else grad_r).device
    grad_r = last_dim_contiguous(grad_r) if has_dr else None
    grad_out = last_dim_contiguous(grad_out) if has_norm else None
    z = last_dim_contiguous(z) if has_norm else None
    y = last_dim_contiguous(y) if has_residual else None
    dz = torch.empty((B, T, D), dtype=z.dtype, device=device) if has_norm else None
    dy = torch.empty((B, T, D), dtype=y.dtype, device=device) if has_residual else None
    config, n_blocks = backward_partition(B, T, D, device_sm_count(device))

    def partials(flag: bool) -> torch.Tensor | None:
        return torch.empty((B, n_blocks, D), dtype=torch.float32, device=device) if flag else None

    dgate_part, dshift_part, dscale_part = partials(has_residual), partials(has_norm), partials(has_norm)
    if B * T > 0:
        any_ptr = grad_out if has_norm else grad_r  # stands in for the pointers a flag leaves unused
        _row_bwd_kernel[(B * n_blocks,)](
            *(any_ptr if t is None else t for t in (grad_r, grad_out, z, y, gate, scale, mean, rstd, dz, dy,
                                                     dgate_part, dshift_part, dscale_part)),
            T, D, n_blocks,
            *_strides(grad_r), *_strides(grad_out), *_strides(z), *_strides(y), *_strides(gate), *_strides(scale),
            HAS_DR=has_dr, HAS_NORM=has_norm, HAS_RESIDUAL=has_residual, **config.meta,
        )

    def reduce(part: torch.Tensor | None, like: torch.Tensor | None) -> torch.Tensor | None:
        return None if part is None else part.sum(dim=1).to(like.dtype)

    return dz, dy, reduce(dgate_part, gate), reduce(dshift_part, scale), reduce(dscale_part, scale)

# The shapes compile_check specialises the row kernels for: DiT-XL/2 at 256 px (256 tokens), a per-GPU training batch
# of 32 (the official global batch 256 on 8 GPUs).
COMPILE_BATCH, COMPILE_TOKENS = 32, 256


def compile_inputs(x_dtype: torch.dtype, mod_dtype: torch.dtype, dim: int) -> dict[str, torch.Tensor]:
    """Example CPU tensors (uninitialised) laid out as DiT passes them, for capturing the launchers' launches.

    ``x``/``grad_r`` (B, T, D) in ``x_dtype`` (the residual stream); ``y``/``grad_out`` (B, T, D) and the (B, D)
    ``gate``/``shift``/``scale`` chunks of one (B, 6D) adaLN output (stride (6D, 1)) in ``mod_dtype``; fp32 (B, T)
    ``mean``/``rstd``.
    """
    B, T = COMPILE_BATCH, COMPILE_TOKENS
    stream = {name: torch.empty((B, T, dim), dtype=x_dtype) for name in ("x", "grad_r")}
    branch = {name: torch.empty((B, T, dim), dtype=mod_dtype) for name in ("y", "grad_out")}
    shift, scale, gate = torch.empty((B, 6 * dim), dtype=mod_dtype).chunk(6, dim=1)[:3]
    stats = {name: torch.empty((B, T), dtype=torch.float32) for name in ("mean", "rstd")}
    return {**stream, **branch, "gate": gate, "shift": shift, "scale": scale, **stats}
