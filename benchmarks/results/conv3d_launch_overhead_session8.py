"""One-off: host time per call of the decoder's causal conv paths at a tiny shape (the GPU work is negligible, so the
loop measures launching): `padded_conv3d` (Triton, TMA descriptors) against `conv_by_frames` (three cuDNN 2D convs
summed in place); then the 81-frame decode at one frame per pass, wall and host launch time.

    python benchmarks/results/conv3d_launch_overhead_session8.py     # on the GPU machine
"""

import time

import torch
import torch.nn.functional as F
from vae_ab_session8 import decode_seconds

from kernels.conv3d import padded_conv3d
from streamgen.bench import vae_decode_case
from streamgen.vae import conv_by_frames


def per_call_us(fn, n: int = 2000) -> float:
    fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    host = time.perf_counter() - t
    torch.cuda.synchronize()
    return host / n * 1e6


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    c = 96
    buf = torch.randn(1, c, 3, 8, 8, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last_3d)
    weight = torch.randn(c, c, 3, 3, 3, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last_3d)
    bias = torch.randn(c, device="cuda", dtype=torch.bfloat16)
    padded = F.pad(buf.permute(0, 2, 3, 4, 1), (0, 0, 1, 1, 1, 1)).contiguous()
    windows = [padded[:, k : k + 1] for k in range(3)]
    print(f"padded_conv3d: {per_call_us(lambda: padded_conv3d(windows, weight, bias)):.1f} us of host time per call",
          flush=True)
    print(f"conv_by_frames: {per_call_us(lambda: conv_by_frames(buf, weight, bias, (1, 1))):.1f} us", flush=True)
    vae, latents, sizes = vae_decode_case(torch.device("cuda"))
    vae.to_channels_last()
    for frames in (None, 1):
        vae.decode_pass_frames = frames
        with torch.no_grad():
            for _ in range(3):
                wall, host = decode_seconds(vae, latents, sizes)
                print(f"decode, {frames or 'whole chunk'} frames per pass: {wall:.3f} s, host {host:.3f} s", flush=True)


if __name__ == "__main__":
    main()
