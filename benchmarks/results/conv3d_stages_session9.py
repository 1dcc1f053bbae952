"""One-off: the 96-channel conv of the decoder's full resolution (K blocks of 32 channels: 81 per output tile) at more
pipeline stages and another tile height than the session-8 sweep tried, alone and with the next norm in its epilogue,
for a 3-latent chunk (12 + 2 frames) and a one-frame pass (do_bench, ms).

    python benchmarks/results/conv3d_stages_session9.py     # on the GPU machine
"""

from functools import partial

import torch
from triton.testing import do_bench

from kernels.conv3d import padded_conv3d


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    dev, dt, c = "cuda", torch.bfloat16, 96
    h, w = 480, 832
    weight = (torch.randn(c, c, 3, 3, 3, device=dev) / (27 * c) ** 0.5).to(dt)
    bias, gamma = torch.randn(c, device=dev, dtype=dt), torch.randn(c, device=dev, dtype=dt)
    for t in (12, 1):
        buf = torch.randn(1, t + 2, h + 2, w + 2, c, device=dev, dtype=dt)
        windows = [buf[:, k : k + t] for k in range(3)]
        nxt = torch.zeros(1, t, h + 2, w + 2, c, device=dev, dtype=dt)
        inside = nxt[:, :, 1:-1, 1:-1].permute(0, 4, 1, 2, 3)
        flops = 2 * c * c * 27 * t * h * w
        for block_m, warps, stages in [(128, 4, s) for s in (4, 5, 6, 8)] + [(64, 4, s) for s in (4, 6, 8)]:
            row = [f"T {t} block_m {block_m} warps {warps} stages {stages}:"]
            for name, norm in (("conv", {}), ("conv + norm", {"norm_silu": gamma, "out": inside})):
                try:
                    ms = do_bench(partial(padded_conv3d, windows, weight, bias, block_m=block_m, num_warps=warps,
                                          num_stages=stages, **norm))
                    row.append(f"{name} {ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s)")
                except Exception as e:  # e.g. out of shared memory
                    row.append(f"{name} failed: {type(e).__name__}")
            print(", ".join(row), flush=True)


if __name__ == "__main__":
    main()
