"""Nearest 2x upsampling + 3x3 conv (padding 1) of channels-last frames as one implicit GEMM: the Wan VAE decoder's
spatial upsamplers.

Output pixel (2i + a, 2j + b) of the conv of the upsampled frame reads input rows (i - 1, i) for a = 0 and (i, i + 1)
for a = 1 (columns alike), so each phase (a, b) is a 2x2 conv of the input whose taps are sums of the 3x3 taps
(`phase_weights`): 2.25x fewer multiply-adds than convolving the upsampled frame. cuDNN can run the four phases as one
conv with 4 O outputs into a (N, 4 O, H + 1, W + 1) phase tensor, which a second pass then moves to the interleaved
positions, adding the bias: in an 81-frame decode on an H100 the phase convs took about 20 ms (432-568 TFLOP/s) and
the interleave pass (a Triton kernel then), which reads and writes the whole output once more, 6.6 ms. Here a program
owns a tile of input positions, one phase and a block of output channels, sums the phase's 4 taps x C inputs in fp32
registers, and writes each position's channel vector straight to its place in the (2H, 2W) output with the bias
added, so neither the phase tensor nor the interleave pass exists.

A tile is BLOCK_H x BLOCK_W input positions of one frame, so tap (u, v) of phase (a, b) reads the input block shifted
by (a + u - 1, b + v - 1): one TMA load (`TensorDescriptor` over (N, H, W, C)) whose out-of-frame rows and columns
come back as zeros, the conv's padding. The (1, BLOCK_H, BLOCK_W, BLOCK_K) box is read as the (BLOCK_H * BLOCK_W,
BLOCK_K) A tile of the GEMM. The phase weights are a (phase, u, v, C, O) tap-major matrix, a copy kept per weight
(`phase_taps`). As in `kernels.conv3d`, 96 and 192 output channels are covered by two accumulators (64 + 32,
128 + 64) sharing every input tile, so no MMA work is spent on padding. (Triton 3.6 loads that box into shared memory
and reshapes it in registers, so wgmma takes A from registers; the weight tile from shared memory.)

H100, Triton 3.6, bf16, 12 frames, against the cuDNN phase conv + the Triton interleave pass on the same machine:
60x104 384 -> 192 0.296 against 0.468 ms (598 TFLOP/s counting the 2x2 phases' MACs), 120x208 384 -> 192 1.165
against 1.639 ms (607), 240x416 192 -> 96 1.579 against 2.291 ms (447): 1.41-1.58x (benchmarks/RESULTS.md).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ._launch import channel_blocks, check_tensors, k_block, kept_per_weight, pow2

__all__ = ["phase_taps", "phase_weights", "upsample2x_conv2d", "upsample2x_conv2d_reference"]


@triton.jit
def _upsample2x_conv_kernel(
    x_desc, w_desc, w2_desc, bias_ptr, out_ptr,
    H, W, CO, tiles_w, blocks_n,
    son, soh, sow,
    C: tl.constexpr, HAS_BIAS: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N2: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    """grid = (tiles * blocks_n * 4, N): phase (a, b) (fastest, so a tile's four phases run together and share its
    input in L2), output channels [n0, n0 + BLOCK_N + BLOCK_N2) in two accumulators (BLOCK_N2 = 0: one), a
    BLOCK_H x BLOCK_W tile of input positions (i, j) of frame n; out[n, :, 2i + a, 2j + b] is written."""
    pid = tl.program_id(0)
    n = tl.program_id(1)
    phase = pid % 4
    pa = phase // 2
    pb = phase % 2
    n0 = (pid // 4) % blocks_n * (BLOCK_N + BLOCK_N2)
    tile = pid // (4 * blocks_n)
    i0 = (tile // tiles_w) * BLOCK_H
    j0 = (tile % tiles_w) * BLOCK_W
    acc = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_N), dtype=tl.float32)
    acc2 = acc  # unused unless BLOCK_N2 > 0
    if BLOCK_N2 > 0:
        acc2 = tl.zeros((BLOCK_H * BLOCK_W, BLOCK_N2), dtype=tl.float32)
    for s in range(4 * C // BLOCK_K):  # C % BLOCK_K == 0: a K block never straddles two taps
        tap = (s * BLOCK_K) // C
        c0 = (s * BLOCK_K) % C
        a = x_desc.load([n, i0 + pa + tap // 2 - 1, j0 + pb + tap % 2 - 1, c0])
        a = a.reshape(BLOCK_H * BLOCK_W, BLOCK_K)
        k = phase * 4 * C + s * BLOCK_K
        acc = tl.dot(a, w_desc.load([k, n0]), acc, input_precision=PRECISION)
        if BLOCK_N2 > 0:
            acc2 = tl.dot(a, w2_desc.load([k, n0 + BLOCK_N]), acc2, input_precision=PRECISION)

    p = tl.arange(0, BLOCK_H * BLOCK_W)
    i = i0 + p // BLOCK_W
    j = j0 + p % BLOCK_W
    inside = (i < H) & (j < W)
    pix = n.to(tl.int64) * son + (2 * i + pa).to(tl.int64) * soh + (2 * j + pb).to(tl.int64) * sow
    _store(acc, n0 + tl.arange(0, BLOCK_N), inside, pix, bias_ptr, out_ptr, CO, HAS_BIAS)
    if BLOCK_N2 > 0:
        _store(acc2, n0 + BLOCK_N + tl.arange(0, BLOCK_N2), inside, pix, bias_ptr, out_ptr, CO, HAS_BIAS)


@triton.jit
def _store(acc, offs_n, inside, pix, bias_ptr, out_ptr, CO, HAS_BIAS: tl.constexpr):
    """acc (+ bias[channel]) rounded once to out's dtype, stored at the positions inside the frame."""
    mask_n = offs_n < CO
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    mask = inside[:, None] & mask_n[None, :]
    tl.store(out_ptr + pix[:, None] + offs_n[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)


def _phase_sums(k: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A 3-tap kernel along `dim` as the two 2-tap kernels of the upsampled conv's even and odd outputs."""
    t0, t1, t2 = k.unbind(dim)
    return torch.stack([t0, t1 + t2], dim), torch.stack([t0 + t1, t2], dim)


def phase_weights(weight: torch.Tensor) -> torch.Tensor:
    """A 3x3 conv weight (O, C, 3, 3) as the 2x2 kernels of the four phases (a, b) of the conv of the 2x nearest
    upsampled input, (4, O, C, 2, 2) with phase 2a + b first: sums of 3x3 taps, in fp32 (or the weight's wider
    dtype; differentiable)."""
    w = weight.to(torch.promote_types(weight.dtype, torch.float32))
    return torch.stack([kb for ka in _phase_sums(w, 2) for kb in _phase_sums(ka, 3)])


@kept_per_weight
def phase_taps(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`phase_weights` as the (4 phases * 2 * 2 taps * C, O) matrix in `dtype` the kernel reads: phase (a, b) =
    2a + b, tap (u, v), channel c at row ((2a + b) * 4 + 2u + v) * C + c, rounded once (a copy kept per weight,
    `kept_per_weight`)."""
    w4 = phase_weights(weight.detach())  # (4, O, C, 2, 2)
    return w4.to(dtype).permute(0, 3, 4, 2, 1).reshape(16 * weight.shape[1], weight.shape[0]).contiguous()


def _tile_width(H: int, W: int, block_m: int) -> int:
    """BLOCK_W for a frame: of 16, 8, 32 (at most block_m) the one whose tiles cover the fewest positions outside the
    frame, 16 on a tie. H100, bf16, 12 frames: 60x104 (384 -> 192) 0.296 ms at 8 wide against 0.323 at 16 (13 tiles
    of 8 cover a row exactly); 120x208 1.165 ms at 16 against 1.216 at 8; 240x416 (192 -> 96) 1.58 ms at 8, 16, 32."""
    def covered(bw: int) -> int:
        bh = block_m // bw
        return triton.cdiv(H, bh) * bh * triton.cdiv(W, bw) * bw

    return min((bw for bw in (16, 8, 32) if bw <= block_m), key=covered)


def _dense_channels_last(x: torch.Tensor) -> bool:
    """Whether x (N, C, H, W) has channel stride 1 and dense positions within a frame (size-1 dims aside) and frames
    that start on channel-vector boundaries, as the TMA descriptor over (N, H, W, C) reads it."""
    n, c, h, w = x.shape
    return (x.stride(1) == 1 and (w == 1 or x.stride(3) == c) and (h == 1 or x.stride(2) == w * c)
            and (n == 1 or x.stride(0) % c == 0))


def upsample2x_conv2d(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    out: torch.Tensor | None = None,
    block_m: int = 128,
    block_w: int | None = None,
    num_warps: int = 4,
    num_stages: int = 2,
) -> torch.Tensor:
    """conv2d(nearest 2x upsampling of x, weight, bias, padding=1) without the upsampled input or a phase tensor.

    x: (N, C, H, W) channels-last (channel stride 1, each frame's positions dense), float16, bfloat16 or float32,
    C a multiple of 16. weight: (O, C, 3, 3), O a multiple of 16, read as its 2x2 phase taps (`phase_taps`: summed
    in fp32, rounded to x's dtype). bias: O values or None. out: (N, O, 2H, 2W) with channel stride 1 (any other
    strides, e.g. a slice of a larger buffer), by default new, channels-last, in x's dtype. Each value is its
    phase's 4 C products summed in fp32 (IEEE products for float32 inputs, not tf32), plus the bias, rounded once.
    ``block_m`` (input positions per program), ``block_w`` (of which along a row; by default the width of 16, 8, 32
    whose tiles fit the frame best), ``num_warps``, ``num_stages``: launch settings, for tuning. Returns ``out``.

    Two pipeline stages: with three (Triton 3.6, H100) the 384-channel upsamplers' results changed from run to run
    whenever another stream kept the GPU busy (the decoder beside the generator: the streamed frames were not
    reproducible), with two or four they never did; two cost 0.15 ms on a 12-frame 120x208 chunk (1.30 against
    1.15 ms; benchmarks/results/upsample_race_session15.txt).
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (N, C, H, W), got {tuple(x.shape)}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be float16, bfloat16 or float32, got {x.dtype}")
    N, C, H, W = x.shape
    if weight.dim() != 4 or weight.shape[1] != C or weight.shape[2:] != (3, 3):
        raise ValueError(f"weight must be (O, {C}, 3, 3) for x with {C} channels, got {tuple(weight.shape)}")
    CO = weight.shape[0]
    if C % 16 or CO % 16:
        raise ValueError(f"input and output channels must be multiples of 16, got {C} and {CO}")
    if not _dense_channels_last(x):
        raise ValueError(f"x must be channels-last with dense positions (strides (*, 1, {W * C}, {C})), got "
                         f"{x.stride()}")
    if bias is not None and bias.numel() != CO:
        raise ValueError(f"bias must hold {CO} values, got shape {tuple(bias.shape)}")
    shape = (N, CO, 2 * H, 2 * W)
    if out is not None and (out.shape != shape or out.stride(1) != 1):
        raise ValueError(f"out must be {shape} with channel stride 1, got {tuple(out.shape)} {out.stride()}")
    block_w = _tile_width(H, W, block_m) if block_w is None else block_w
    if block_m < 16 or block_m != pow2(block_m) or block_w != pow2(block_w) or block_m % block_w:
        raise ValueError(f"block_m must be a power of two >= 16 and block_w a power of two dividing it, got "
                         f"{block_m} and {block_w}")
    block_n, block_n2 = channel_blocks(CO)
    block_k = k_block(C, 128 // x.element_size())  # in at most 128-byte rows (32 channels of fp32)
    if out is None:
        out = torch.empty(shape, dtype=x.dtype, device=x.device, memory_format=torch.channels_last)
    taps = phase_taps(weight, x.dtype)
    check_tensors(x, taps, bias, out)
    if out.numel() == 0:
        return out
    block_h = block_m // block_w
    x_desc = TensorDescriptor(x, [N, H, W, C], [x.stride(0) if N > 1 else H * W * C, W * C, C, 1],
                              [1, block_h, block_w, block_k])
    w_descs = [TensorDescriptor(taps, list(taps.shape), [CO, 1], [block_k, n]) for n in (block_n, block_n2 or block_n)]
    tiles_w = triton.cdiv(W, block_w)
    blocks_n = triton.cdiv(CO, block_n + block_n2)
    grid = (triton.cdiv(H, block_h) * tiles_w * blocks_n * 4, N)
    _upsample2x_conv_kernel[grid](
        x_desc, *w_descs, bias.reshape(CO) if bias is not None else taps, out,
        H, W, CO, tiles_w, blocks_n,
        out.stride(0), out.stride(2), out.stride(3),
        C=C, HAS_BIAS=bias is not None, PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # 16-bit: ignored
        BLOCK_H=block_h, BLOCK_W=block_w, BLOCK_N=block_n, BLOCK_N2=block_n2, BLOCK_K=block_k,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out


def upsample2x_conv2d_reference(x: torch.Tensor, weight: torch.Tensor,
                                bias: torch.Tensor | None = None) -> torch.Tensor:
    """Plain torch :func:`upsample2x_conv2d`: nearest 2x upsampling, then the 3x3 conv with padding 1, in the
    inputs' dtype."""
    up = torch.nn.functional.interpolate(x, scale_factor=2, mode="nearest")
    return torch.nn.functional.conv2d(up, weight, bias, padding=1)
