"""One-off (session 13), run once per code version in alternating processes (the old code from a git worktree on
PYTHONPATH): the 81-frame decode's GPU kernel time (twice) and the 1.3B stream end to end at 1 and 4 steps (a warm-up
stream, then two), printed with a label. Used for the two-frame conv kernel with stacked accumulators
(`kernels.conv3d._pair_kernel`, which also pairs the normed convs) against the four-accumulator pair kernel before it.

    PYTHONPATH=CHECKOUT:... python benchmarks/results/decode_stream_process_session13.py LABEL     # on the GPU machine
"""

import sys

import torch
from vae_ab_session8 import kernel_seconds, stream_seconds

from streamgen.bench import random_pipeline, vae_decode_case


def main(label: str) -> None:
    device = torch.device("cuda")
    with torch.no_grad():
        vae, latents, sizes = vae_decode_case(device)
        vae.to_channels_last()
        kernel_seconds(vae, latents, sizes)  # compiles and autotunes
        times = [kernel_seconds(vae, latents, sizes) for _ in range(2)]
        print(f"{label}: decode kernel time {times[0]:.3f} / {times[1]:.3f} s", flush=True)
        del vae, latents
        torch.cuda.empty_cache()
        pipe = random_pipeline("1.3B", device, torch.bfloat16)
        prompt = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)
        for steps in (1, 4):
            stream_seconds(pipe, prompt, steps)
            runs = [stream_seconds(pipe, prompt, steps)[0] for _ in range(2)]
            print(f"{label}: {steps} steps end to end {runs[0]:.3f} / {runs[1]:.3f} s", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
