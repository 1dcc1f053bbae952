"""Wan VAE channel RMS norm, optionally fused with the SiLU that follows it, for (B, C, *positions) activations; and
the row softmax of the mid block's attention scores (`scaled_softmax`).

Wan's VAE normalises each position's channel vector, ``x / max(||x||_2, eps) * sqrt(C) * gamma (+ bias)``, and in
its residual blocks and output heads feeds the result through SiLU into a causal conv. Eager torch spends about
five passes over the activations on this (norm, divide, two products, SiLU, each a full read and write in the
activation dtype); the kernel reads x once and writes the result once, with the math in fp32.

Layout: the reduction runs over C, which in a channels-first (B, C, T, H, W) tensor has stride T*H*W. A program
owns a tile of ``BLOCK_P`` positions x all channels, so each channel row of the tile is a contiguous run of
positions (coalesced loads and stores) and the statistic never leaves registers. The position dims are flattened
into (M, N, P) runs per tensor (``_position_runs``), which covers contiguous tensors, time slices of a larger buffer
(the frames after a causal conv's cached past), the inside of zero-padded frames (each row a run of its own),
frame-major views (B, T, C, H, W).transpose(1, 2), and channels-last tensors (there the channel stride is 1 and the
tile is one contiguous block). Input and output strides are independent, so the result can be written straight into
a slice of a preallocated buffer.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_tensors, pow2

__all__ = ["channel_rms_norm", "channel_rms_norm_reference", "scaled_softmax", "scaled_softmax_reference"]

_MAX_GRID_YZ = 65535


@triton.jit
def _channel_rms_norm_kernel(
    x_ptr, gamma_ptr, bias_ptr, out_ptr,
    C, P, M, scale, eps,
    stride_xb, stride_xc, stride_xm, stride_xn, stride_xp,
    stride_ob, stride_oc, stride_om, stride_on, stride_op,
    HAS_BIAS: tl.constexpr, SILU: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """grid = (cdiv(P, BLOCK_P), N, B * M): one (all channels) x (BLOCK_P positions) tile of line (m, n) of batch b."""
    n = tl.program_id(1).to(tl.int64)
    b = (tl.program_id(2) // M).to(tl.int64)
    m = (tl.program_id(2) % M).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_c = offs_c < C
    mask = mask_c[:, None] & (offs_p < P)[None, :]
    c64 = offs_c.to(tl.int64)[:, None]

    x_offs = b * stride_xb + m * stride_xm + n * stride_xn + c64 * stride_xc + offs_p[None, :] * stride_xp
    x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    norm = tl.sqrt(tl.sum(x * x, axis=0))  # (BLOCK_P,): masked channels load as 0
    inv = scale / tl.maximum(norm, eps)
    gamma = tl.load(gamma_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    y = x * inv[None, :] * gamma[:, None]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[:, None]
    if SILU:
        y = y * tl.sigmoid(y)

    o_offs = b * stride_ob + m * stride_om + n * stride_on + c64 * stride_oc + offs_p[None, :] * stride_op
    tl.store(out_ptr + o_offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _position_runs(shape: torch.Size, *strides: tuple[int, ...]) -> tuple[list[int], list[list[int]]] | None:
    """Flatten dims 2.. of tensors of one shape into three runs (M, N, P), with one stride per run and tensor.

    Neighbouring dims merge where, in every tensor, the outer stride equals the inner size times the inner stride;
    size-1 dims are dropped. None when more than three runs remain (the caller copies to a contiguous layout).
    """
    runs: list[tuple[int, list[int]]] = []
    for d in range(2, len(shape)):
        if shape[d] == 1:
            continue
        inner = [s[d] for s in strides]
        if runs and all(outer == shape[d] * s for outer, s in zip(runs[-1][1], inner)):
            runs[-1] = (runs[-1][0] * shape[d], inner)
        else:
            runs.append((shape[d], inner))
    if len(runs) > 3:
        return None
    while len(runs) < 3:
        runs.insert(0, (1, [0] * len(strides)))
    return [size for size, _ in runs], [list(per_tensor) for per_tensor in zip(*(st for _, st in runs))]


def _per_channel(v: torch.Tensor | None, C: int, name: str) -> torch.Tensor | None:
    """gamma / bias of any shape holding C values ((C,), (C, 1, 1), (C, 1, 1, 1)) -> a (C,) view or copy."""
    if v is None:
        return None
    if v.numel() != C:
        raise ValueError(f"{name} must hold one value per channel (C={C}), got shape {tuple(v.shape)}")
    return v.reshape(C)


def channel_rms_norm(
    x: torch.Tensor,
    gamma: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    silu: bool = False,
    eps: float = 1e-12,
    out: torch.Tensor | None = None,
    block_p: int | None = None,
) -> torch.Tensor:
    """``x / max(||x||, eps) * sqrt(C) * gamma (+ bias)`` over dim 1, then SiLU if ``silu``; fp32 math, one rounding.

    x: (B, C, *positions), any float dtype and strides (typically (B, C, T, H, W) or (B, C, H, W)). gamma, bias:
    C values in any shape ((C, 1, 1, 1) as the VAE stores them). ``out`` (x's shape, any float dtype and strides,
    e.g. the inside of a conv's zero-padded input buffer) receives the result; by default a new tensor laid out
    like x in x.dtype. ``block_p`` (a power of two) overrides the positions per program, for tuning. Returns ``out``.
    """
    if x.dim() < 3:
        raise ValueError(f"x must be (B, C, *positions), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")
    B, C = x.shape[:2]
    gamma = _per_channel(gamma, C, "gamma")
    bias = _per_channel(bias, C, "bias")
    if out is None:
        out = torch.empty_like(x)
    elif out.shape != x.shape or not out.is_floating_point():
        raise ValueError(f"out must be a float tensor of shape {tuple(x.shape)}, got {tuple(out.shape)} {out.dtype}")
    check_tensors(x, gamma, bias, out)
    if out.numel() == 0:
        return out
    runs = _position_runs(x.shape, x.stride(), out.stride())
    if runs is None or runs[0][1] > _MAX_GRID_YZ or B * runs[0][0] > _MAX_GRID_YZ:  # via contiguous tensors
        return out.copy_(channel_rms_norm(x.contiguous(), gamma, bias, silu=silu, eps=eps, block_p=block_p))
    (M, N, P), (x_strides, out_strides) = runs
    block_c = pow2(C)
    if block_p is None:  # ~8K fp32 values per program (16K from C > 256): 32+ positions keep 64-byte row segments
        block_p = min(max(8192 // block_c, 32), pow2(P))
    num_warps = min(max(block_c * block_p // 1024, 4), 16)
    _channel_rms_norm_kernel[(triton.cdiv(P, block_p), N, B * M)](
        x, gamma, gamma if bias is None else bias, out,
        C, P, M, float(C) ** 0.5, float(eps),
        x.stride(0), x.stride(1), *x_strides,
        out.stride(0), out.stride(1), *out_strides,
        HAS_BIAS=bias is not None, SILU=silu, BLOCK_C=block_c, BLOCK_P=block_p, num_warps=num_warps,
    )
    return out


def channel_rms_norm_reference(
    x: torch.Tensor,
    gamma: torch.Tensor,
    bias: torch.Tensor | None = None,
    *,
    silu: bool = False,
    eps: float = 1e-12,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Plain torch version of :func:`channel_rms_norm` (the VAE's ``RMSNorm``, then SiLU), out in x.dtype.

    Math in the wider of x.dtype and ``compute_dtype``: fp64 inputs give the ground truth for tests.
    """
    C = x.shape[1]
    cd = torch.promote_types(x.dtype, compute_dtype)
    shape = (C,) + (1,) * (x.dim() - 2)
    y = torch.nn.functional.normalize(x.to(cd), dim=1, eps=eps) * C**0.5 * gamma.to(cd).reshape(shape)
    if bias is not None:
        y = y + bias.to(cd).reshape(shape)
    if silu:
        y = torch.nn.functional.silu(y)
    return y.to(x.dtype)


@triton.jit
def _scaled_softmax_kernel(s_ptr, p_ptr, N, scale, stride_s, stride_p, BLOCK: tl.constexpr):
    """grid = (rows,): one whole row per program."""
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    s = tl.load(s_ptr + row * stride_s + offs, mask=offs < N, other=-float("inf")).to(tl.float32) * scale
    e = tl.exp(s - tl.max(s, axis=0))
    tl.store(p_ptr + row * stride_p + offs, (e / tl.sum(e, axis=0)).to(p_ptr.dtype.element_ty), mask=offs < N)


SOFTMAX_MAX_ROW = 16384
"""Longest row `scaled_softmax` takes: one program holds a whole row in registers."""


def scaled_softmax(scores: torch.Tensor, scale: float, out: torch.Tensor) -> torch.Tensor:
    """``out = softmax(scores * scale)`` over the last dim, in fp32, written in out's dtype: the probabilities of an
    attention whose scores a GEMM made in fp32 (the VAE's mid block at head dim 384, which no flash or cuDNN kernel
    takes), read once and written once in 16 bits where torch's softmax and cast take three passes. scores and out:
    (rows, N) with unit last stride, N <= `SOFTMAX_MAX_ROW`. Returns ``out``."""
    if scores.dim() != 2 or out.shape != scores.shape or scores.stride(1) != 1 or out.stride(1) != 1:
        raise ValueError(f"scores and out must be (rows, N) of one shape with unit last stride, got "
                         f"{tuple(scores.shape)} {scores.stride()} and {tuple(out.shape)} {out.stride()}")
    if scores.shape[1] > SOFTMAX_MAX_ROW:
        raise ValueError(f"rows longer than {SOFTMAX_MAX_ROW} do not fit one program, got {scores.shape[1]}")
    check_tensors(scores, out)
    if out.numel() == 0:
        return out
    block = pow2(scores.shape[1])
    _scaled_softmax_kernel[(scores.shape[0],)](
        scores, out, scores.shape[1], float(scale), scores.stride(0), out.stride(0),
        BLOCK=block, num_warps=min(max(block // 1024, 1), 8),
    )
    return out


def scaled_softmax_reference(scores: torch.Tensor, scale: float, out: torch.Tensor) -> torch.Tensor:
    """Plain torch :func:`scaled_softmax`."""
    return out.copy_(torch.softmax(scores.float() * scale, dim=-1))
