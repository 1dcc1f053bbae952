"""One-off: the conv with the next norm in its epilogue at 4 and 8 warps, against the conv alone and the conv then the
norm kernel, at the decoder's 96- and 192-channel shapes of a 3-latent chunk (do_bench, ms).

    python benchmarks/results/conv3d_norm_warps_session9.py     # on the GPU machine
"""

from functools import partial

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import kernels.conv3d as conv3d
from kernels.vae_ops import channel_rms_norm


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    conv3d.fuses_norm = lambda C, CO: True  # let 192 channels through for the measurement
    dev, dt = "cuda", torch.bfloat16
    for c, t, h, w in ((96, 12, 480, 832), (192, 12, 240, 416)):
        buf = torch.randn(1, t + 2, h + 2, w + 2, c, device=dev, dtype=dt)
        buf[:, :, 0] = buf[:, :, -1] = 0
        buf[:, :, :, 0] = buf[:, :, :, -1] = 0
        windows = [buf[:, k : k + t] for k in range(3)]
        weight = (torch.randn(c, c, 3, 3, 3, device=dev) / (27 * c) ** 0.5).to(dt)
        bias, gamma = torch.randn(c, device=dev, dtype=dt), torch.randn(c, device=dev, dtype=dt)
        nxt = torch.zeros(1, t, h + 2, w + 2, c, device=dev, dtype=dt)
        inside = nxt[:, :, 1:-1, 1:-1].permute(0, 4, 1, 2, 3)
        ref = conv3d.padded_conv3d(windows, weight, bias)
        ref = F.silu(F.normalize(ref.float(), dim=1) * c**0.5 * gamma.float().view(-1, 1, 1, 1))
        row = [f"{c} ch {h}x{w}:"]
        for warps in (4, 8):
            ms = do_bench(partial(conv3d.padded_conv3d, windows, weight, bias, num_warps=warps))
            row.append(f"conv {warps}w {ms:.3f}")
            ms = do_bench(partial(conv3d.padded_conv3d, windows, weight, bias, norm_silu=gamma, out=inside,
                                  num_warps=warps))
            err = (inside.float() - ref).abs().max().item()
            row.append(f"fused {warps}w {ms:.3f} (err {err:.1e})")

        def apart(windows=windows, weight=weight, bias=bias, gamma=gamma, inside=inside):
            return channel_rms_norm(conv3d.padded_conv3d(windows, weight, bias), gamma, silu=True, out=inside)

        row.append(f"apart {do_bench(apart):.3f}")
        print(", ".join(row), flush=True)


if __name__ == "__main__":
    main()
