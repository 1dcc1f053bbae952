"""Causal 3x3x3 convolution of channels-last video as one implicit GEMM: the Wan VAE's residual-block convs.

cuDNN runs such a conv fastest as three 2D convolutions, one per time tap, whose outputs then have to be added: at
the decoder's full resolution each tap output is a frame-sized write and read. Here one program owns a tile of output
positions x output channels and accumulates all kt * kh * kw taps x C input channels (K = 27 C) in fp32 registers,
then adds the bias (and optionally a residual) and writes the result once.

Zero-padded frames make every tap a plain shift. The input frames are stored with a ring of zeros (H + 2, W + 2 for
a 3x3 kernel) that the conv's padding reads, and the output is computed at every position of the padded frame, in
row-major order: then the input rows that tap (dh, dw) needs for BLOCK_M consecutive positions are BLOCK_M
consecutive rows of the (positions, C) matrix, shifted by dh * (W + 2) + dw. So each K block is one TMA tile load
(`TensorDescriptor`; rows before the first or after the last frame come back as zeros) feeding the tensor cores,
with no per-element address or mask arithmetic; the ring positions' outputs are computed and dropped (0.7% extra
work at 480x832). Time is causal and comes as kt windows, one per time tap: tap k of output frame t reads frame t of
``windows[k]`` (a [kept frames + chunk] buffer shifted by k, or kt separate frames for a one-frame chunk), so the
caller decides where the past comes from; `causal_conv3d` takes a video's kept frames and its next chunk apart and
reads each where it lies (only the chunk's first two output frames read kept frames: a launch of their own). The
weight is read as a (kt, kh, kw, C, CO) matrix (`tap_major`, a copy kept per weight; reading a channels-last weight
in place through transposed tiles measured 2.4-3.2% slower on the large convs).

Output channels that are not a power of two (the decoder's 96, 192, 384) are covered by two accumulators of power-
of-two widths (64 + 32, 128 + 64) sharing every input tile, so no MMA work is spent on padding. With all output
channels in one program (up to 128: the decoder's full-resolution 96), the VAE's channel RMS norm + SiLU that feeds
the next conv is applied as the result is written (``norm_silu``): the residual block's first conv then writes its
second conv's input directly, and neither the first conv's output nor the norm's pass over it exists.

What bounds the 96-channel conv is moving tiles from L2 into shared memory, the input tiles most (a diagnostic copy
that loads them once per program instead of per K block, wrong on purpose, runs at 636 TFLOP/s instead of 440; the
weight tiles once, 583). So where the windows are one buffer shifted by a frame (a chunk) and there are 96 output
channels, a program computes two output frames (`_pair_kernel`): their six time taps read four input frames, each
tile loaded once for both. The two frames' 192 channels are one pair of accumulators (128 + 64 columns: frame t's 96
and frame t + 1's first 32, then its last 64) and input frame t + f multiplies a stacked weight [tap f of frame t |
tap f - 1 of frame t + 1] (zero blocks where a frame takes nothing from it, `pair_taps`): two MMAs per K block, not
the four that separate 64 + 32 accumulators per frame need, at the cost of 22% of MMA columns spent on zeros. H100,
bf16, 12 frames at 480x832: 4.65 ms without a residual and 4.96 with one, against 5.02 and 5.16 for four separate
accumulators and 5.46 / 5.84 for one frame per program; with the norm in the epilogue (255 registers, no spills) 4.94
ms against 5.50 for the one-frame normed conv (benchmarks/results/conv3d_stacked_pair_session13.txt).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._launch import channel_blocks, check_tensors, dense_frames, frame_rows, k_block, kept_per_weight
from .vae_ops import channel_rms_norm_reference

__all__ = ["causal_conv3d", "fuses_norm", "padded_conv3d", "padded_conv3d_reference"]


@triton.jit
def _padded_conv3d_kernel(
    x0_desc, x1_desc, x2_desc, w_desc, w2_desc, bias_ptr, res_ptr, gamma_ptr, out_ptr,
    T, H, W, CO, rows0_b, rows1_b, rows2_b,
    srb, srt, srh, srw,
    sob, sot, soh, sow,
    norm_scale, norm_eps,
    C: tl.constexpr, KT: tl.constexpr, KH: tl.constexpr, KW: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, NORM: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N2: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grid = (cdiv(HP * WP, BLOCK_M), cdiv(CO, BLOCK_N + BLOCK_N2), B * T): BLOCK_M consecutive positions of the
    padded frame (HP x WP, row-major) of output frame t of batch b, output channels [n0, n0 + BLOCK_N + BLOCK_N2) in
    two accumulators (BLOCK_N2 = 0: one). Positions on the padding ring are computed and not stored. NORM (one program
    holds all CO channels): the stored value is silu(rms_norm(conv) * gamma) instead of the conv."""
    pid_m = tl.program_id(0)
    n0 = tl.program_id(1) * (BLOCK_N + BLOCK_N2)
    b = tl.program_id(2) // T
    t = tl.program_id(2) % T
    WP = W + KW - 1
    FP = (H + KH - 1) * WP
    p0 = pid_m * BLOCK_M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = acc  # unused unless BLOCK_N2 > 0
    if BLOCK_N2 > 0:
        acc2 = tl.zeros((BLOCK_M, BLOCK_N2), dtype=tl.float32)

    for f in tl.static_range(KT):  # time tap f: window f at frame t
        if f == 0:
            desc = x0_desc
            row0 = b * rows0_b + t * FP
        elif f == 1:
            desc = x1_desc
            row0 = b * rows1_b + t * FP
        else:
            desc = x2_desc
            row0 = b * rows2_b + t * FP
        row0 += p0 - (KH // 2) * WP - KW // 2  # tap (0, 0) of the tile's first position
        for i in range(KH * KW * C // BLOCK_K):  # C % BLOCK_K == 0: a K block never straddles two spatial taps
            tap = (i * BLOCK_K) // C
            a = desc.load([row0 + (tap // KW) * WP + tap % KW, (i * BLOCK_K) % C])
            k = f * KH * KW * C + i * BLOCK_K
            acc = tl.dot(a, w_desc.load([k, n0]), acc, input_precision=PRECISION)
            if BLOCK_N2 > 0:
                acc2 = tl.dot(a, w2_desc.load([k, n0 + BLOCK_N]), acc2, input_precision=PRECISION)

    _write_frame(acc, acc2, b, t, p0, H, W, CO, n0, bias_ptr, res_ptr, gamma_ptr, out_ptr,
                 srb, srt, srh, srw, sob, sot, soh, sow, norm_scale, norm_eps,
                 KH, KW, HAS_BIAS, HAS_RES, NORM, BLOCK_M, BLOCK_N, BLOCK_N2)


@triton.jit
def _pair_kernel(
    x0_desc, x1_desc, x2_desc, x3_desc, w1_desc, w2_desc, bias_ptr, res_ptr, gamma_ptr, out_ptr,
    T, H, W, rows0_b, rows1_b, rows2_b, rows3_b,
    srb, srt, srh, srw,
    sob, sot, soh, sow,
    norm_scale, norm_eps,
    C: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, NORM: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grid = (cdiv(HP * WP, BLOCK_M), B * cdiv(T, 2)), 3x3x3 taps, PAIR_CO = 96 output channels: BLOCK_M
    consecutive positions of the padded frame of output frames t and t + 1 of batch b, all 2 x 96 channels: acc1 =
    [frame t's 96 | frame t + 1's channels 0..31], acc2 = frame t + 1's channels 32..95. Input frame t + f (f = 0..3)
    is frame t of source f (`x{f}_desc`: one buffer shifted by f frames, or four separate frames for T = 2) times rows
    f * 9 C .. (f + 1) * 9 C of the stacked weight (`pair_taps`). Stored as `_write_frame` stores (a frame t + 1 = T
    not stored); NORM: each frame's norm over its own 96 channels (frame t: acc1's blocks 0..2; frame t + 1: block 3
    and acc2), frame t finished before frame t + 1 is touched (fewer live registers)."""
    pid_m = tl.program_id(0)
    TP = (T + 1) // 2
    b = tl.program_id(1) // TP
    t = (tl.program_id(1) % TP) * 2
    WP = W + 2
    FP = (H + 2) * WP
    p0 = pid_m * BLOCK_M
    NK: tl.constexpr = 9 * C // BLOCK_K  # K blocks per input frame (C % BLOCK_K == 0: one spatial tap each)
    acc1 = tl.zeros((BLOCK_M, 128), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, 64), dtype=tl.float32)

    for f in tl.static_range(4):
        n_k = NK
        if f == 0:
            desc = x0_desc
            row0 = b * rows0_b + t * FP
        elif f == 1:
            desc = x1_desc
            row0 = b * rows1_b + t * FP
        elif f == 2:
            desc = x2_desc
            row0 = b * rows2_b + t * FP
        else:  # frame t + 1's last tap; none when t + 1 = T (frame t's columns would take 0 x whatever lies there)
            desc = x3_desc
            row0 = b * rows3_b + t * FP
            n_k = NK * tl.minimum(T - 1 - t, 1)
        row0 += p0 - WP - 1  # tap (0, 0) of the tile's first position
        for i in range(n_k):
            tap = (i * BLOCK_K) // C
            a = desc.load([row0 + (tap // 3) * WP + tap % 3, (i * BLOCK_K) % C])
            k = f * 9 * C + i * BLOCK_K
            acc1 = tl.dot(a, w1_desc.load([k, 0]), acc1, input_precision=PRECISION)
            if f >= 1:  # f = 0: frame t + 1 takes nothing from input frame t (zero weights)
                acc2 = tl.dot(a, w2_desc.load([k, 128]), acc2, input_precision=PRECISION)

    p = p0 + tl.arange(0, BLOCK_M)
    h = p // WP - 1
    w = p % WP - 1
    inside = (p < FP) & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    inside_next = inside & (p * 0 + t + 1 < T)  # as a vector: the interpreter rejects a mask from a scalar condition
    pix_o = h.to(tl.int64) * soh + w.to(tl.int64) * sow + b.to(tl.int64) * sob + t.to(tl.int64) * sot
    pix_r = h.to(tl.int64) * srh + w.to(tl.int64) * srw + b.to(tl.int64) * srb + t.to(tl.int64) * srt
    lo, hi = _halves(acc1, BLOCK_M, 128)
    c0, c1 = _halves(lo, BLOCK_M, 64)
    c2, c3 = _halves(hi, BLOCK_M, 64)
    offs = tl.arange(0, 32)
    offs2 = 32 + tl.arange(0, 64)
    y0 = _conv_value(c0, offs, inside, pix_r, bias_ptr, res_ptr, out_ptr, 96, HAS_BIAS, HAS_RES)
    y1 = _conv_value(c1, 32 + offs, inside, pix_r, bias_ptr, res_ptr, out_ptr, 96, HAS_BIAS, HAS_RES)
    y2 = _conv_value(c2, 64 + offs, inside, pix_r, bias_ptr, res_ptr, out_ptr, 96, HAS_BIAS, HAS_RES)
    if NORM:
        scale = _norm_scale(tl.sum(y0 * y0, axis=1) + tl.sum(y1 * y1, axis=1) + tl.sum(y2 * y2, axis=1),
                            norm_scale, norm_eps)
        y0 = _silu_scaled(y0, scale, gamma_ptr, offs, 96)
        y1 = _silu_scaled(y1, scale, gamma_ptr, 32 + offs, 96)
        y2 = _silu_scaled(y2, scale, gamma_ptr, 64 + offs, 96)
    _store(y0, offs, inside, pix_o, out_ptr, 96)
    _store(y1, 32 + offs, inside, pix_o, out_ptr, 96)
    _store(y2, 64 + offs, inside, pix_o, out_ptr, 96)
    y3 = _conv_value(c3, offs, inside_next, pix_r + srt, bias_ptr, res_ptr, out_ptr, 96, HAS_BIAS, HAS_RES)
    y4 = _conv_value(acc2, offs2, inside_next, pix_r + srt, bias_ptr, res_ptr, out_ptr, 96, HAS_BIAS, HAS_RES)
    if NORM:
        scale = _norm_scale(tl.sum(y3 * y3, axis=1) + tl.sum(y4 * y4, axis=1), norm_scale, norm_eps)
        y3 = _silu_scaled(y3, scale, gamma_ptr, offs, 96)
        y4 = _silu_scaled(y4, scale, gamma_ptr, offs2, 96)
    _store(y3, offs, inside_next, pix_o + sot, out_ptr, 96)
    _store(y4, offs2, inside_next, pix_o + sot, out_ptr, 96)


@triton.jit
def _halves(x, BLOCK_M: tl.constexpr, N: tl.constexpr):
    """The column halves (BLOCK_M x N / 2 each) of a BLOCK_M x N tile."""
    return tl.split(tl.permute(tl.reshape(x, (BLOCK_M, 2, N // 2)), (0, 2, 1)))


@triton.jit
def _norm_scale(squares, norm_scale, norm_eps):
    """Per position: sqrt(CO) / max(||y||_2, eps), from the sum of squares over the position's CO channels."""
    return norm_scale / tl.maximum(tl.sqrt(squares), norm_eps)


@triton.jit
def _write_frame(acc, acc2, b, t, p0, H, W, CO, n0, bias_ptr, res_ptr, gamma_ptr, out_ptr,
                 srb, srt, srh, srw, sob, sot, soh, sow, norm_scale, norm_eps,
                 KH: tl.constexpr, KW: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr,
                 NORM: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N2: tl.constexpr):
    """Store output frame t's tile: bias, residual and the norm applied to the two accumulators."""
    WP = W + KW - 1
    p = p0 + tl.arange(0, BLOCK_M)
    h = p // WP - KH // 2
    w = p % WP - KW // 2
    inside = (p < (H + KH - 1) * WP) & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    h64 = h.to(tl.int64)
    w64 = w.to(tl.int64)
    pix_o = h64 * soh + w64 * sow + b.to(tl.int64) * sob + t.to(tl.int64) * sot
    pix_r = h64 * srh + w64 * srw + b.to(tl.int64) * srb + t.to(tl.int64) * srt
    offs_n = n0 + tl.arange(0, BLOCK_N)
    y = _conv_value(acc, offs_n, inside, pix_r, bias_ptr, res_ptr, out_ptr, CO, HAS_BIAS, HAS_RES)
    if BLOCK_N2 > 0:
        offs_n2 = n0 + BLOCK_N + tl.arange(0, BLOCK_N2)
        y2 = _conv_value(acc2, offs_n2, inside, pix_r, bias_ptr, res_ptr, out_ptr, CO, HAS_BIAS, HAS_RES)
    if NORM:  # the channels outside CO are zeros (zero weight rows, masked bias and residual)
        squares = tl.sum(y * y, axis=1)
        if BLOCK_N2 > 0:
            squares += tl.sum(y2 * y2, axis=1)
        scale = _norm_scale(squares, norm_scale, norm_eps)
        y = _silu_scaled(y, scale, gamma_ptr, offs_n, CO)
        if BLOCK_N2 > 0:
            y2 = _silu_scaled(y2, scale, gamma_ptr, offs_n2, CO)
    _store(y, offs_n, inside, pix_o, out_ptr, CO)
    if BLOCK_N2 > 0:
        _store(y2, offs_n2, inside, pix_o, out_ptr, CO)


@triton.jit
def _conv_value(acc, offs_n, inside, pix_r, bias_ptr, res_ptr, out_ptr, CO,
                HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr):
    """acc (+ bias[channel]) (+ residual), rounded to the output dtype as an unfused conv would store it, in fp32."""
    mask_n = offs_n < CO
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    if HAS_RES:
        mask = inside[:, None] & mask_n[None, :]
        acc += tl.load(res_ptr + pix_r[:, None] + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    return acc.to(out_ptr.dtype.element_ty).to(tl.float32)


@triton.jit
def _silu_scaled(y, scale, gamma_ptr, offs_n, CO):
    """silu(y * scale[position] * gamma[channel])."""
    y = y * scale[:, None] * tl.load(gamma_ptr + offs_n, mask=offs_n < CO, other=0.0).to(tl.float32)[None, :]
    return y * tl.sigmoid(y)


@triton.jit
def _store(y, offs_n, inside, pix_o, out_ptr, CO):
    mask = inside[:, None] & (offs_n < CO)[None, :]
    tl.store(out_ptr + pix_o[:, None] + offs_n[None, :], y.to(out_ptr.dtype.element_ty), mask=mask)


@kept_per_weight
def tap_major(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A conv weight (CO, C, kt, kh, kw) as the (kt * kh * kw * C, CO) matrix in `dtype` the kernel reads (a copy kept
    per weight, `kept_per_weight`)."""
    return weight.detach().to(dtype).permute(2, 3, 4, 1, 0).reshape(-1, weight.shape[0]).contiguous()


PAIR_CO = 96  # output channels of the two-frame kernel: 2 x 96 = 128 + 64 accumulator columns


@kept_per_weight
def pair_taps(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A 3x3x3 conv weight (CO, C, 3, 3, 3) as the (4 * 9 C, 2 CO) matrix `_pair_kernel` reads: rows f * 9 C .. =
    [time tap f for frame t (zeros for f = 3) | tap f - 1 for frame t + 1 (zeros for f = 0)], each tap laid out as
    `tap_major`'s; kept like it."""
    CO, C = weight.shape[:2]
    taps = tap_major(weight, dtype).view(3, 9 * C, CO)
    stacked = torch.zeros(4, 9 * C, 2 * CO, dtype=dtype, device=weight.device)
    stacked[:3, :, :CO] = taps
    stacked[1:, :, CO:] = taps
    return stacked.view(4 * 9 * C, 2 * CO)


def _blocks(C: int, CO: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_N2, BLOCK_K) for C inputs and CO outputs: CO as `channel_blocks` covers it; BLOCK_K the
    largest of 64, 32, 16 dividing C (a multiple of 16)."""
    return *channel_blocks(CO), k_block(C)


def fuses_norm(C: int, CO: int) -> bool:
    """Whether `padded_conv3d(..., norm_silu=gamma)` applies the channel norm as it writes: one program holds all CO
    output channels, at most 128 (96 and powers of two up to 128). With 192 (128 + 64 fp32 accumulators per row) the
    fused conv measured 0.87x of the conv and the norm kernel apart on an H100 (1.005x at 8 warps); with 96,
    1.07-1.10x."""
    block_n, block_n2, _ = _blocks(C, CO)
    return CO <= block_n + block_n2 <= 128


def _one_buffer(windows: Sequence[torch.Tensor]) -> bool:
    """Whether the windows are three views of one buffer shifted by a frame each, at least two frames long: then the
    frames t .. t + 3 that output frames t and t + 1 read are all there for a program computing both."""
    x = windows[0]
    step = x.stride(1) * x.element_size()
    return len(windows) == 3 and x.shape[1] > 1 and all(
        win.data_ptr() == x.data_ptr() + k * step for k, win in enumerate(windows))


def _check_frames(frames: Sequence[torch.Tensor], C: int, kh: int, kw: int) -> None:
    """Input frames (B, T, H + kh - 1, W + kw - 1, C) of one shape past dim 1, one dtype, frames dense."""
    x = frames[0]
    if x.dim() != 5 or x.shape[4] != C or x.shape[2] < kh or x.shape[3] < kw:
        raise ValueError(f"windows must be (B, T, H + {kh - 1}, W + {kw - 1}, {C}), got {tuple(x.shape)}")
    HP, WP = x.shape[2:4]
    for win in frames:
        if win.shape[::2] != x.shape[::2] or win.shape[3] != WP or win.dtype != x.dtype or not dense_frames(win):
            dense = (HP * WP * C, WP * C, C, 1)
            raise ValueError(f"windows must share shape {tuple(x.shape)} and dtype {x.dtype}, with dense padded "
                             f"frames (strides (*, {dense})), got {tuple(win.shape)} {win.dtype} {win.stride()}")


def _check_conv(weight: torch.Tensor, frames: Sequence[torch.Tensor], T: int, residual: torch.Tensor | None,
                out: torch.Tensor | None, bias: torch.Tensor | None, norm_silu: torch.Tensor | None) -> None:
    """The arguments of a conv of T output frames from `frames` (its windows or input frames)."""
    if weight.dim() != 5:
        raise ValueError(f"weight must be (CO, C, kt, kh, kw), got {tuple(weight.shape)}")
    CO, C, kt, kh, kw = weight.shape
    if kt > 3 or kh % 2 == 0 or kw % 2 == 0:
        raise ValueError(f"kernel must have at most 3 time taps and odd height and width, got {(kt, kh, kw)}")
    _check_frames(frames, C, kh, kw)
    B, _, HP, WP, _ = frames[0].shape
    shape = (B, CO, T, HP - kh + 1, WP - kw + 1)
    for name, t in (("residual", residual), ("out", out)):
        if t is not None and (t.shape != shape or t.stride(1) != 1):
            raise ValueError(f"{name} must be {shape} with channel stride 1, got {tuple(t.shape)} {t.stride()}")
    if C % 16 or CO % 16:
        raise ValueError(f"input and output channels must be multiples of 16, got {C} and {CO}")
    for name, t in (("bias", bias), ("norm_silu", norm_silu)):
        if t is not None and t.numel() != CO:
            raise ValueError(f"{name} must hold {CO} values, got shape {tuple(t.shape)}")
    if norm_silu is not None and not fuses_norm(C, CO):
        raise ValueError(f"norm_silu needs at most 128 output channels, all in one program (fuses_norm), got {CO}")


def _pairs(weight: torch.Tensor, block_n: int | None, pair_frames: bool) -> bool:
    """Whether `_pair_kernel` takes this conv: 3x3x3, 96 outputs, the default channel split."""
    return pair_frames and block_n is None and tuple(weight.shape[2:]) == (3, 3, 3) and weight.shape[0] == PAIR_CO


def padded_conv3d(
    windows: Sequence[torch.Tensor],
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    residual: torch.Tensor | None = None,
    norm_silu: torch.Tensor | None = None,
    norm_eps: float = 1e-12,
    out: torch.Tensor | None = None,
    block_m: int = 128,
    block_n: int | None = None,
    num_warps: int = 4,
    num_stages: int | None = None,
    pair_frames: bool = True,
) -> torch.Tensor:
    """out[:, :, t] = sum_k conv2d(windows[k][:, t], weight[:, :, k]) (+ bias) (+ residual), all kt * kh * kw * C
    products of a value summed in fp32 and rounded once (fp32 inputs: full fp32 products, not tf32).

    windows: kt tensors (B, T, H + kh - 1, W + kw - 1, C), frames already zero-padded in space (a zero ring the
    conv's padding reads), each frame's rows and pixels dense (strides ((H + kh - 1)(W + kw - 1) C, (W + kw - 1) C,
    C, 1) for dims 1..4); tap k reads windows[k]. weight: (CO, C, kt, kh, kw), odd kh and kw, C and CO multiples of
    16 (read through a tap-major copy, `tap_major`); residual, out: (B, CO, T, H, W) with channel stride 1 (out by
    default new, channels-last, windows' dtype). ``norm_silu``: CO gains (CO as `fuses_norm` allows); then ``out``
    receives silu(y / max(||y||, norm_eps) * sqrt(CO) * gain) with y the conv (+ bias + residual) rounded to the
    windows' dtype and the norm over channels (the VAE's RMSNorm before its next conv), so the conv itself is never
    written. ``block_m``, ``block_n`` (one accumulator of that many output channels instead of the default split),
    ``num_warps``, ``num_stages`` (default 4, 3 with two frames per program: each the faster on an H100): launch
    settings, for tuning. ``pair_frames``: two output frames per program (`_pair_kernel`) where the windows are one
    buffer shifted by a frame each, the kernel is 3x3x3 with 96 output channels and no ``block_n`` is given, with or
    without the norm (each input tile loaded once for both frames; see the module docstring). Returns ``out``.
    """
    if weight.dim() == 5 and len(windows) != weight.shape[2]:
        raise ValueError(f"weight has {weight.shape[2]} time taps, got {len(windows)} windows")
    x = windows[0]
    T = x.shape[1] if x.dim() == 5 else 0
    _check_conv(weight, windows, T, residual, out, bias, norm_silu)
    if any(win.shape[1] != T for win in windows):
        raise ValueError(f"windows must share shape {tuple(x.shape)}, got {[tuple(w.shape) for w in windows]}")
    return _windows_conv(windows, weight, bias, residual, norm_silu, norm_eps, out, block_m, block_n, num_warps,
                         num_stages, pair_frames)


def _windows_conv(windows: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None,
                  residual: torch.Tensor | None, norm_silu: torch.Tensor | None, norm_eps: float,
                  out: torch.Tensor | None, block_m: int = 128, block_n: int | None = None, num_warps: int = 4,
                  num_stages: int | None = None, pair_frames: bool = True) -> torch.Tensor:
    """`padded_conv3d` of checked arguments: two frames per program where the windows allow it, else one."""
    pair = _pairs(weight, block_n, pair_frames) and _one_buffer(windows)
    # two frames per program read the last window at its second frame too; fewer than 3 taps repeat a window unread
    sources = [*windows, windows[2][:, 1:]] if pair else [*windows, *[windows[0]] * (3 - len(windows))]
    return _launch(sources, windows[0].shape[1], pair, weight, bias, residual, norm_silu, norm_eps, out, block_m,
                   block_n, num_warps, num_stages)


def causal_conv3d(
    past: Sequence[torch.Tensor],
    chunk: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    residual: torch.Tensor | None = None,
    norm_silu: torch.Tensor | None = None,
    norm_eps: float = 1e-12,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """The 3x3x3 causal conv of a video's next frames `chunk` (B, T, H + 2, W + 2, C) (padded as `padded_conv3d`
    takes them) after its last two input frames `past` (two (B, 1, H + 2, W + 2, C) tensors; zeros at the video
    start), read where they lie: no [past + chunk] buffer is made. Output frames 2 .. T - 1 read the chunk alone (one
    launch, two frames per program at 96 output channels); frames 0 and 1 read past frames too: at 96 outputs one
    `_pair_kernel` launch whose four input frames are four sources, else one launch each. Other arguments, and the
    result, as `padded_conv3d`'s (the same sums in the same order). The arguments are checked once, here: the
    launches take slices of them."""
    if weight.dim() != 5 or tuple(weight.shape[2:]) != (3, 3, 3):
        raise ValueError(f"weight must be (CO, C, 3, 3, 3), got {tuple(weight.shape)}")
    if len(past) != 2:
        raise ValueError(f"past must be the video's last 2 input frames, got {len(past)}")
    if chunk.dim() != 5 or any(f.dim() != 5 or f.shape[1] != 1 for f in past):
        raise ValueError(f"chunk must be (B, T, H + 2, W + 2, C) and past (B, 1, H + 2, W + 2, C), got "
                         f"{tuple(chunk.shape)} and {[tuple(f.shape) for f in past]}")
    T = chunk.shape[1]
    _check_conv(weight, [*past, chunk], T, residual, out, bias, norm_silu)
    B, _, HP, WP, _ = chunk.shape
    if out is None:
        out = torch.empty((B, weight.shape[0], T, HP - 2, WP - 2), dtype=chunk.dtype, device=chunk.device,
                          memory_format=torch.channels_last_3d)
    frames = [*past, *chunk[:, :2].split(1, dim=1)]  # the video's frames that output frames 0 and 1 read

    def part(frames_out: slice) -> dict:
        res = None if residual is None else residual[:, :, frames_out]
        return dict(residual=res, norm_silu=norm_silu, norm_eps=norm_eps, out=out[:, :, frames_out])

    if T >= 2 and _pairs(weight, None, True):
        _launch(frames, 2, True, weight, bias, **part(slice(0, 2)))
    else:
        for t in range(min(T, 2)):
            _windows_conv(frames[t : t + 3], weight, bias, **part(slice(t, t + 1)))
    if T > 2:
        _windows_conv([chunk[:, k : k + T - 2] for k in range(3)], weight, bias, **part(slice(2, T)))
    return out


def _launch(sources: Sequence[torch.Tensor], T: int, pair: bool, weight: torch.Tensor, bias: torch.Tensor | None,
            residual: torch.Tensor | None, norm_silu: torch.Tensor | None, norm_eps: float,
            out: torch.Tensor | None, block_m: int = 128, block_n: int | None = None, num_warps: int = 4,
            num_stages: int | None = None) -> torch.Tensor:
    """Run the conv of T output frames (checked) from its input sources: three windows (the one-frame kernel; tap k
    of output frame t reads frame t of source k) or, `pair`, four (`_pair_kernel`; input frame t + f of an output pair
    (t, t + 1) is frame t of source f)."""
    CO, C = weight.shape[:2]
    x = sources[0]
    B, _, HP, WP, _ = x.shape
    kt, kh, kw = weight.shape[2:]
    block_n, block_n2, block_k = _blocks(C, CO) if block_n is None else (block_n, 0, _blocks(C, CO)[2])
    taps = pair_taps(weight, x.dtype) if pair else tap_major(weight, x.dtype)
    if out is None:
        out = torch.empty((B, CO, T, HP - kh + 1, WP - kw + 1), dtype=x.dtype, device=x.device,
                          memory_format=torch.channels_last_3d)
    check_tensors(*sources, taps, bias, residual, norm_silu, out)
    if out.numel() == 0:
        return out
    descs = [frame_rows(src, block_m, block_k) for src in sources]
    rows_b = [src.stride(0) // C for src in sources]
    widths = (128, 64) if pair else (block_n, block_n2 or block_n)
    w_descs = [TensorDescriptor(taps, list(taps.shape), [taps.shape[1], 1], [block_k, n]) for n in widths]
    res = residual if residual is not None else out
    args = (bias if bias is not None else taps, res, norm_silu if norm_silu is not None else taps, out)
    strides = (res.stride(0), res.stride(2), res.stride(3), res.stride(4),
               out.stride(0), out.stride(2), out.stride(3), out.stride(4), float(CO) ** 0.5, float(norm_eps))
    flags = dict(C=C, HAS_BIAS=bias is not None, HAS_RES=residual is not None, NORM=norm_silu is not None,
                 PRECISION="ieee" if x.dtype == torch.float32 else "tf32")  # fp32 products exact; 16-bit: unused
    if pair:
        _pair_kernel[(triton.cdiv(HP * WP, block_m), B * triton.cdiv(T, 2))](
            *descs, *w_descs, *args, T, HP - 2, WP - 2, *rows_b, *strides, **flags,
            BLOCK_M=block_m, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages or 3)
        return out
    _padded_conv3d_kernel[(triton.cdiv(HP * WP, block_m), triton.cdiv(CO, block_n + block_n2), B * T)](
        *descs, *w_descs, *args, T, HP - kh + 1, WP - kw + 1, CO, *rows_b, *strides, **flags,
        KT=kt, KH=kh, KW=kw, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_N2=block_n2, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages or 4)
    return out


def padded_conv3d_reference(windows: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None = None,
                            residual: torch.Tensor | None = None, norm_silu: torch.Tensor | None = None,
                            norm_eps: float = 1e-12) -> torch.Tensor:
    """Plain torch :func:`padded_conv3d`: one unpadded conv3d over the padded frames the windows cover, in the
    inputs' dtype, then the channel norm and SiLU. Window k is frames k .. k + T - 1 of that video: the first window
    plus each later one's last."""
    x = torch.cat([windows[0], *(win[:, -1:] for win in windows[1:])], dim=1).permute(0, 4, 1, 2, 3)
    y = torch.nn.functional.conv3d(x, weight, bias)
    y = y if residual is None else y + residual
    if norm_silu is None:
        return y
    return channel_rms_norm_reference(y, norm_silu, silu=True, eps=norm_eps, compute_dtype=torch.float32)
