"""One-off (session 15): after the host stopped waiting for the device between chunks, is the default decode pass
(2 video frames) still as fast as whole chunks? (Run 32's A/B, one after the other on a machine whose GEMM rate fell
during the run, gave 34.1 fps against 35.2.) One process, alternating: the 1.3B stream end to end (480x832, 81
frames) at 4 and 1 steps, 2 frames per pass against whole chunks, four rounds.

    cd benchmarks/results && PYTHONPATH=CHECKOUT python pass_sizes_ab_session15.py     # on the GPU machine
"""

import torch
from vae_ab_session8 import alternate_streams

from streamgen.bench import random_pipeline


def main() -> None:
    pipe = random_pipeline("1.3B", torch.device("cuda"), torch.bfloat16)
    prompt = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)

    def use(frames):
        pipe.vae.decode_pass_frames = frames
        return f"{frames or 'whole chunks'} frames per pass"

    with torch.no_grad():
        alternate_streams(pipe, prompt, (2, None), use, budgets=(4, 1), reps=4)


if __name__ == "__main__":
    main()
