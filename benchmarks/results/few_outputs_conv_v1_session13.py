"""[The first version of `kernels.few_outputs_conv` (commit 7fe579c, a tile of consecutive positions loading each of
the 9 spatial taps), kept as the baseline of `rgb_tiles_ab_session13.py`; only its import of `check_tensors` made
absolute. The rest of this docstring is that version's.]

Causal 3x3x3 convolution to a few output channels (the Wan VAE decoder's RGB conv_out) as one pass over the frames.

The decoder's last conv takes 96 channels to 3 at full resolution (480 x 832), chunk by chunk. cuDNN runs it as
`streamgen.vae.few_outputs_by_frames`: one conv2d with kt * O = 9 outputs per frame (each input frame read once), then
torch adds the time taps into partial sums. In an H100 profile of an 81-frame decode that is ~9 ms of conv plus ~2 ms
of sums, while reading the input (96 channels, bf16) is ~2 ms of memory traffic: the motivation for this kernel.

One program owns BLOCK_M consecutive positions of the zero-ring padded frame (row-major, as `kernels.conv3d`'s implicit
GEMM: each 3x3 spatial tap of the tile is BLOCK_M consecutive rows of the (positions, C) matrix shifted by dh * (W + 2)
+ dw, one TMA tile load per tap and K block) and walks the chunk's frames in order: each frame is loaded by one program
once, not once per time tap. Per frame one tl.dot with N = 16 columns computes all three time taps of all (up to 4)
outputs, column 4 * o + k being weight[o, :, k] (one dot, not three: the input tile is read from shared memory once, and
shared-memory bandwidth is what bounds these convs on an H100). The three taps' parts are then rolled through two
partial sums: output t = p1 + tap2(t); p1 <- p2 + tap1(t); p2 <- tap0(t). Between chunks the two partial sums are
`pending`: what earlier chunks' frames contributed to this chunk's first two outputs, 2 x O fp32 values a pixel instead
of 2 input frames of C channels.

Measured on an H100 (bf16, 12 frames at 480x832, 96 -> 3; benchmarks/RESULTS.md): 1.49 ms against 1.60 for cuDNN's
9-output conv2d and the tap sums, 0.66 TB/s of the input's bytes: far from the copy rate, because each input tile
comes from L2 nine times (once per spatial tap; a 3x3 tap's rows are a frame row apart, so no program holds them
all), and that traffic, not the memory, bounds it.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.utils.weak import WeakIdKeyDictionary
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels._launch import check_tensors

__all__ = ["MAX_OUTPUTS", "few_outputs_conv3d", "few_outputs_conv3d_reference", "few_outputs_taps"]

MAX_OUTPUTS = 4
"""Output channels one program holds: 4 outputs x 4 time-tap columns (3 used) = the dot's N = 16."""


@triton.jit
def _few_outputs_kernel(
    x_desc, w_desc, bias_ptr, pending_ptr, new_ptr, out_ptr,
    T, H, W, CO, rows_b,
    spb, sps, spo, sph, spw,
    snb, sns, sno, snh, snw,
    sob, soo, sot, soh, sow,
    C: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_PENDING: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """grid = (cdiv(HP * WP, BLOCK_M), B): BLOCK_M consecutive positions of the padded frame (HP x WP, row-major) of
    batch b, through all T frames. Positions on the ring are computed and not stored."""
    b = tl.program_id(1)
    WP = W + 2
    FP = (H + 2) * WP
    p0 = tl.program_id(0) * BLOCK_M
    p = p0 + tl.arange(0, BLOCK_M)
    h = p // WP - 1
    w = p % WP - 1
    inside = (p < FP) & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    offs_o = tl.arange(0, 4)
    mask = inside[:, None] & (offs_o < CO)[None, :]
    h64 = h.to(tl.int64)
    w64 = w.to(tl.int64)
    b64 = b.to(tl.int64)

    p1 = tl.zeros((BLOCK_M, 4), dtype=tl.float32)  # partial sums of the next output and the one after
    p2 = p1
    if HAS_PENDING:
        pending = pending_ptr + (b64 * spb + h64 * sph + w64 * spw)[:, None] + offs_o[None, :] * spo
        p1 = tl.load(pending, mask=mask, other=0.0)
        p2 = tl.load(pending + sps, mask=mask, other=0.0)
    bias = tl.zeros((4,), dtype=tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_o, mask=offs_o < CO, other=0.0).to(tl.float32)
    out = out_ptr + (b64 * sob + h64 * soh + w64 * sow)[:, None] + offs_o[None, :] * soo

    row0 = b * rows_b + p0 - WP - 1  # spatial tap (0, 0) of the tile's first position in frame 0
    for t in range(T):
        acc = tl.zeros((BLOCK_M, 16), dtype=tl.float32)
        for i in range(9 * C // BLOCK_K):  # C % BLOCK_K == 0: a K block never straddles two spatial taps
            tap = (i * BLOCK_K) // C
            a = x_desc.load([row0 + t * FP + (tap // 3) * WP + tap % 3, (i * BLOCK_K) % C])
            acc = tl.dot(a, w_desc.load([i * BLOCK_K, 0]), acc, input_precision="ieee")
        # column 4 * o + k: as (o, k // 2, k % 2), split k % 2 then k // 2
        even, odd = tl.split(tl.reshape(acc, (BLOCK_M, 4, 2, 2)))
        tap0, tap2 = tl.split(even)
        tap1, _ = tl.split(odd)
        tl.store(out, (p1 + tap2 + bias[None, :]).to(out_ptr.dtype.element_ty), mask=mask)
        out += sot
        p1 = p2 + tap1
        p2 = tap0

    new = new_ptr + (b64 * snb + h64 * snh + w64 * snw)[:, None] + offs_o[None, :] * sno
    tl.store(new, p1, mask=mask)
    tl.store(new + sns, p2, mask=mask)


_TAPS = WeakIdKeyDictionary()  # weight -> ((its storage, version counter, dtype), tap-major copy)


def few_outputs_taps(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A weight (CO, C, 3, 3, 3) as the (9 * C, 16) matrix in `dtype` the kernel reads: row (3 * dh + dw) * C + c,
    column 4 * o + k = weight[o, c, k, dh, dw], the other columns zero. A copy, kept while the weight lives with the
    same storage and version counter (as `kernels.conv3d.tap_major`), so a decode does not copy it at every chunk."""
    key = (weight.data_ptr(), weight._version, dtype)
    kept = _TAPS.get(weight)
    if kept is not None and kept[0] == key:
        return kept[1]
    o, c = weight.shape[:2]
    taps = torch.zeros((3, 3, c, MAX_OUTPUTS, 4), dtype=dtype, device=weight.device)
    taps[:, :, :, :o, :3] = weight.detach().permute(3, 4, 1, 0, 2)  # (dh, dw, c, o, k)
    taps = taps.view(9 * c, 16)
    _TAPS[weight] = (key, taps)
    return taps


def few_outputs_conv3d(
    frames: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    pending: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    block_m: int = 128,
    num_warps: int = 4,
    num_stages: int = 3,
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
    ``block_m``, ``num_warps``, ``num_stages``: launch settings. Returns (out, new pending): the pending sums for the
    next chunk, new fp32 (B, 2, CO, H, W) with channels innermost (a (B, 2, H, W, CO) tensor's permuted view).
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
    dense = (HP * WP * C, WP * C, C, 1)
    if frames.stride()[1:] != dense or frames.stride(0) % C:
        raise ValueError(f"frames must be dense padded frames (strides (*, {dense}), batch stride a multiple of {C}), "
                         f"got {frames.stride()}")
    if pending is not None and (pending.shape != (B, 2, CO, H, W) or pending.dtype != torch.float32):
        raise ValueError(f"pending must be float32 {(B, 2, CO, H, W)}, got {pending.dtype} {tuple(pending.shape)}")
    if out is not None and (out.shape != (B, CO, T, H, W) or out.dtype not in (torch.float32, frames.dtype)):
        raise ValueError(f"out must be {(B, CO, T, H, W)} of float32 or {frames.dtype}, got {out.dtype} "
                         f"{tuple(out.shape)}")
    if bias is not None and bias.numel() != CO:
        raise ValueError(f"bias must hold {CO} values, got shape {tuple(bias.shape)}")
    taps = few_outputs_taps(weight, frames.dtype)
    if out is None:
        out = torch.empty((B, CO, T, H, W), dtype=torch.float32, device=frames.device)
    new = torch.empty((B, 2, H, W, CO), dtype=torch.float32, device=frames.device).permute(0, 1, 4, 2, 3)
    check_tensors(frames, taps, bias, pending, out)
    block_k = next(k for k in (64, 32, 16) if C % k == 0)
    # the frames as (rows, C): batch b's frame t, padded position p is row b * stride(0) / C + t * HP * WP + p
    x_desc = TensorDescriptor(frames, [(B - 1) * frames.stride(0) // C + T * HP * WP, C], [C, 1], [block_m, block_k])
    w_desc = TensorDescriptor(taps, [9 * C, 16], [16, 1], [block_k, 16])
    pend = pending if pending is not None else new
    _few_outputs_kernel[(triton.cdiv(HP * WP, block_m), B)](
        x_desc, w_desc, bias if bias is not None else taps, pend, new, out,
        T, H, W, CO, frames.stride(0) // C,
        *pend.stride(), *new.stride(), *out.stride(),
        C=C, HAS_BIAS=bias is not None, HAS_PENDING=pending is not None, BLOCK_M=block_m, BLOCK_K=block_k,
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
