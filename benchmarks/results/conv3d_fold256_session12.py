"""The decoder's 96-channel 3x3x3 conv with its three width taps folded into the N dimension of ONE wide MMA: the
weights of the taps dw = 0, 1, 2 laid side by side as a (K, 256) matrix [W0[:, :64] | W1[:, :64] | W2[:, :64] |
W0[:, 64:] | W1[:, 64:]] plus a (K, 32) one [W2[:, 64:]], so each input tile (loaded once per K block, a third of the
one-frame kernel's input traffic) feeds a 128 x 256 and a 128 x 32 MMA; the epilogue splits the accumulator into the
taps' parts and adds them shifted by one and two rows (`tl.gather`), 126 outputs per 128-row tile. The earlier fold
(`conv3d_fold_width_session12.py`) used six 64- and 32-wide MMAs per tile and ran 1.6x slower than the two-frame
kernel. Prototype against `kernels.conv3d.padded_conv3d` on the H100, output checked against it.

    python benchmarks/results/conv3d_fold256_session12.py
"""

import sys

import torch
import triton
import triton.language as tl
from conv3d_fold_width_session12 import case  # the same 96-channel chunk (and seeds) as the first fold
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.conv3d import _conv_value, _silu_scaled, _store, padded_conv3d


@triton.jit
def _shifted(x, rows, k: tl.constexpr, BLOCK_M: tl.constexpr, N: tl.constexpr):
    """x moved up by k rows (row i holds x[i + k]; the last k rows repeat the last: never stored)."""
    idx = tl.minimum(rows + k, BLOCK_M - 1)
    return tl.gather(x, tl.broadcast_to(idx[:, None], (BLOCK_M, N)), 0)


@triton.jit
def _fold256_kernel(
    x0_desc, x1_desc, x2_desc, w_desc, w2_desc, bias_ptr, res_ptr, gamma_ptr, out_ptr,
    T, H, W, CO, rows0_b, rows1_b, rows2_b,
    srb, srt, srh, srw, sob, sot, soh, sow, norm_scale, norm_eps,
    C: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, NORM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr,
):
    KH: tl.constexpr = 3
    KW: tl.constexpr = 3
    pid_m = tl.program_id(0)
    bt = tl.program_id(2)
    b = bt // T
    t = bt % T
    WP = W + KW - 1
    FP = (H + KH - 1) * WP
    p0 = pid_m * (BLOCK_M - KW + 1)
    acc = tl.zeros((BLOCK_M, 256), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, 32), dtype=tl.float32)
    for f in tl.static_range(3):
        if f == 0:
            desc = x0_desc
            row0 = b * rows0_b
        elif f == 1:
            desc = x1_desc
            row0 = b * rows1_b
        else:
            desc = x2_desc
            row0 = b * rows2_b
        row0 += t * FP + p0 - (KH // 2) * WP - KW // 2
        for i in range(KH * C // BLOCK_K):
            dh = (i * BLOCK_K) // C
            ch = (i * BLOCK_K) % C
            a = desc.load([row0 + dh * WP, ch])
            k = (f * KH + dh) * C + ch
            acc = tl.dot(a, w_desc.load([k, 0]), acc)
            acc2 = tl.dot(a, w2_desc.load([k, 0]), acc2)
    # acc columns: [W0 64 | W1 64 | W2 64 | W0' 32, W1' 32] -> (M, a, b, 64) with j = 128 a + 64 b + c
    y4 = tl.permute(tl.reshape(acc, (BLOCK_M, 2, 2, 64)), (0, 3, 1, 2))  # (M, 64, a, b)
    lo, hi = tl.split(y4)  # b = 0: (M, 64, a) [W0, W2]; b = 1: [W1, rest]
    w0, w2 = tl.split(lo)
    w1, rest = tl.split(hi)
    w0p, w1p = tl.split(tl.permute(tl.reshape(rest, (BLOCK_M, 2, 32)), (0, 2, 1)))
    rows = tl.arange(0, BLOCK_M)
    y = w0 + _shifted(w1, rows, 1, BLOCK_M, 64) + _shifted(w2, rows, 2, BLOCK_M, 64)
    y2 = w0p + _shifted(w1p, rows, 1, BLOCK_M, 32) + _shifted(acc2, rows, 2, BLOCK_M, 32)

    p = p0 + rows
    h = p // WP - KH // 2
    w = p % WP - KW // 2
    inside = (rows < BLOCK_M - KW + 1) & (p < (H + KH - 1) * WP) & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    h64 = h.to(tl.int64)
    w64 = w.to(tl.int64)
    pix_o = h64 * soh + w64 * sow + b.to(tl.int64) * sob + t.to(tl.int64) * sot
    pix_r = h64 * srh + w64 * srw + b.to(tl.int64) * srb + t.to(tl.int64) * srt
    offs_n = tl.arange(0, 64)
    offs_n2 = 64 + tl.arange(0, 32)
    y = _conv_value(y, offs_n, inside, pix_r, bias_ptr, res_ptr, out_ptr, CO, HAS_BIAS, HAS_RES)
    y2 = _conv_value(y2, offs_n2, inside, pix_r, bias_ptr, res_ptr, out_ptr, CO, HAS_BIAS, HAS_RES)
    if NORM:
        squares = tl.sum(y * y, axis=1) + tl.sum(y2 * y2, axis=1)
        scale = norm_scale / tl.maximum(tl.sqrt(squares), norm_eps)
        y = _silu_scaled(y, scale, gamma_ptr, offs_n, CO)
        y2 = _silu_scaled(y2, scale, gamma_ptr, offs_n2, CO)
    _store(y, offs_n, inside, pix_o, out_ptr, CO)
    _store(y2, offs_n2, inside, pix_o, out_ptr, CO)


def fold_weights(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """(96, C, 3, 3, 3) -> the (27 C / 3 = 9 C, 256) and (9 C, 32) matrices the kernel reads (rows: f, dh, c)."""
    c = weight.shape[1]
    taps = weight.detach().to(dtype).permute(2, 3, 1, 4, 0)  # (f, dh, c, dw, co)
    wide = torch.cat([taps[..., 0, :64], taps[..., 1, :64], taps[..., 2, :64], taps[..., 0, 64:], taps[..., 1, 64:]],
                     dim=-1)
    return wide.reshape(9 * c, 256).contiguous(), taps[..., 2, 64:].reshape(9 * c, 32).contiguous()


def fold256_conv3d(windows, weight, bias=None, residual=None, norm_silu=None, out=None, block_m=128, num_warps=8,
                   num_stages=3, info=None, wmats=None):
    CO, C, kt, kh, kw = weight.shape
    assert (CO, kt, kh, kw) == (96, 3, 3, 3) and C % 32 == 0
    x = windows[0]
    B, T, HP, WP, _ = x.shape
    H, W = HP - 2, WP - 2
    wide, narrow = wmats or fold_weights(weight, x.dtype)
    if out is None:
        out = torch.empty((B, CO, T, H, W), dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)
    block_k = 32
    descs = [TensorDescriptor(win, [(B - 1) * win.stride(0) // C + T * HP * WP, C], [C, 1], [block_m, block_k])
             for win in windows]
    w_descs = [TensorDescriptor(wide, list(wide.shape), [256, 1], [block_k, 256]),
               TensorDescriptor(narrow, list(narrow.shape), [32, 1], [block_k, 32])]
    res = residual if residual is not None else out
    grid = (triton.cdiv(HP * WP, block_m - 2), 1, B * T)
    k = _fold256_kernel[grid](
        *descs, *w_descs, bias if bias is not None else wide, res, norm_silu if norm_silu is not None else wide, out,
        T, H, W, CO, *(win.stride(0) // C for win in windows),
        res.stride(0), res.stride(2), res.stride(3), res.stride(4),
        out.stride(0), out.stride(2), out.stride(3), out.stride(4),
        float(CO) ** 0.5, 1e-12,
        C=C, HAS_BIAS=bias is not None, HAS_RES=residual is not None, NORM=norm_silu is not None,
        BLOCK_M=block_m, BLOCK_K=block_k, num_warps=num_warps, num_stages=num_stages,
    )
    if info is not None and hasattr(k, "n_regs"):
        info.update(regs=k.n_regs, spills=k.n_spills)
    return out


def main() -> None:
    from functools import partial

    from triton.testing import do_bench

    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    windows, weight, bias, gamma = case(12, 480, 832)
    wmats = fold_weights(weight, weight.dtype)
    flops = 2 * 27 * 96 * 96 * 482 * 834 * 12
    ref = padded_conv3d(windows, weight, bias, pair_frames=False)
    ref_norm = padded_conv3d(windows, weight, bias, norm_silu=gamma)
    rows = []
    for warps, stages in ((8, 2), (8, 3), (8, 4)):
        info = {}
        try:
            y = fold256_conv3d(windows, weight, bias, num_warps=warps, num_stages=stages, info=info, wmats=wmats)
            yn = fold256_conv3d(windows, weight, bias, norm_silu=gamma, num_warps=warps, num_stages=stages,
                                wmats=wmats)
        except Exception as e:  # a launch setting that does not compile is a row, not a stop
            print(f"fold256 {warps} warps {stages} stages: {type(e).__name__}: {str(e)[:300]}", flush=True)
            continue
        err = (y.float() - ref.float()).abs().max().item()
        err_n = (yn.float() - ref_norm.float()).abs().max().item()
        ms = do_bench(partial(fold256_conv3d, windows, weight, bias, num_warps=warps, num_stages=stages,
                              wmats=wmats), rep=300)
        ms_n = do_bench(partial(fold256_conv3d, windows, weight, bias, norm_silu=gamma, num_warps=warps,
                                num_stages=stages, wmats=wmats), rep=300)
        print(f"fold256 {warps}w {stages}s: conv {ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s), with norm {ms_n:.3f} ms;"
              f" max diff vs the kernel {err:.2e} / {err_n:.2e}; regs {info.get('regs')} spills {info.get('spills')}",
              flush=True)
        rows.append(ms)
    for _ in range(2):
        ms1 = do_bench(partial(padded_conv3d, windows, weight, bias, pair_frames=False), rep=300)
        ms2 = do_bench(partial(padded_conv3d, windows, weight, bias), rep=300)
        msn = do_bench(partial(padded_conv3d, windows, weight, bias, norm_silu=gamma), rep=300)
        print(f"kernel: one frame per program {ms1:.3f} ms ({flops / ms1 / 1e9:.0f} TFLOP/s), two frames {ms2:.3f} ms "
              f"({flops / ms2 / 1e9:.0f}), with norm {msn:.3f} ms", flush=True)


if __name__ == "__main__" and "--cpu-check" not in sys.argv:
    main()
