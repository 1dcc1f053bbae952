"""One-off (session 15), run once per code version in alternating processes (the old code from a git worktree on
PYTHONPATH): the 1.3B stream end to end (480x832, 81 frames, seed 0) at 4 and 1 steps, a warm-up stream then three,
seconds and peak GiB. Used for the fifteenth session's net change (host waits removed, two-stage upsampler) against
the fourteenth's final commit a0a1265.

    PYTHONPATH=CHECKOUT:... python benchmarks/results/session_ab_session15.py LABEL     # on the GPU machine
"""

import sys

import torch
from vae_ab_session8 import stream_seconds

from streamgen.bench import random_pipeline


def main(label: str) -> None:
    device = torch.device("cuda")
    pipe = random_pipeline("1.3B", device, torch.bfloat16)
    prompt = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        for steps in (4, 1):
            stream_seconds(pipe, prompt, steps)
            runs = [stream_seconds(pipe, prompt, steps) for _ in range(3)]
            print(f"{label} stream, {steps} steps: {' / '.join(f'{s:.3f}' for s, _ in runs)} s, peak "
                  f"{runs[0][1]:.3f} GiB", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
