"""One-off: the decoder's convs with more K work per loop iteration and with the input tile passed through registers.

The 96-channel conv (K blocks of 32 channels: 81 loop iterations of a 128 x 32 tile against 64 + 32 outputs) runs at
about 440 TFLOP/s where the 192-channel one (K blocks of 64 against 128 + 64) reaches 620-680. Two suspects: each
iteration's MMA work is small next to its barrier waits and TMA issue (KSPLIT > 1 loads KSPLIT K blocks of one tap
per iteration), and both accumulators' MMAs read the same input tile from shared memory (AREG passes the tile
through registers first, so the tensor cores read only the weight tile from shared memory). A copy of
`kernels.conv3d`'s kernel with those two switches, checked against it, timed with do_bench (ms); prints the PTX's
wgmma forms so that it shows whether the register operand was used.

    python benchmarks/results/conv3d_kloop_session10.py     # on the GPU machine
"""

import re
from functools import partial

import torch
import triton
import triton.language as tl
from triton.testing import do_bench
from triton.tools.tensor_descriptor import TensorDescriptor

from kernels.conv3d import _blocks, padded_conv3d, tap_major


@triton.jit
def _variant_kernel(x0_desc, x1_desc, x2_desc, w_desc, w2_desc, bias_ptr, out_ptr, T, H, W, CO, sot, soh, sow,
                    C: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_N2: tl.constexpr,
                    BLOCK_K: tl.constexpr, KSPLIT: tl.constexpr, AREG: tl.constexpr):
    pid_m = tl.program_id(0)
    t = tl.program_id(2)
    WP = W + 2
    FP = (H + 2) * WP
    p0 = pid_m * BLOCK_M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if BLOCK_N2 > 0:
        acc2 = tl.zeros((BLOCK_M, BLOCK_N2), dtype=tl.float32)
    for kt in tl.static_range(3):
        if kt == 0:
            desc = x0_desc
        elif kt == 1:
            desc = x1_desc
        else:
            desc = x2_desc
        row0 = t * FP + p0 - WP - 1
        for i in range(9 * C // (BLOCK_K * KSPLIT)):
            base = i * BLOCK_K * KSPLIT
            tap = base // C
            r = row0 + (tap // 3) * WP + tap % 3
            for j in tl.static_range(KSPLIT):
                a = desc.load([r, base % C + j * BLOCK_K])
                if AREG:
                    a = a + 0.0
                k = kt * 9 * C + base + j * BLOCK_K
                acc = tl.dot(a, w_desc.load([k, 0]), acc)
                if BLOCK_N2 > 0:
                    acc2 = tl.dot(a, w2_desc.load([k, BLOCK_N]), acc2)
    p = p0 + tl.arange(0, BLOCK_M)
    h = p // WP - 1
    w = p % WP - 1
    inside = (p < FP) & (h >= 0) & (h < H) & (w >= 0) & (w < W)
    pix = h.to(tl.int64) * soh + w.to(tl.int64) * sow + t.to(tl.int64) * sot
    offs = tl.arange(0, BLOCK_N)
    y = acc + tl.load(bias_ptr + offs)[None, :].to(tl.float32)
    tl.store(out_ptr + pix[:, None] + offs[None, :], y.to(out_ptr.dtype.element_ty), mask=inside[:, None])
    if BLOCK_N2 > 0:
        offs2 = BLOCK_N + tl.arange(0, BLOCK_N2)
        y2 = acc2 + tl.load(bias_ptr + offs2)[None, :].to(tl.float32)
        tl.store(out_ptr + pix[:, None] + offs2[None, :], y2.to(out_ptr.dtype.element_ty), mask=inside[:, None])


def variant(windows, weight, bias, out, ksplit, areg, block_k=None, warps=4, stages=4):
    """The conv of all CO channels in one program (CO = 96 or 192), B = 1."""
    CO, C = weight.shape[:2]
    _, T, HP, WP, _ = windows[0].shape
    block_n, block_n2, bk = _blocks(C, CO)
    block_k = block_k or bk
    taps = tap_major(weight, windows[0].dtype)
    descs = [TensorDescriptor(win, [T * HP * WP, C], [C, 1], [128, block_k]) for win in windows]
    w_descs = [TensorDescriptor(taps, list(taps.shape), [CO, 1], [block_k, n]) for n in (block_n, block_n2)]
    grid = (triton.cdiv(HP * WP, 128), 1, T)
    return _variant_kernel[grid](*descs, *w_descs, bias, out, T, HP - 2, WP - 2, CO, out.stride(2), out.stride(3),
                                 out.stride(4), C=C, BLOCK_M=128, BLOCK_N=block_n, BLOCK_N2=block_n2, BLOCK_K=block_k,
                                 KSPLIT=ksplit, AREG=areg, num_warps=warps, num_stages=stages)


def conv_case(c: int, t: int, h: int, w: int, dev: str = "cuda", dt: torch.dtype = torch.bfloat16):
    """A random c -> c conv of t frames at h x w as the decoder runs it: a [2 kept + t] buffer of zero-ringed padded
    frames, its three windows, weight and bias; prints `kernels.conv3d`'s time. Returns (buffer, windows, weight,
    bias, flops, kernels.conv3d's output). Also used by `conv3d_two_frames_session10.py`."""
    buf = torch.randn(1, t + 2, h + 2, w + 2, c, device=dev, dtype=dt)
    buf[:, :, 0] = buf[:, :, -1] = 0
    buf[:, :, :, 0] = buf[:, :, :, -1] = 0
    windows = [buf[:, k : k + t] for k in range(3)]
    weight = (torch.randn(c, c, 3, 3, 3, device=dev) / (27 * c) ** 0.5).to(dt)
    bias = torch.randn(c, device=dev, dtype=dt)
    flops = 2 * c * c * 27 * t * h * w
    ref = padded_conv3d(windows, weight, bias)
    ms = do_bench(partial(padded_conv3d, windows, weight, bias))
    print(f"{c} ch T {t} {h}x{w}: kernels.conv3d {ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s)", flush=True)
    return buf, windows, weight, bias, flops, ref


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    for c, t, h, w in ((96, 12, 480, 832), (192, 12, 240, 416), (96, 1, 480, 832)):
        _, windows, weight, bias, flops, ref = conv_case(c, t, h, w)
        bk = _blocks(c, c)[2]
        settings = [(1, a, bk, 4, s) for a in (0, 1) for s in (3, 4)]
        settings += [(c // bk, a, bk, 4, s) for a in (0, 1) for s in (2, 3)]
        if c == 96:
            settings += [(3, a, 32, 8, s) for a in (0, 1) for s in (2, 3)]
        for ksplit, areg, block_k, warps, stages in settings:
            out = torch.empty_like(ref)
            name = f"  ksplit {ksplit} areg {areg} block_k {block_k} warps {warps} stages {stages}:"
            try:
                fn = partial(variant, windows, weight, bias, out, ksplit, areg, block_k, warps, stages)
                compiled = fn()
                ms = do_bench(fn)
                err = (out.float() - ref.float()).abs().max().item()
                ptx = compiled.asm["ptx"]
                forms = sorted(set(re.findall(r"wgmma\.mma_async\.sync\.aligned\.(m\d+n\d+k\d+)", ptx)))
                reg_a = bool(re.search(r"wgmma\.mma_async[^;]*\{[^}]*\},\s*\{", ptx))
                print(f"{name} {ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s), max diff {err:.1e}, wgmma {forms}, "
                      f"A in registers {reg_a}", flush=True)
            except Exception as e:  # e.g. out of shared memory
                print(f"{name} failed: {type(e).__name__}: {str(e)[:200]}", flush=True)


if __name__ == "__main__":
    main()
