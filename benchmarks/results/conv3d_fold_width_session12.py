"""The decoder's 96-channel 3x3x3 conv with its three width taps folded into one input tile: each K block's input
tile (BLOCK_M positions x BLOCK_K channels) is loaded once and multiplied by the weights of all three width taps into
three accumulators, which the epilogue adds shifted by one and two rows (`tl.gather`), so a program writes
BLOCK_M - 2 positions. Input traffic from L2 into shared memory: a third of the one-frame kernel's (the pair-frames
kernel: two thirds). Prototype against `kernels.conv3d.padded_conv3d` (one frame per program, two frames per
program, and the norm epilogue) on the H100, with its output checked against the kernel's.

    python benchmarks/results/conv3d_fold_width_session12.py
"""

import sys
from functools import partial

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.conv3d import _conv_value, _silu_scaled, _store, padded_conv3d, tap_major


@triton.jit
def _fold_kernel(
    x0_desc, x1_desc, x2_desc, w_desc, w2_desc, bias_ptr, res_ptr, gamma_ptr, out_ptr,
    T, H, W, CO, rows0_b, rows1_b, rows2_b,
    srb, srt, srh, srw, sob, sot, soh, sow, norm_scale, norm_eps,
    C: tl.constexpr, KT: tl.constexpr, KH: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RES: tl.constexpr, NORM: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N2: tl.constexpr, BLOCK_K: tl.constexpr,
    SHIFT: tl.constexpr = True,
):
    KW: tl.constexpr = 3
    pid_m = tl.program_id(0)
    n0 = tl.program_id(1) * (BLOCK_N + BLOCK_N2)
    bt = tl.program_id(2)
    b = bt // T
    t = bt % T
    WP = W + KW - 1
    FP = (H + KH - 1) * WP
    p0 = pid_m * (BLOCK_M - KW + 1)
    a0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    a1 = a0
    a2 = a0
    c0 = tl.zeros((BLOCK_M, BLOCK_N2), dtype=tl.float32)
    c1 = c0
    c2 = c0
    for f in tl.static_range(KT):
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
            k = ((f * KH + dh) * KW) * C + ch
            a0 = tl.dot(a, w_desc.load([k, n0]), a0)
            c0 = tl.dot(a, w2_desc.load([k, n0 + BLOCK_N]), c0)
            a1 = tl.dot(a, w_desc.load([k + C, n0]), a1)
            c1 = tl.dot(a, w2_desc.load([k + C, n0 + BLOCK_N]), c1)
            a2 = tl.dot(a, w_desc.load([k + 2 * C, n0]), a2)
            c2 = tl.dot(a, w2_desc.load([k + 2 * C, n0 + BLOCK_N]), c2)
    rows = tl.arange(0, BLOCK_M)
    i1 = tl.minimum(rows + 1, BLOCK_M - 1)
    i2 = tl.minimum(rows + 2, BLOCK_M - 1)
    if SHIFT:
        acc = a0 + tl.gather(a1, tl.broadcast_to(i1[:, None], (BLOCK_M, BLOCK_N)), 0) \
            + tl.gather(a2, tl.broadcast_to(i2[:, None], (BLOCK_M, BLOCK_N)), 0)
        acc2 = c0 + tl.gather(c1, tl.broadcast_to(i1[:, None], (BLOCK_M, BLOCK_N2)), 0) \
            + tl.gather(c2, tl.broadcast_to(i2[:, None], (BLOCK_M, BLOCK_N2)), 0)
    else:
        acc = a0 + a1 + a2
        acc2 = c0 + c1 + c2

    p = p0 + rows
    h = p // WP - KH // 2
    w = p % WP - KW // 2
    inside = (rows < BLOCK_M - KW + 1) & (p < (H + KH - 1) * WP) & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    h64 = h.to(tl.int64)
    w64 = w.to(tl.int64)
    pix_o = h64 * soh + w64 * sow + b.to(tl.int64) * sob + t.to(tl.int64) * sot
    pix_r = h64 * srh + w64 * srw + b.to(tl.int64) * srb + t.to(tl.int64) * srt
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_n2 = n0 + BLOCK_N + tl.arange(0, BLOCK_N2)
    y = _conv_value(acc, offs_n, inside, pix_r, bias_ptr, res_ptr, out_ptr, CO, HAS_BIAS, HAS_RES)
    y2 = _conv_value(acc2, offs_n2, inside, pix_r, bias_ptr, res_ptr, out_ptr, CO, HAS_BIAS, HAS_RES)
    if NORM:
        squares = tl.sum(y * y, axis=1) + tl.sum(y2 * y2, axis=1)
        scale = norm_scale / tl.maximum(tl.sqrt(squares), norm_eps)
        y = _silu_scaled(y, scale, gamma_ptr, offs_n, CO)
        y2 = _silu_scaled(y2, scale, gamma_ptr, offs_n2, CO)
    _store(y, offs_n, inside, pix_o, out_ptr, CO)
    _store(y2, offs_n2, inside, pix_o, out_ptr, CO)


def fold_conv3d(windows, weight, bias=None, residual=None, norm_silu=None, out=None, block_m=128, num_warps=8,
                num_stages=4, shift=True, info=None):
    CO, C, kt, kh, kw = weight.shape
    assert kw == 3 and CO == 96 and kt == 3
    x = windows[0]
    B, T, HP, WP, _ = x.shape
    H, W = HP - kh + 1, WP - kw + 1
    taps = tap_major(weight, x.dtype)
    if out is None:
        out = torch.empty((B, CO, T, H, W), dtype=x.dtype, device=x.device, memory_format=torch.channels_last_3d)
    block_k = 32
    descs = [TensorDescriptor(win, [(B - 1) * win.stride(0) // C + T * HP * WP, C], [C, 1], [block_m, block_k])
             for win in windows]
    w_descs = [TensorDescriptor(taps, list(taps.shape), [CO, 1], [block_k, n]) for n in (64, 32)]
    res = residual if residual is not None else out
    grid = (triton.cdiv(HP * WP, block_m - 2), 1, B * T)
    k = _fold_kernel[grid](
        *descs, *w_descs, bias if bias is not None else taps, res, norm_silu if norm_silu is not None else taps, out,
        T, H, W, CO, *(win.stride(0) // C for win in windows),
        res.stride(0), res.stride(2), res.stride(3), res.stride(4),
        out.stride(0), out.stride(2), out.stride(3), out.stride(4),
        float(CO) ** 0.5, 1e-12,
        C=C, KT=kt, KH=kh, HAS_BIAS=bias is not None, HAS_RES=residual is not None, NORM=norm_silu is not None,
        BLOCK_M=block_m, BLOCK_N=64, BLOCK_N2=32, BLOCK_K=block_k, SHIFT=shift, num_warps=num_warps,
        num_stages=num_stages,
    )
    if info is not None:
        info.update(regs=k.n_regs, spills=k.n_spills)
    return out


def case(frames, h, w, c=96, device="cuda", dtype=torch.bfloat16):
    g = torch.Generator(device="cpu").manual_seed(0)
    buf = torch.zeros(1, frames + 2, h + 2, w + 2, c, dtype=dtype)
    buf[:, :, 1:-1, 1:-1] = torch.randn(1, frames + 2, h, w, c, generator=g).to(dtype)
    buf = buf.to(device)
    weight = (torch.randn(c, c, 3, 3, 3, generator=g) / (27 * c) ** 0.5).to(device, dtype)
    bias = torch.randn(c, generator=g).to(device, dtype)
    gamma = (1 + 0.1 * torch.randn(c, generator=g)).to(device, dtype)
    windows = [buf[:, k:k + frames] for k in range(3)]
    return windows, weight, bias, gamma


def main() -> None:
    from triton.testing import do_bench

    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    windows, weight, bias, gamma = case(12, 480, 832)
    flops = 2 * 27 * 96 * 96 * 482 * 834 * 12
    ref = padded_conv3d(windows, weight, bias, pair_frames=False)
    ref_norm = padded_conv3d(windows, weight, bias, norm_silu=gamma)
    rows = []
    for warps, stages in ((8, 3), (8, 4), (8, 5), (4, 3), (4, 4)):
        try:
            y = fold_conv3d(windows, weight, bias, num_warps=warps, num_stages=stages)
            yn = fold_conv3d(windows, weight, bias, norm_silu=gamma, num_warps=warps, num_stages=stages)
        except Exception as e:  # a launch setting that does not compile is a row, not a stop
            print(f"fold {warps} warps {stages} stages: {type(e).__name__}: {str(e)[:200]}")
            continue
        err = (y.float() - ref.float()).abs().max().item()
        err_n = (yn.float() - ref_norm.float()).abs().max().item()
        ms = do_bench(partial(fold_conv3d, windows, weight, bias, num_warps=warps, num_stages=stages), rep=300)
        ms_n = do_bench(partial(fold_conv3d, windows, weight, bias, norm_silu=gamma, num_warps=warps,
                                num_stages=stages), rep=300)
        rows.append((f"fold {warps}w {stages}s", ms, ms_n, err, err_n))
    for _ in range(2):
        ms1 = do_bench(lambda: padded_conv3d(windows, weight, bias, pair_frames=False), rep=300)
        ms2 = do_bench(lambda: padded_conv3d(windows, weight, bias), rep=300)
        msn = do_bench(lambda: padded_conv3d(windows, weight, bias, norm_silu=gamma), rep=300)
        rows.append(("kernel: one frame / pair / norm", ms1, msn, ms2, 0.0))
    for name, a, b_, c_, d in rows:
        print(f"{name:34s} conv {a:.3f} ms ({flops / a / 1e9:.0f} TFLOP/s)  norm {b_:.3f} ms  "
              f"{'pair ' + format(c_, '.3f') + ' ms' if name.startswith('kernel') else f'err {c_:.2e} / {d:.2e}'}")


if __name__ == "__main__" and "--diagnose" not in sys.argv:
    main()


def diagnose() -> None:
    """Registers, spills and time of the folded kernel with and without the epilogue's shifts (without: wrong on
    purpose, the K loop alone)."""
    from triton.testing import do_bench

    windows, weight, bias, _ = case(12, 480, 832)
    flops = 2 * 27 * 96 * 96 * 482 * 834 * 12
    for block_m, warps, stages in ((128, 8, 3), (128, 8, 2), (64, 4, 3), (64, 4, 4)):
        for shift in (True, False):
            info = {}
            fold_conv3d(windows, weight, bias, block_m=block_m, num_warps=warps, num_stages=stages, shift=shift,
                        info=info)
            ms = do_bench(partial(fold_conv3d, windows, weight, bias, block_m=block_m, num_warps=warps,
                                  num_stages=stages, shift=shift), rep=300)
            print(f"fold M {block_m} {warps}w {stages}s shift {shift}: {ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s) "
                  f"regs {info['regs']} spills {info['spills']}")


if __name__ == "__main__" and "--diagnose" in sys.argv:
    diagnose()
