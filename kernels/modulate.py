"""Fused adaLN pieces of a Wan block: ``LayerNorm -> (1 + scale), + shift`` and the gated residual ``x + y * gate``.

Both are memory-bound: the eager versions read and write the (B, L, D) activations several times (upcast, norm,
multiply, add, downcast); the kernels read each input once and write the output once, doing the math in fp32.
One program owns one token row (all D features), so the LayerNorm statistics stay in registers.

The modulation vectors (shift, scale, gate) are per batch row, shared by all L tokens of the call: the engine
calls these once per run of tokens that share a time step.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_tensors, pow2, row_warps

__all__ = [
    "gated_residual",
    "gated_residual_reference",
    "layernorm_modulate",
    "layernorm_modulate_reference",
]


@triton.jit
def _layernorm_modulate_kernel(
    x_ptr, shift_ptr, scale_ptr, out_ptr,
    D, eps,
    stride_xb, stride_xl, stride_xd,
    stride_shb, stride_shd,
    stride_scb, stride_scd,
    stride_ob, stride_ol, stride_od,
    BLOCK_D: tl.constexpr,
):
    """One program per token row (grid = (L, B)): corrected two-pass mean/variance in fp32, then modulate and store."""
    tok = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D

    x = tl.load(x_ptr + b * stride_xb + tok * stride_xl + offs * stride_xd, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(mask, x - mean, 0.0)
    # corrected two-pass: the fp32 sum of D large values misses the mean by ~D*ulp; the centred values are small,
    # so their mean measures (and removes) that error almost exactly. Free in a memory-bound kernel.
    xc = tl.where(mask, xc - tl.sum(xc, axis=0) / D, 0.0)
    var = tl.sum(xc * xc, axis=0) / D
    rstd = tl.rsqrt(var + eps)

    shift = tl.load(shift_ptr + b * stride_shb + offs * stride_shd, mask=mask, other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + b * stride_scb + offs * stride_scd, mask=mask, other=0.0).to(tl.float32)
    y = xc * rstd * (1.0 + scale) + shift
    tl.store(out_ptr + b * stride_ob + tok * stride_ol + offs * stride_od, y.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _gated_residual_kernel(
    x_ptr, y_ptr, gate_ptr, out_ptr,
    D,
    stride_xb, stride_xl, stride_xd,
    stride_yb, stride_yl, stride_yd,
    stride_gb, stride_gd,
    stride_ob, stride_ol, stride_od,
    BLOCK_D: tl.constexpr,
):
    """One program per token row (grid = (L, B)); safe in place (out is x): each element is read before written."""
    tok = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D

    x = tl.load(x_ptr + b * stride_xb + tok * stride_xl + offs * stride_xd, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + b * stride_yb + tok * stride_yl + offs * stride_yd, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(gate_ptr + b * stride_gb + offs * stride_gd, mask=mask, other=0.0).to(tl.float32)
    out = x + y * g
    tl.store(out_ptr + b * stride_ob + tok * stride_ol + offs * stride_od, out.to(out_ptr.dtype.element_ty), mask=mask)


def _per_batch(v: torch.Tensor, batch: int, dim: int, name: str) -> torch.Tensor:
    """Accept (B, D), (B, 1, D), (1, D) or (D,) modulation vectors; return a (B, D) view (stride 0 if broadcast)."""
    if v.dim() == 3 and v.shape[1] == 1:
        v = v[:, 0]
    if v.dim() not in (1, 2) or v.shape[-1] != dim:
        raise ValueError(f"{name} must be (B, D), (B, 1, D) or (D,) with D={dim}, got {tuple(v.shape)}")
    return torch.broadcast_to(v, (batch, dim))


def _check_x(x: torch.Tensor) -> None:
    if x.dim() != 3:
        raise ValueError(f"x must be (B, L, D), got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating tensor, got {x.dtype}")


def layernorm_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float = 1e-6,
                       out: torch.Tensor | None = None) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale) + shift`` (no affine, statistics over D, all math in fp32), in ``x.dtype``.

    x: (B, L, D), any float dtype, any strides. shift, scale: (B, D) (or (B, 1, D) / (D,)), normally fp32,
    one vector per batch row shared by all L tokens. Returns a new contiguous (B, L, D) tensor, or writes ``out``
    (B, L, D) in x.dtype, any strides (a slice of a larger tensor: segments with their own modulation need no
    concatenation) and returns it.
    """
    _check_x(x)
    B, L, D = x.shape
    shift = _per_batch(shift, B, D, "shift")
    scale = _per_batch(scale, B, D, "scale")
    if out is None:
        out = torch.empty((B, L, D), dtype=x.dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(f"out must be {tuple(x.shape)} {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    check_tensors(x, shift, scale, out)
    if out.numel() == 0:
        return out
    block = pow2(D)
    _layernorm_modulate_kernel[(L, B)](
        x, shift, scale, out,
        D, float(eps),
        *x.stride(), *shift.stride(), *scale.stride(), *out.stride(),
        BLOCK_D=block, num_warps=row_warps(block),
    )
    return out


def gated_residual(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """``x + y * gate`` computed in fp32 and rounded once to ``x.dtype``.

    x, y: (B, L, D) (y may have another float dtype, e.g. a projection output); gate: (B, D) (or (B, 1, D) /
    (D,)), normally fp32. ``out`` (B, L, D) in x.dtype receives the result; pass ``out=x`` to update the residual
    stream in place (one read of x and y, one write). Returns the output tensor.
    """
    _check_x(x)
    B, L, D = x.shape
    if y.shape != x.shape:
        raise ValueError(f"y must have the shape of x {tuple(x.shape)}, got {tuple(y.shape)}")
    gate = _per_batch(gate, B, D, "gate")
    if out is None:
        out = torch.empty((B, L, D), dtype=x.dtype, device=x.device)
    elif out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(f"out must be {tuple(x.shape)} {x.dtype}, got {tuple(out.shape)} {out.dtype}")
    check_tensors(x, y, gate, out)
    if out.numel() == 0:
        return out
    block = pow2(D)
    _gated_residual_kernel[(L, B)](
        x, y, gate, out,
        D,
        *x.stride(), *y.stride(), *gate.stride(), *out.stride(),
        BLOCK_D=block, num_warps=row_warps(block),
    )
    return out


def layernorm_modulate_reference(
    x: torch.Tensor,
    shift: torch.Tensor,
    scale: torch.Tensor,
    eps: float = 1e-6,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Plain torch version of :func:`layernorm_modulate`, out in x.dtype.

    Math in the wider of x.dtype and ``compute_dtype``: fp64 inputs give the ground truth for tests, the default
    (fp32) is what the eager engine does.
    """
    B, _, D = x.shape
    cd = torch.promote_types(x.dtype, compute_dtype)
    shift = _per_batch(shift, B, D, "shift").to(cd)[:, None]
    scale = _per_batch(scale, B, D, "scale").to(cd)[:, None]
    xn = torch.nn.functional.layer_norm(x.to(cd), (D,), eps=eps)
    return (xn * (1 + scale) + shift).to(x.dtype)


def gated_residual_reference(
    x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor, compute_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Plain torch version of :func:`gated_residual` (out of place); math in the wider of x.dtype and compute_dtype."""
    B, _, D = x.shape
    cd = torch.promote_types(x.dtype, compute_dtype)
    gate = _per_batch(gate, B, D, "gate").to(cd)[:, None]
    return (x.to(cd) + y.to(cd) * gate).to(x.dtype)
