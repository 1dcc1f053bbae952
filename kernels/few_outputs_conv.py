"""Causal 3x3x3 convolution to a few output channels (the Wan VAE decoder's RGB conv_out) as one pass over the frames.

The decoder's last conv takes 96 channels to 3 at full resolution (480 x 832), chunk by chunk. cuDNN runs it as
`streamgen.vae.few_outputs_by_frames`: one conv2d with kt * O = 9 outputs per frame (each input frame read once), then
torch adds the time taps into partial sums. In an H100 profile of an 81-frame decode that is ~9 ms of conv plus ~2 ms
of sums, while reading the input (96 channels, bf16) is ~2 ms of memory traffic: the motivation for this kernel.

A program owns a tile of output positions and walks the chunk's frames in order: each frame is loaded by one program
once, not once per time tap. The dots give all three time taps of all (up to 4) outputs at once (4 outputs x 4
time-tap columns, 3 used), and the taps are rolled through two partial sums: output t = p1 + tap2(t); p1 <- p2 +
tap1(t); p2 <- tap0(t). Between chunks the two partial sums are `pending`: what earlier chunks' frames contributed to
this chunk's first two outputs, 2 x O fp32 values a pixel instead of 2 input frames of C channels.

The first version gave a program BLOCK_M consecutive positions of the zero-ring padded frame (row-major, as
`kernels.conv3d`'s implicit GEMM) and loaded each 3x3 spatial tap's shifted tile separately: one TMA tile load and one
dot of N = 16 columns per tap and K block. Measured on an H100 (bf16, 12 frames at 480x832, 96 -> 3;
benchmarks/RESULTS.md) it took 1.49 ms against 1.60 for cuDNN's 9-output conv2d and the tap sums, 0.66 TB/s of the
input's bytes, where reading the input once would take ~0.31 ms: each input tile came from L2 nine times (a 3x3 tap's
rows are a frame row apart, so consecutive positions of one row cannot share them), and that traffic from L2 to shared
memory, not the memory, bounded it.

So a program now owns BLOCK_H rows x BLOCK_W columns of one frame strip (tiles cover the H x W outputs; the zero ring
is only read, and positions past the frame's last row or column are computed and not stored). Its BLOCK_H + 2 input
rows (padded rows h0 .. h0 + BLOCK_H + 1 for output rows h0 .. h0 + BLOCK_H - 1) are each loaded once per horizontal
tap dw = 0, 1, 2: the row's BLOCK_W positions shifted by dw - 1 are consecutive rows of the (positions, C) matrix of
the padded frames, one TMA tile load per K block. That is 3 (BLOCK_H + 2) / BLOCK_H tile loads per output position
instead of 9 (3.75 at BLOCK_H = 8). Each load feeds one dot with N = 64 columns, 16 per vertical tap dh (3 of 4
used): input row i, summed over dw and the K blocks, gives output row i - dh its tap dh, and an output row is complete
(its time taps rolled, its output stored) once its third input row is in. The 64 columns are ordered (dh, k // 2, o,
k % 2) so that splitting them into vertical and time taps only regroups values each thread holds in the wgmma
accumulator's layout (a thread's columns are 8 g + 2 (lane % 4) + e, g and e in registers; the 4 outputs lie across
a thread quad), with no shuffle through shared memory.

Input rows go two at a time (so BLOCK_H is even): the two share each weight tile, so the weights (3 C x 64 for each
row) come from L2 half as often as the rows alone would need them. The pairs are a loop (after the first pair, which
starts the first two output rows), not unrolled: unrolled, each pair's pipelined K loop kept its own buffer and
barrier addresses in registers, past 255 with spills at BLOCK_H = 8. Each output row's two partial sums are
(BLOCK_W, 4) tensors in tuples, rotated by one per output row so that the loop always rolls the first. At the
defaults (8 x 64, 4 warps, bf16) the kernel uses 159 registers without spills and about 37 KB of shared memory.
H100, the same 12 frames, same machine: 0.643 ms at 4 stages (0.654 at 3) against the first version's 1.491, 1.53
TB/s of its input and output bytes; of 24 tile shapes and launch settings 8 x 64 at 4 warps was the fastest
(benchmarks/results/rgb_tiles_ab_session13.txt).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._launch import check_tensors, dense_frames, frame_rows, k_block, kept_per_weight

__all__ = ["MAX_OUTPUTS", "few_outputs_conv3d", "few_outputs_conv3d_reference", "few_outputs_taps"]

MAX_OUTPUTS = 4
"""Output channels one program holds: 4 outputs x 4 time-tap columns (3 used) = 16 columns per vertical tap."""


@triton.jit
def _few_outputs_kernel(
    x_desc, w_desc, bias_ptr, pending_ptr, new_ptr, out_ptr,
    T, H, W, CO, rows_b, tiles_w,
    spb, sps, spo, sph, spw,
    snb, sns, sno, snh, snw,
    sob, soo, sot, soh, sow,
    C: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PENDING: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grid = (cdiv(H, BLOCK_H) * cdiv(W, BLOCK_W), B): output rows h0 .. h0 + BLOCK_H - 1 x columns w0 .. w0 +
    BLOCK_W - 1 of batch b, through all T frames; BLOCK_H even. Tile row j is padded row h0 + 1 + j; input row i = 0
    .. BLOCK_H + 1 is padded row h0 + i and gives tile row i - dh its vertical tap dh. Positions past row H - 1 or
    column W - 1 are computed and not stored (what they read past the frame, the next frame or batch, reaches no
    stored output)."""
    b = tl.program_id(1)
    h0 = tl.program_id(0) // tiles_w * BLOCK_H
    w0 = tl.program_id(0) % tiles_w * BLOCK_W
    WP = W + 2
    FP = (H + 2) * WP
    w = w0 + tl.arange(0, BLOCK_W)
    offs_o = tl.arange(0, 4)
    cols = (w < W)[:, None] & (offs_o < CO)[None, :]
    b64 = b.to(tl.int64)
    w64 = w.to(tl.int64)[:, None]
    pending = pending_ptr + b64 * spb + w64 * spw + offs_o[None, :] * spo
    new = new_ptr + b64 * snb + w64 * snw + offs_o[None, :] * sno
    out = out_ptr + b64 * sob + w64 * sow + offs_o[None, :] * soo

    p1 = ()  # per tile row j, the partial sums of its next output (p1[j]) and the one after (p2[j])
    p2 = ()
    for i in tl.static_range(BLOCK_H):
        if HAS_PENDING:
            in_row = cols & (w * 0 + h0 + i < H)[:, None]  # a vector: the interpreter rejects a scalar in a mask
            p1 = p1 + (tl.load(pending + (h0 + i).to(tl.int64) * sph, mask=in_row, other=0.0),)
            p2 = p2 + (tl.load(pending + (h0 + i).to(tl.int64) * sph + sps, mask=in_row, other=0.0),)
        else:
            p1 = p1 + (tl.zeros((BLOCK_W, 4), dtype=tl.float32),)
            p2 = p2 + (tl.zeros((BLOCK_W, 4), dtype=tl.float32),)
    bias = tl.zeros((4,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_o, mask=offs_o < CO, other=0.0).to(tl.float32)

    row0 = b * rows_b + h0 * WP + w0  # input row 0 (padded row h0) at horizontal tap 0 (padded column w0), frame 0
    for t in range(T):
        row = row0 + t * FP
        ya, yb = _row_pair(x_desc, w_desc, row, WP, C, BLOCK_W, BLOCK_K)  # input rows 0, 1
        a0, a1, _ = _vertical_taps(ya, BLOCK_W)
        b0, b1, _ = _vertical_taps(yb, BLOCK_W)
        s1 = a0 + b1  # tile row 0: vertical taps 0, 1
        s0 = b0  # tile row 1: vertical tap 0
        # input rows j + 2, j + 3 complete tile rows j, j + 1; p1[0], p2[0] are tile row j's (the tuples rotate)
        for j in range(0, BLOCK_H, 2):
            ya, yb = _row_pair(x_desc, w_desc, row + (j + 2) * WP, WP, C, BLOCK_W, BLOCK_K)
            a0, a1, a2 = _vertical_taps(ya, BLOCK_W)
            b0, b1, b2 = _vertical_taps(yb, BLOCK_W)
            for u in tl.static_range(2):  # tile row j + u: frame t's output, the next partial sums
                if u == 0:
                    y, n1, n2 = _roll(s1 + a2, p1[0], p2[0], BLOCK_W)
                else:
                    y, n1, n2 = _roll(s0 + a1 + b2, p1[0], p2[0], BLOCK_W)
                mask = cols & (w * 0 + h0 + j + u < H)[:, None]
                tl.store(out + (h0 + j + u).to(tl.int64) * soh, (y + bias[None, :]).to(out_ptr.dtype.element_ty),
                         mask=mask)
                p1 = p1[1:] + (n1,)
                p2 = p2[1:] + (n2,)
            s1 = a0 + b1  # tile row j + 2: vertical taps 0, 1
            s0 = b0  # tile row j + 3: vertical tap 0
        out += sot

    for i in tl.static_range(BLOCK_H):
        in_row = cols & (w * 0 + h0 + i < H)[:, None]
        tl.store(new + (h0 + i).to(tl.int64) * snh, p1[i], mask=in_row)
        tl.store(new + (h0 + i).to(tl.int64) * snh + sns, p2[i], mask=in_row)


@triton.jit
def _row_pair(x_desc, w_desc, row, WP, C: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_K: tl.constexpr):
    """Input rows `row` and `row + WP` (their first position at horizontal tap 0) through the (3 C, 64) weight
    matrix: each (BLOCK_W, 64) fp32, summed over the horizontal taps and K blocks. The rows share each weight tile."""
    NK: tl.constexpr = C // BLOCK_K  # K blocks per horizontal tap; C % BLOCK_K == 0
    ya = tl.zeros((BLOCK_W, 64), dtype=tl.float32)
    yb = ya
    for q in range(3 * NK):  # horizontal tap q // NK, K block q % NK
        taps = w_desc.load([q * BLOCK_K, 0])
        r = row + q // NK
        k = (q % NK) * BLOCK_K
        ya = tl.dot(x_desc.load([r, k]), taps, ya, input_precision="ieee")
        yb = tl.dot(x_desc.load([r + WP, k]), taps, yb, input_precision="ieee")
    return ya, yb


@triton.jit
def _roll(s, p1, p2, BLOCK_W: tl.constexpr):
    """A tile row's frame sums s (BLOCK_W, 16) and partial sums p1 (of this frame's output) and p2 (of the next):
    (this frame's output less the bias, the partial sums of the next output and of the one after)."""
    tap0, tap1, tap2 = _time_taps(s, BLOCK_W)
    return p1 + tap2, p2 + tap1, tap0


@triton.jit
def _vertical_taps(y, BLOCK_W: tl.constexpr):
    """The (BLOCK_W, 16) blocks of vertical taps dh = 0, 1, 2 of y (BLOCK_W, 64), column 16 dh + c."""
    y = tl.permute(tl.reshape(y, (BLOCK_W, 2, 2, 16)), (0, 3, 1, 2))  # (position, c, dh // 2, dh % 2)
    even, odd = tl.split(y)
    dh0, dh2 = tl.split(even)
    dh1, _ = tl.split(odd)
    return dh0, dh1, dh2


@triton.jit
def _time_taps(s, BLOCK_W: tl.constexpr):
    """The (BLOCK_W, 4) time taps k = 0, 1, 2 of s (BLOCK_W, 16), column 8 (k // 2) + 2 o + k % 2 of output o."""
    s = tl.permute(tl.reshape(s, (BLOCK_W, 2, 4, 2)), (0, 2, 1, 3))  # (position, o, k // 2, k % 2)
    even, odd = tl.split(s)
    tap0, tap2 = tl.split(even)
    tap1, _ = tl.split(odd)
    return tap0, tap1, tap2


@kept_per_weight
def few_outputs_taps(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A weight (CO, C, 3, 3, 3) as the (3 * C, 64) matrix in `dtype` the kernel reads: row C * dw + c (horizontal
    tap dw = 0, 1, 2), column 16 * dh + 8 * (k // 2) + 2 * o + k % 2 = weight[o, c, k, dh, dw], the other columns
    (dh = 3, k = 3, o >= CO) zero (a copy kept per weight, `kept_per_weight`)."""
    o, c = weight.shape[:2]
    taps = torch.zeros((3, c, 4, 2, MAX_OUTPUTS, 2), dtype=dtype, device=weight.device)  # (dw, c, dh, k//2, o, k%2)
    by_shift = weight.detach().permute(4, 1, 3, 0, 2)  # (dw, c, dh, o, k)
    for k in range(3):
        taps[:, :, :3, k // 2, :o, k % 2] = by_shift[..., k]
    return taps.view(3 * c, 64)


def few_outputs_conv3d(
    frames: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    pending: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    block_h: int = 8,
    block_w: int = 64,
    num_warps: int = 4,
    num_stages: int = 4,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A chunk of a causal 3x3x3 conv with at most 4 output channels, continuing a video through `pending`.

    frames: (B, T, H + 2, W + 2, C), T >= 1, C a multiple of 16, fp16, bf16 or fp32: zero-ring padded frames with
    dense frames (strides (*, (H + 2)(W + 2) C, (W + 2) C, C, 1), batch stride a multiple of C), as `padded_conv3d`
    reads. weight: (CO, C, 3, 3, 3), 1 <= CO <= 4, padding 1 in space; causal in time: output t = sum over k of
    conv2d(frame t + k - 2, weight[:, :, k]), in order k = 0, 1, 2, each tap's 9 C products summed in fp32, then
    + bias, rounded once to out's dtype (fp32 dots in full fp32, not tf32). The frames before this chunk's first
    come in through ``pending`` (B, 2, CO, H, W) fp32, any strides: pending[:, 0] = tap0(frame -2) + tap1(frame -1),
    the partial sum of output 0, pending[:, 1] = tap0(frame -1), of output 1; None at the video start (zero frames
    before it). ``out``: (B, CO, T, H, W), any strides, fp32 or the frames' dtype (default new fp32, contiguous).
    ``block_h`` (even) x ``block_w`` (a power of two): a program's tile of output rows x columns; ``num_warps``,
    ``num_stages``: launch settings. Returns (out, new pending): the pending sums for the next chunk, new fp32
    (B, 2, CO, H, W) with channels innermost (a (B, 2, H, W, CO) tensor's permuted view).
    """
    if frames.dim() != 5:
        raise ValueError(f"frames must be (B, T, H + 2, W + 2, C), got {tuple(frames.shape)}")
    B, T, HP, WP, C = frames.shape
    H, W = HP - 2, WP - 2
    if weight.dim() != 5 or weight.shape[1:] != (C, 3, 3, 3):
        raise ValueError(f"weight must be (CO, {C}, 3, 3, 3) for {C} input channels, got {tuple(weight.shape)}")
    CO = weight.shape[0]
    if not 1 <= CO <= MAX_OUTPUTS:
        raise ValueError(f"weight must have 1 to {MAX_OUTPUTS} output channels, got {CO}")
    if C % 16:
        raise ValueError(f"input channels must be a multiple of 16, got {C}")
    if min(B, T, H, W) < 1:
        raise ValueError(f"frames must hold at least one frame of at least 1 x 1 inside the ring, got "
                         f"{tuple(frames.shape)}")
    if frames.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"frames must be float16, bfloat16 or float32, got {frames.dtype}")
    if not dense_frames(frames):
        dense = (HP * WP * C, WP * C, C, 1)
        raise ValueError(f"frames must be dense padded frames (strides (*, {dense}), batch stride a multiple of {C}), "
                         f"got {frames.stride()}")
    if pending is not None and (pending.shape != (B, 2, CO, H, W) or pending.dtype != torch.float32):
        raise ValueError(f"pending must be float32 {(B, 2, CO, H, W)}, got {pending.dtype} {tuple(pending.shape)}")
    if out is not None and (out.shape != (B, CO, T, H, W) or out.dtype not in (torch.float32, frames.dtype)):
        raise ValueError(f"out must be {(B, CO, T, H, W)} of float32 or {frames.dtype}, got {out.dtype} "
                         f"{tuple(out.shape)}")
    if bias is not None and bias.numel() != CO:
        raise ValueError(f"bias must hold {CO} values, got shape {tuple(bias.shape)}")
    if block_h < 2 or block_h % 2 or block_w < 1 or block_w & (block_w - 1):
        raise ValueError(f"block_h must be even and block_w a power of two, got {block_h} x {block_w}")
    taps = few_outputs_taps(weight, frames.dtype)
    if out is None:
        out = torch.empty((B, CO, T, H, W), dtype=torch.float32, device=frames.device)
    new = torch.empty((B, 2, H, W, CO), dtype=torch.float32, device=frames.device).permute(0, 1, 4, 2, 3)
    check_tensors(frames, taps, bias, pending, out)
    block_k = k_block(C)
    x_desc = frame_rows(frames, block_w, block_k)
    w_desc = TensorDescriptor(taps, [3 * C, 64], [64, 1], [block_k, 64])
    pend = pending if pending is not None else new
    tiles_w = triton.cdiv(W, block_w)
    _few_outputs_kernel[(triton.cdiv(H, block_h) * tiles_w, B)](
        x_desc, w_desc, bias if bias is not None else taps, pend, new, out,
        T, H, W, CO, frames.stride(0) // C, tiles_w,
        *pend.stride(), *new.stride(), *out.stride(),
        C=C, HAS_BIAS=bias is not None, HAS_PENDING=pending is not None,
        BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, new


def few_outputs_conv3d_reference(frames: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                                 pending: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain torch :func:`few_outputs_conv3d` in the inputs' dtype: the chunk's frames with two zero frames before
    and after, convolved by conv3d, give this chunk's taps of outputs 0 .. T + 1; the pending sums add the earlier
    frames' taps to outputs 0 and 1; outputs T and T + 1 are the next chunk's pending sums."""
    T = frames.shape[1]
    x = frames[:, :, 1:-1, 1:-1].permute(0, 4, 1, 2, 3)  # (B, C, T, H, W) without the ring
    sums = torch.nn.functional.conv3d(torch.nn.functional.pad(x, (0, 0, 0, 0, 2, 2)), weight, padding=(0, 1, 1))
    if pending is not None:
        sums[:, :, :2] += pending.transpose(1, 2)
    out = sums[:, :, :T] if bias is None else sums[:, :, :T] + bias.view(-1, 1, 1, 1)
    return out, sums[:, :, T:].transpose(1, 2)
