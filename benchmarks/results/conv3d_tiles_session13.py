"""One-off: launch settings of the Triton causal 3x3x3 conv (`kernels.conv3d.padded_conv3d`) at the decoder's
shapes, at this session's kernel (two accumulators for 96 / 192 / 384 output channels, two frames per program for
96). The engine launches every conv with the defaults (block_m 128, 4 warps, 4 stages); the eighth session's tile
sweep (`conv3d_triton_tiles_session8.txt`, an earlier kernel) had 256-row tiles at 8 warps ahead for 192 channels.

    python benchmarks/results/conv3d_tiles_session13.py     # on the GPU machine
"""

import itertools
from functools import partial

import torch
import torch.nn.functional as F
import triton

from kernels.conv3d import padded_conv3d

SHAPES = [(96, 96, 12, 480, 832), (192, 192, 12, 240, 416), (384, 384, 6, 120, 208), (384, 384, 3, 60, 104)]


def main():
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    torch.manual_seed(0)
    for c, o, t, h, w in SHAPES:
        x = torch.randn(1, t + 2, h, w, c, device="cuda", dtype=torch.bfloat16)
        padded = F.pad(x, (0, 0, 1, 1, 1, 1))
        windows = [padded[:, k : k + t] for k in range(3)]
        weight = (torch.randn(o, c, 3, 3, 3, device="cuda") / (27 * c) ** 0.5).to(torch.bfloat16)
        bias = torch.randn(o, device="cuda", dtype=torch.bfloat16)
        gamma = torch.randn(o, 1, 1, 1, device="cuda", dtype=torch.bfloat16)
        flops = 2 * o * t * h * w * 27 * c
        ref = padded_conv3d(windows, weight, bias)
        variants = [("conv", {})] + ([("conv + norm", {"norm_silu": gamma})] if o <= 96 else [])
        for (name, extra), pair in itertools.product(variants, (True, False) if o <= 96 else (False,)):
            if pair and extra:
                continue
            results = []
            for block_m, warps, stages in itertools.product((128, 256), (4, 8), (3, 4)):
                if block_m == 256 and warps == 4:
                    continue
                kw = dict(block_m=block_m, num_warps=warps, num_stages=stages, pair_frames=pair, **extra)
                try:
                    out = padded_conv3d(windows, weight, bias, **kw)
                    if not extra:
                        assert torch.equal(out, ref) or (out.float() - ref.float()).abs().max() < 0.05
                    ms = triton.testing.do_bench(partial(padded_conv3d, windows, weight, bias, **kw), warmup=25,
                                                 rep=200, return_mode="median")
                    results.append((ms, block_m, warps, stages))
                    print(f"{c}->{o} T {t} {h}x{w} {name}{' pair' if pair else ''}: block_m {block_m} warps {warps} "
                          f"stages {stages}: {ms:.3f} ms ({flops / ms * 1e-9:.0f} TFLOP/s)", flush=True)
                except Exception as e:  # out of shared memory or registers
                    print(f"{c}->{o} {name} block_m {block_m} warps {warps} stages {stages}: {type(e).__name__}",
                          flush=True)
            best = min(results)
            print(f"  BEST {c}->{o} {name}{' pair' if pair else ''}: {best[0]:.3f} ms at block_m {best[1]}, "
                  f"{best[2]} warps, {best[3]} stages", flush=True)


if __name__ == "__main__":
    main()
