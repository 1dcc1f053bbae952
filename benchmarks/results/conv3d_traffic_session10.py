"""One-off: what bounds the decoder's 96-channel conv (about 440 TFLOP/s against 620-680 at 192 channels)? The conv
of `kernels.conv3d` with its input tile (A) or its weight tile (B), or both, loaded once before the K loop instead
of at every K block: the same MMA work with less data moved from L2 to shared memory (the results are wrong on
purpose; only the time is read). do_bench, ms, 3-latent chunk (12 frames) at 480x832 and 192 channels at 240x416.

    python benchmarks/results/conv3d_traffic_session10.py     # on the GPU machine
"""

from functools import partial

import torch
import triton
import triton.language as tl
from triton.testing import do_bench
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.conv3d import _blocks, tap_major


@triton.jit
def _diag_kernel(x_desc, w_desc, w2_desc, out_ptr, T, H, W, sot, soh, sow,
                 C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N2: tl.constexpr,
                 BLOCK_K: tl.constexpr, A_ONCE: tl.constexpr, B_ONCE: tl.constexpr):
    pid_m = tl.program_id(0)
    t = tl.program_id(2)
    WP = W + 2
    FP = (H + 2) * WP
    p0 = pid_m * BLOCK_M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_M, BLOCK_N2), dtype=tl.float32)
    a0 = x_desc.load([t * FP + p0, 0])
    b0 = w_desc.load([0, 0])
    b20 = w2_desc.load([0, BLOCK_N])
    for kt in tl.static_range(3):
        row0 = (t + kt) * FP + p0 - WP - 1
        for i in range(9 * C // BLOCK_K):
            tap = (i * BLOCK_K) // C
            if A_ONCE:
                a = a0
            else:
                a = x_desc.load([row0 + (tap // 3) * WP + tap % 3, (i * BLOCK_K) % C])
            k = kt * 9 * C + i * BLOCK_K
            if B_ONCE:
                b = b0
                b2 = b20
            else:
                b = w_desc.load([k, 0])
                b2 = w2_desc.load([k, BLOCK_N])
            acc = tl.dot(a, b, acc)
            acc2 = tl.dot(a, b2, acc2)
    p = p0 + tl.arange(0, BLOCK_M)
    h = p // WP - 1
    w = p % WP - 1
    inside = (p < FP) & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    pix = h.to(tl.int64) * soh + w.to(tl.int64) * sow + t.to(tl.int64) * sot
    offs = tl.arange(0, BLOCK_N)
    tl.store(out_ptr + pix[:, None] + offs[None, :], acc.to(out_ptr.dtype.element_ty), mask=inside[:, None])
    offs2 = BLOCK_N + tl.arange(0, BLOCK_N2)
    tl.store(out_ptr + pix[:, None] + offs2[None, :], acc2.to(out_ptr.dtype.element_ty), mask=inside[:, None])


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    dev, dt = "cuda", torch.bfloat16
    for c, t, h, w in ((96, 12, 480, 832), (192, 12, 240, 416)):
        buf = torch.randn(1, t + 2, h + 2, w + 2, c, device=dev, dtype=dt)
        weight = (torch.randn(c, c, 3, 3, 3, device=dev) / (27 * c) ** 0.5).to(dt)
        out = torch.empty(1, c, t, h, w, device=dev, dtype=dt, memory_format=torch.channels_last_3d)
        flops = 2 * c * c * 27 * t * h * w
        block_n, block_n2, block_k = _blocks(c, c)
        taps = tap_major(weight, dt)
        x_desc = TensorDescriptor(buf, [(t + 2) * (h + 2) * (w + 2), c], [c, 1], [128, block_k])
        w_descs = [TensorDescriptor(taps, list(taps.shape), [c, 1], [block_k, n]) for n in (block_n, block_n2)]
        grid = (triton.cdiv((h + 2) * (w + 2), 128), 1, t)
        for a_once, b_once in ((0, 0), (1, 0), (0, 1), (1, 1)):
            fn = partial(_diag_kernel[grid], x_desc, *w_descs, out, t, h, w, out.stride(2), out.stride(3),
                         out.stride(4), C=c, BLOCK_M=128, BLOCK_N=block_n, BLOCK_N2=block_n2, BLOCK_K=block_k,
                         A_ONCE=a_once, B_ONCE=b_once, num_warps=4, num_stages=4)
            ms = do_bench(fn)
            print(f"{c} ch T {t} {h}x{w} A once {a_once} B once {b_once}: {ms:.3f} ms "
                  f"({flops / ms / 1e9:.0f} TFLOP/s)", flush=True)


if __name__ == "__main__":
    main()
