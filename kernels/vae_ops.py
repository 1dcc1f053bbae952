"""Wan VAE channel RMS norm, optionally fused with the SiLU that follows it, for (B, C, *positions) activations.

Wan's VAE normalises each position's channel vector, ``x / max(||x||_2, eps) * sqrt(C) * gamma (+ bias)``, and in
its residual blocks and output heads feeds the result through SiLU into a causal conv. Eager torch spends about
five passes over the activations on this (norm, divide, two products, SiLU, each a full read and write in the
activation dtype); the kernel reads x once and writes the result once, with the math in fp32.

Layout: the reduction runs over C, which in a channels-first (B, C, T, H, W) tensor has stride T*H*W. A program
owns a tile of ``BLOCK_P`` positions x all channels, so each channel row of the tile is a contiguous run of
positions (coalesced loads and stores) and the statistic never leaves registers. The position dims are flattened
into (N, P) lines per tensor (``_position_lines``), which covers contiguous tensors, time slices of a larger buffer
(the frames after a causal conv's cached past), frame-major views (B, T, C, H, W).transpose(1, 2), and channels-last
tensors (there the channel stride is 1 and the tile is one contiguous block). Input and output strides are
independent, so the result can be written straight into a slice of a preallocated buffer.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import triton
import triton.language as tl

from ._launch import check_tensors, pow2

__all__ = ["add_n", "channel_rms_norm", "channel_rms_norm_reference"]

_MAX_GRID_YZ = 65535


@triton.jit
def _channel_rms_norm_kernel(
    x_ptr, a1_ptr, a2_ptr, shift_ptr, gamma_ptr, bias_ptr, out_ptr,
    C, P, scale, eps,
    stride_xb, stride_xc, stride_xn, stride_xp,
    stride_1b, stride_1c, stride_1n, stride_1p,
    stride_2b, stride_2c, stride_2n, stride_2p,
    stride_ob, stride_oc, stride_on, stride_op,
    ADDENDS: tl.constexpr, HAS_SHIFT: tl.constexpr, HAS_BIAS: tl.constexpr, SILU: tl.constexpr,
    BLOCK_C: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """grid = (cdiv(P, BLOCK_P), N, B): one (all channels) x (BLOCK_P positions) tile of line n of batch b; the
    normalised value is x + a1 + a2 (the first ADDENDS of them) + shift[c], summed in fp32."""
    n = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    offs_p = tl.program_id(0).to(tl.int64) * BLOCK_P + tl.arange(0, BLOCK_P)
    mask_c = offs_c < C
    mask = mask_c[:, None] & (offs_p < P)[None, :]
    c64 = offs_c.to(tl.int64)[:, None]

    x_offs = b * stride_xb + n * stride_xn + c64 * stride_xc + offs_p[None, :] * stride_xp
    x = tl.load(x_ptr + x_offs, mask=mask, other=0.0).to(tl.float32)
    if ADDENDS >= 1:
        offs = b * stride_1b + n * stride_1n + c64 * stride_1c + offs_p[None, :] * stride_1p
        x += tl.load(a1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if ADDENDS >= 2:
        offs = b * stride_2b + n * stride_2n + c64 * stride_2c + offs_p[None, :] * stride_2p
        x += tl.load(a2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_SHIFT:
        x += tl.load(shift_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[:, None]
    norm = tl.sqrt(tl.sum(x * x, axis=0))  # (BLOCK_P,): masked channels load as 0
    inv = scale / tl.maximum(norm, eps)
    gamma = tl.load(gamma_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)
    y = x * inv[None, :] * gamma[:, None]
    if HAS_BIAS:
        y += tl.load(bias_ptr + offs_c, mask=mask_c, other=0.0).to(tl.float32)[:, None]
    if SILU:
        y = y * tl.sigmoid(y)

    o_offs = b * stride_ob + n * stride_on + c64 * stride_oc + offs_p[None, :] * stride_op
    tl.store(out_ptr + o_offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def _position_lines(shape: torch.Size, *strides: tuple[int, ...]) -> tuple[int, int, list[tuple[int, int]]] | None:
    """Flatten dims 2.. of tensors of one shape into (N, P) with one (stride_n, stride_p) pair per tensor.

    Neighbouring dims merge where, in every tensor, the outer stride equals the inner size times the inner stride;
    size-1 dims are dropped. None when more than two runs remain (the caller copies to a contiguous layout).
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
    if len(runs) > 2:
        return None
    while len(runs) < 2:
        runs.insert(0, (1, [0] * len(strides)))
    (n, stride_n), (p, stride_p) = runs
    return n, p, list(zip(stride_n, stride_p))


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
    addends: Sequence[torch.Tensor] = (),
    shift: torch.Tensor | None = None,
    block_p: int | None = None,
) -> torch.Tensor:
    """``x / max(||x||, eps) * sqrt(C) * gamma (+ bias)`` over dim 1, then SiLU if ``silu``; fp32 math, one rounding.

    x: (B, C, *positions), any float dtype and strides (typically (B, C, T, H, W) or (B, C, H, W)). gamma, bias:
    C values in any shape ((C, 1, 1, 1) as the VAE stores them). ``out`` (x's shape, any float dtype and strides,
    e.g. a time slice of a conv's input buffer) receives the result; by default a new tensor laid out like x in
    x.dtype. ``addends``: up to two more tensors of x's shape (any strides) added to x, in fp32, before the norm:
    the partial sums of a convolution computed tap by tap, so they are never summed in memory; ``shift``: C values
    added too (that convolution's bias, which cuDNN would add in a pass of its own). ``block_p`` (a power of two)
    overrides the positions per program, for tuning. Returns ``out``.
    """
    if x.dim() < 3:
        raise ValueError(f"x must be (B, C, *positions), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")
    if len(addends) > 2 or any(a.shape != x.shape for a in addends):
        raise ValueError(f"addends must be up to two tensors of x's shape {tuple(x.shape)}, got "
                         f"{[tuple(a.shape) for a in addends]}")
    B, C = x.shape[:2]
    gamma = _per_channel(gamma, C, "gamma")
    bias = _per_channel(bias, C, "bias")
    shift = _per_channel(shift, C, "shift")
    if out is None:
        out = torch.empty_like(x)
    elif out.shape != x.shape or not out.is_floating_point():
        raise ValueError(f"out must be a float tensor of shape {tuple(x.shape)}, got {tuple(out.shape)} {out.dtype}")
    check_tensors(x, gamma, bias, shift, out, *addends)
    if out.numel() == 0:
        return out
    lines = _position_lines(x.shape, x.stride(), *(a.stride() for a in addends), out.stride())
    if lines is None or lines[0] > _MAX_GRID_YZ:  # layouts that do not flatten to lines: via contiguous tensors
        return out.copy_(channel_rms_norm(x.contiguous(), gamma, bias, silu=silu, eps=eps, block_p=block_p,
                                          addends=[a.contiguous() for a in addends], shift=shift))
    if B > _MAX_GRID_YZ:
        raise ValueError(f"batch {B} exceeds the launch grid ({_MAX_GRID_YZ})")
    N, P, line_strides = lines
    (sxn, sxp), (son, sop) = line_strides[0], line_strides[-1]
    extra = [(a, a.stride(0), a.stride(1), *st) for a, st in zip(addends, line_strides[1:-1])]
    extra += [(x, 0, 0, 0, 0)] * (2 - len(extra))  # unused slots
    block_c = pow2(C)
    if block_p is None:  # ~8K fp32 values per program (16K from C > 256): 32+ positions keep 64-byte row segments
        block_p = min(max(8192 // block_c, 32), pow2(P))
    num_warps = min(max(block_c * block_p // 1024, 4), 16)
    _channel_rms_norm_kernel[(triton.cdiv(P, block_p), N, B)](
        x, extra[0][0], extra[1][0], gamma if shift is None else shift, gamma, gamma if bias is None else bias, out,
        C, P, float(C) ** 0.5, float(eps),
        x.stride(0), x.stride(1), sxn, sxp,
        *extra[0][1:], *extra[1][1:],
        out.stride(0), out.stride(1), son, sop,
        ADDENDS=len(addends), HAS_SHIFT=shift is not None, HAS_BIAS=bias is not None, SILU=silu, BLOCK_C=block_c,
        BLOCK_P=block_p, num_warps=num_warps,
    )
    return out


@triton.jit
def _add_n_kernel(out_ptr, a_ptr, b_ptr, c_ptr, d_ptr, bias_ptr, n, C, INPUTS: tl.constexpr, HAS_BIAS: tl.constexpr,
                  BLOCK: tl.constexpr):
    """out = a + b (+ c (+ d)) (+ bias[channel]) over n elements of equally laid out dense tensors, summed in fp32;
    channels are the innermost dim when there is a bias."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    acc = tl.load(a_ptr + offs, mask=mask).to(tl.float32) + tl.load(b_ptr + offs, mask=mask).to(tl.float32)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % C, mask=mask).to(tl.float32)
    if INPUTS >= 3:
        acc += tl.load(c_ptr + offs, mask=mask).to(tl.float32)
    if INPUTS >= 4:
        acc += tl.load(d_ptr + offs, mask=mask).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


def _dense(t: torch.Tensor) -> bool:
    """Elements fill exactly numel() consecutive slots (so equal strides mean equal layouts)."""
    formats = {4: [torch.channels_last], 5: [torch.channels_last_3d]}.get(t.dim(), [])
    return any(t.is_contiguous(memory_format=f) for f in [torch.contiguous_format, *formats])


def add_n(inputs: Sequence[torch.Tensor], out: torch.Tensor | None = None,
          bias: torch.Tensor | None = None) -> torch.Tensor:
    """Sum of 2 to 4 tensors of one shape (B, C, ...), plus ``bias`` (C values) over dim 1 if given, into ``out``
    (may be one of the inputs; default: a new tensor like the first), in fp32 with one rounding: the partial sums
    of a convolution computed tap by tap, its bias and a residual, read once each instead of one pass per pair.
    One flat pass when all are dense with the same strides (and channels innermost, with a bias); else torch."""
    if not 2 <= len(inputs) <= 4 or any(t.shape != inputs[0].shape for t in inputs):
        raise ValueError(f"add_n sums 2 to 4 tensors of one shape, got {[tuple(t.shape) for t in inputs]}")
    out = torch.empty_like(inputs[0]) if out is None else out
    if out.shape != inputs[0].shape:
        raise ValueError(f"out must have shape {tuple(inputs[0].shape)}, got {tuple(out.shape)}")
    C = out.shape[1] if out.dim() > 1 else 1
    bias = _per_channel(bias, C, "bias")
    check_tensors(out, bias, *inputs)
    flat = all(_dense(t) and t.stride() == out.stride() for t in (out, *inputs))
    if not flat or (bias is not None and C > 1 and out.stride(1) != 1):
        total = inputs[0].float()
        for t in inputs[1:]:
            total = total + t.float()
        if bias is not None:
            total = total + bias.float().view(-1, *(1,) * (out.dim() - 2))
        return out.copy_(total)
    n = out.numel()
    block = 4096
    padded = list(inputs) + [inputs[0]] * (4 - len(inputs))
    _add_n_kernel[(triton.cdiv(n, block),)](out, *padded, out if bias is None else bias, n, C, INPUTS=len(inputs),
                                            HAS_BIAS=bias is not None, BLOCK=block, num_warps=8)
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
