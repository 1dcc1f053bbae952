"""One-off (session 11): the engine's row kernels at the 1.3B's shapes (a denoising chunk's 4,680 tokens, a refresh's
10,530 and a compressed chunk's 1,170; D = 1536, and 5120 for the 14B), replayed from CUDA graphs: q/k RMS norm +
RoPE, the modulated LayerNorm, the gated residual, and the last two fused (`residual_layernorm_modulate`), at 1-16
warps per row program (the default was `row_warps`: 8 at D = 1536, 16 at 5120). The fused kernel is a copy kept here (it
was measured as `kernels.modulate.residual_layernorm_modulate`, with any strides and an optional gate; not adopted).

    python benchmarks/results/row_kernels_session11.py
"""

import torch
import triton
import triton.language as tl
from triton.testing import do_bench_cudagraph

import kernels.modulate as modulate
import kernels.qk_norm_rope as qk_norm_rope


@triton.jit
def _residual_layernorm_modulate_kernel(
    x_ptr, y_ptr, gate_ptr, shift_ptr, scale_ptr, out_ptr, D, eps, BLOCK_D: tl.constexpr,
):
    """Contiguous (1, L, D) x, y, out; (1, D) fp32 gate, shift, scale. x += y * gate (rounded, stored in place), then
    the modulated LayerNorm of the rounded sum, exactly as `_layernorm_modulate_kernel` computes it."""
    row = tl.program_id(0).to(tl.int64) * D
    offs = tl.arange(0, BLOCK_D)
    mask = offs < D
    x = tl.load(x_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(y_ptr + row + offs, mask=mask, other=0.0).to(tl.float32)
    x = (x + y * tl.load(gate_ptr + offs, mask=mask, other=0.0)).to(x_ptr.dtype.element_ty)
    tl.store(x_ptr + row + offs, x, mask=mask)
    x = x.to(tl.float32)
    mean = tl.sum(x, axis=0) / D
    xc = tl.where(mask, x - mean, 0.0)
    xc = tl.where(mask, xc - tl.sum(xc, axis=0) / D, 0.0)
    rstd = tl.rsqrt(tl.sum(xc * xc, axis=0) / D + eps)
    shift = tl.load(shift_ptr + offs, mask=mask, other=0.0)
    scale = tl.load(scale_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + row + offs, (xc * rstd * (1.0 + scale) + shift).to(out_ptr.dtype.element_ty), mask=mask)


def residual_layernorm_modulate(x, y, gate, shift, scale, eps, out):
    block = triton.next_power_of_2(x.shape[-1])
    _residual_layernorm_modulate_kernel[(x.shape[1],)](x, y, gate, shift, scale, out, x.shape[-1], eps,
                                                        BLOCK_D=block, num_warps=modulate.row_warps(block))
    return out


def time_shape(L: int, D: int, dev: torch.device) -> None:
    x = torch.randn(1, L, D, device=dev, dtype=torch.bfloat16)
    y = torch.randn_like(x)
    out = torch.empty_like(x)
    shift, scale = torch.randn(1, D, device=dev), torch.randn(1, D, device=dev)
    zero = torch.zeros(1, D, device=dev)  # x stays as it is over the repeats
    angles = torch.randn(L, 64, device=dev)
    cos, sin, weight = angles.cos(), angles.sin(), torch.randn(D, device=dev, dtype=torch.bfloat16)
    calls = {
        "rms_norm_rope": lambda: qk_norm_rope.rms_norm_rope(x, weight, 1e-6, cos, sin, D // 128),
        "layernorm_modulate": lambda: modulate.layernorm_modulate(x, shift, scale, 1e-6, out=out),
        "gated_residual": lambda: modulate.gated_residual(x, y, zero, out=x),
        "residual_layernorm_modulate": lambda: residual_layernorm_modulate(x, y, zero, shift, scale, 1e-6, out),
    }
    default = modulate.row_warps
    for name, fn in calls.items():
        row = []
        for warps in (1, 2, 4, 8, 16):
            modulate.row_warps = qk_norm_rope.row_warps = lambda block, w=warps: w
            row.append(f"{warps} warps {1e3 * do_bench_cudagraph(fn, rep=200):6.1f} us")
        modulate.row_warps = qk_norm_rope.row_warps = default
        print(f"L={L:6d} D={D} {name:28s} " + "  ".join(row), flush=True)


def main() -> None:
    for L, D in ((4680, 1536), (10530, 1536), (1170, 1536), (4680, 5120)):
        time_shape(L, D, torch.device("cuda"))


if __name__ == "__main__":
    main()
