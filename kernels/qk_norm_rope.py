"""Fused q/k RMSNorm ("rms_norm_across_heads") and rotary embedding, plus RoPE alone for cached keys.

Wan normalises q and k over all H*d features of a token (not per head), multiplies by a learned (H*d,) weight,
and then rotates ADJACENT feature pairs of every head:

    out[2i]   = x[2i] * cos[i] - x[2i+1] * sin[i]
    out[2i+1] = x[2i] * sin[i] + x[2i+1] * cos[i]        (i < d/2, cos/sin per token position)

The engine keeps keys UNROTATED in its KV cache (so positions can be re-indexed), hence three uses: norm+rope
for queries, norm only (``cos=None``) for new keys, rope only (:func:`rope`) for keys read back from the cache.
One program owns one token (all H*d features): the statistic needs the whole row. The row is loaded flat and
viewed as (pairs, 2), so the rotation is a register shuffle (``tl.split``/``tl.join``), not a second load.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ._launch import check_tensors, pow2, row_warps

__all__ = ["rms_norm_rope", "rms_norm_rope_reference", "rope", "rope_reference"]


@triton.jit
def _norm_rope_kernel(
    x_ptr, w_ptr, cos_ptr, sin_ptr, out_ptr,
    n_feat, eps,
    stride_xb, stride_xl, stride_xh, stride_xd,
    stride_cb, stride_cl, stride_ci,
    stride_ob, stride_ol, stride_oh, stride_od,
    HEAD_D: tl.constexpr, BLOCK_F: tl.constexpr, NORM: tl.constexpr, ROPE: tl.constexpr,
):
    """One program per token (grid = (L, B)). The row is loaded flat (feature f = head * HEAD_D + e, contiguous
    within a head, so loads vectorise), then viewed as (BLOCK_F / 2, 2) pairs for the rotation."""
    tok = tl.program_id(0).to(tl.int64)
    b = tl.program_id(1).to(tl.int64)
    f = tl.arange(0, BLOCK_F)
    mask = f < n_feat
    x_offs = (f // HEAD_D) * stride_xh + (f % HEAD_D) * stride_xd
    x = tl.load(x_ptr + b * stride_xb + tok * stride_xl + x_offs, mask=mask, other=0.0).to(tl.float32)
    if NORM:
        mean_sq = tl.sum(x * x, axis=0) / n_feat
        w = tl.load(w_ptr + f, mask=mask, other=0.0).to(tl.float32)
        x = x * tl.rsqrt(mean_sq + eps) * w
    if ROPE:
        pair = tl.arange(0, BLOCK_F // 2)
        c_offs = b * stride_cb + tok * stride_cl + (pair % (HEAD_D // 2)) * stride_ci
        pmask = pair < n_feat // 2
        c = tl.load(cos_ptr + c_offs, mask=pmask, other=1.0).to(tl.float32)
        s = tl.load(sin_ptr + c_offs, mask=pmask, other=0.0).to(tl.float32)
        x_even, x_odd = tl.split(tl.reshape(x, [BLOCK_F // 2, 2]))
        x = tl.reshape(tl.join(x_even * c - x_odd * s, x_even * s + x_odd * c), [BLOCK_F])

    o_offs = (f // HEAD_D) * stride_oh + (f % HEAD_D) * stride_od
    tl.store(out_ptr + b * stride_ob + tok * stride_ol + o_offs, x.to(out_ptr.dtype.element_ty), mask=mask)


def _cos_sin(cos: torch.Tensor, sin: torch.Tensor, B: int, L: int, half: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept (L, d/2) tables (or per-batch (B, L, d/2)); return (B, L, d/2) views, stride 0 over B if shared."""
    if cos.shape != sin.shape:
        raise ValueError(f"cos and sin must have one shape, got {tuple(cos.shape)} and {tuple(sin.shape)}")
    if cos.dim() not in (2, 3) or cos.shape[-2:] != (L, half):
        raise ValueError(f"cos/sin must be (L, d/2) = ({L}, {half}) or (B, L, d/2), got {tuple(cos.shape)}")
    return torch.broadcast_to(cos, (B, L, half)), torch.broadcast_to(sin, (B, L, half))


def _launch(x4: torch.Tensor, weight, cos, sin, eps: float, out: torch.Tensor | None = None) -> torch.Tensor:
    """Run the kernel on a (B, L, H, d) view; weight None skips the norm, cos None skips the rotation; into `out`
    ((B, L, H, d) in x's dtype, any strides) when given."""
    B, L, H, d = x4.shape
    if d % 2:
        raise ValueError(f"head dim must be even for RoPE pairs, got {d}")
    half = d // 2  # HEAD_D is a constexpr: f // d, f % d are shifts when d is a power of two
    if out is None:
        out = torch.empty((B, L, H, d), dtype=x4.dtype, device=x4.device)
    elif out.shape != x4.shape or out.dtype != x4.dtype:
        raise ValueError(f"out must be {tuple(x4.shape)} {x4.dtype}, got {tuple(out.shape)} {out.dtype}")
    if cos is not None:
        cos, sin = _cos_sin(cos, sin, B, L, half)
        if sin.stride() != cos.stride():  # the kernel indexes both tables with one set of strides
            cos, sin = cos.contiguous(), sin.contiguous()
        c_strides = cos.stride()
    else:
        c_strides = (0, 0, 0)
    check_tensors(x4, weight, cos, sin)
    if out.numel() == 0:
        return out
    block = max(pow2(H * d), 2)
    _norm_rope_kernel[(L, B)](
        x4, weight if weight is not None else x4, cos if cos is not None else x4, sin if sin is not None else x4, out,
        H * d, float(eps),
        *x4.stride(), *c_strides, *out.stride(),
        HEAD_D=d, BLOCK_F=block, NORM=weight is not None, ROPE=cos is not None,
        num_warps=row_warps(block),
    )
    return out


def rms_norm_rope(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    heads: int,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """RMSNorm over all H*d features (fp32) times ``weight``, then RoPE per head; returns (B, L, H, d) in x.dtype.

    x: (B, L, H*d) projection output (any strides, e.g. a slice of a fused qkv output). weight: (H*d,).
    cos, sin: (L, d/2) fp32 tables (or (B, L, d/2)); ``cos=None`` normalises only. ``out``: (B, L, H, d) in x.dtype,
    any strides, written and returned (a slice of the KV cache: the keys need no copy into it).
    """
    if x.dim() != 3:
        raise ValueError(f"x must be (B, L, H*d), got {tuple(x.shape)}")
    F = x.shape[-1]
    if F % heads:
        raise ValueError(f"feature dim {F} is not divisible by heads={heads}")
    if weight.shape != (F,):
        raise ValueError(f"weight must be ({F},), got {tuple(weight.shape)}")
    if (cos is None) != (sin is None):
        raise ValueError("pass both cos and sin, or neither")
    return _launch(x.unflatten(-1, (heads, F // heads)), weight, cos, sin, eps, out)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotated copy of x (B, L, H, d) (any strides, e.g. a view of the KV cache), adjacent-pair convention."""
    if x.dim() != 4:
        raise ValueError(f"x must be (B, L, H, d), got {tuple(x.shape)}")
    return _launch(x, None, cos, sin, 0.0)


def rope_reference(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, compute_dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Plain torch RoPE on (B, L, H, d), adjacent pairs; math in the wider of x.dtype and compute_dtype."""
    B, L, _, d = x.shape
    cd = torch.promote_types(x.dtype, compute_dtype)
    cos, sin = _cos_sin(cos, sin, B, L, d // 2)
    c = cos.to(cd)[:, :, None]  # (B, L, 1, d/2), broadcast over heads
    s = sin.to(cd)[:, :, None]
    pairs = x.to(cd).unflatten(-1, (d // 2, 2))
    even, odd = pairs[..., 0], pairs[..., 1]
    return torch.stack((even * c - odd * s, even * s + odd * c), dim=-1).flatten(-2).to(x.dtype)


def rms_norm_rope_reference(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    heads: int,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Plain torch version of :func:`rms_norm_rope` (math in the wider of x.dtype and compute_dtype), rounded once."""
    cd = torch.promote_types(x.dtype, compute_dtype)
    xf = x.to(cd)
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.to(cd)
    y = y.unflatten(-1, (heads, x.shape[-1] // heads))
    if cos is not None:
        y = rope_reference(y, cos, sin, compute_dtype=cd)
    return y.to(x.dtype)
