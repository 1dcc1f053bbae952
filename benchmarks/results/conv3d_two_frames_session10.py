"""One-off: the decoder's 96-channel conv with two output frames per program, so that each input tile loaded feeds
both frames' time taps (4 input frames loaded for 6 frame-tap products instead of 6): a third less input traffic,
the part `conv3d_traffic_session10` found costs most. A copy of `kernels.conv3d`'s kernel for B = 1, one buffer of
[2 kept + T] padded frames, even T; checked against `padded_conv3d`, timed with do_bench (ms).

    python benchmarks/results/conv3d_two_frames_session10.py     # on the GPU machine
"""

from functools import partial

import torch
import triton
import triton.language as tl
from conv3d_kloop_session10 import conv_case
from triton.testing import do_bench
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.conv3d import _blocks, padded_conv3d, tap_major


@triton.jit
def _two_frames_kernel(x_desc, w_desc, w2_desc, bias_ptr, out_ptr, H, W, sot, soh, sow,
                       C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N2: tl.constexpr,
                       BLOCK_K: tl.constexpr):
    pid_m = tl.program_id(0)
    t0 = 2 * tl.program_id(2)
    WP = W + 2
    FP = (H + 2) * WP
    p0 = pid_m * BLOCK_M
    acc0 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc0b = tl.zeros((BLOCK_M, BLOCK_N2), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc1b = tl.zeros((BLOCK_M, BLOCK_N2), dtype=tl.float32)
    for f in tl.static_range(4):  # input frame t0 + f: time tap f of output frame t0, tap f - 1 of frame t0 + 1
        row0 = (t0 + f) * FP + p0 - WP - 1
        for i in range(9 * C // BLOCK_K):
            tap = (i * BLOCK_K) // C
            a = x_desc.load([row0 + (tap // 3) * WP + tap % 3, (i * BLOCK_K) % C])
            if f <= 2:
                k = f * 9 * C + i * BLOCK_K
                acc0 = tl.dot(a, w_desc.load([k, 0]), acc0)
                acc0b = tl.dot(a, w2_desc.load([k, BLOCK_N]), acc0b)
            if f >= 1:
                k = (f - 1) * 9 * C + i * BLOCK_K
                acc1 = tl.dot(a, w_desc.load([k, 0]), acc1)
                acc1b = tl.dot(a, w2_desc.load([k, BLOCK_N]), acc1b)
    p = p0 + tl.arange(0, BLOCK_M)
    h = p // WP - 1
    w = p % WP - 1
    inside = ((p < FP) & (h >= 0) & (h < H) & (w >= 0) & (w < W))[:, None]
    pix = (h.to(tl.int64) * soh + w.to(tl.int64) * sow + t0.to(tl.int64) * sot)[:, None]
    offs = tl.arange(0, BLOCK_N)
    offs2 = BLOCK_N + tl.arange(0, BLOCK_N2)
    bias = tl.load(bias_ptr + offs)[None, :].to(tl.float32)
    bias2 = tl.load(bias_ptr + offs2)[None, :].to(tl.float32)
    dt = out_ptr.dtype.element_ty
    tl.store(out_ptr + pix + offs[None, :], (acc0 + bias).to(dt), mask=inside)
    tl.store(out_ptr + pix + offs2[None, :], (acc0b + bias2).to(dt), mask=inside)
    tl.store(out_ptr + pix + sot + offs[None, :], (acc1 + bias).to(dt), mask=inside)
    tl.store(out_ptr + pix + sot + offs2[None, :], (acc1b + bias2).to(dt), mask=inside)


def two_frames(buf, weight, bias, out, block_m=128, warps=8, stages=3):
    CO, C = weight.shape[:2]
    _, TK, HP, WP, _ = buf.shape
    block_n, block_n2, block_k = _blocks(C, CO)
    taps = tap_major(weight, buf.dtype)
    x_desc = TensorDescriptor(buf, [TK * HP * WP, C], [C, 1], [block_m, block_k])
    w_descs = [TensorDescriptor(taps, list(taps.shape), [CO, 1], [block_k, n]) for n in (block_n, block_n2)]
    grid = (triton.cdiv(HP * WP, block_m), 1, (TK - 2) // 2)
    return _two_frames_kernel[grid](x_desc, *w_descs, bias, out, HP - 2, WP - 2, out.stride(2), out.stride(3),
                             out.stride(4), C=C, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_N2=block_n2,
                             BLOCK_K=block_k, num_warps=warps, num_stages=stages)


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    for c, t, h, w in ((96, 12, 480, 832), (96, 8, 480, 832), (96, 4, 480, 832), (96, 12, 480, 832)):
        buf, windows, weight, bias, flops, ref = conv_case(c, t, h, w)
        for block_m, warps, stages in ((128, 4, 2), (128, 4, 3), (128, 4, 4), (128, 8, 3)):
            out = torch.empty_like(ref)
            name = f"  two frames block_m {block_m} warps {warps} stages {stages}:"
            try:
                fn = partial(two_frames, buf, weight, bias, out, block_m, warps, stages)
                k = fn()
                ms = do_bench(fn)
                name += f" {k.n_regs} registers, {k.n_spills} spilled"
                base = do_bench(partial(padded_conv3d, windows, weight, bias))
                name += f" (kernels.conv3d again {base:.3f} ms)"
                err = (out.float() - ref.float()).abs().max().item()
                print(f"{name} {ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s), max diff {err:.1e}", flush=True)
            except Exception as e:  # e.g. out of shared memory or registers
                print(f"{name} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)


if __name__ == "__main__":
    main()
