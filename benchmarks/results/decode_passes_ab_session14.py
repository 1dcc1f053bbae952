"""One-off (session 14), run once per code version in alternating processes (the old code from a git worktree on
PYTHONPATH): per decode pass size (whole chunks, 2 frames, 1 frame), the 81-frame 480x832 streaming decode (wall
seconds, peak GiB above the weights, checksum: `decoder_memory_session14.decode`; GPU kernel seconds) and the 1.3B
stream end to end at 4 and 1 steps (a warm-up stream, then two: seconds and peak GiB). Used for the Triton convs
reading the kept frames where they lie (`kernels.conv3d.causal_conv3d`) against copying them in front of the chunk.

    PYTHONPATH=CHECKOUT:... python benchmarks/results/decode_passes_ab_session14.py LABEL     # on the GPU machine
"""

import sys

import torch
from decoder_memory_session14 import decode
from vae_ab_session8 import kernel_seconds, stream_seconds

from streamgen.bench import random_pipeline, vae_decode_case

PASSES = (None, 2, 1)


def main(label: str) -> None:
    device = torch.device("cuda")
    with torch.no_grad():
        vae, latents, sizes = vae_decode_case(device)
        vae.to_channels_last()
        for per_pass in PASSES:
            vae.decode_pass_frames = per_pass
            decode(vae, latents, sizes)  # compiles and autotunes this pass size's kernels
            wall, peak, total = decode(vae, latents, sizes)
            kernel = kernel_seconds(vae, latents, sizes)
            print(f"{label} decode, {per_pass or 'whole chunk'} frames per pass: wall {wall:.3f} s, kernel time "
                  f"{kernel:.3f} s, peak {peak:.3f} GiB above the weights, sum |frames| {total:.6f}", flush=True)
        del vae, latents
        torch.cuda.empty_cache()
        pipe = random_pipeline("1.3B", device, torch.bfloat16)
        prompt = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)
        for steps in (4, 1):
            for per_pass in PASSES:
                pipe.vae.decode_pass_frames = per_pass
                stream_seconds(pipe, prompt, steps)
                runs = [stream_seconds(pipe, prompt, steps) for _ in range(2)]
                print(f"{label} stream, {steps} steps, {per_pass or 'whole chunk'} frames per pass: "
                      f"{runs[0][0]:.3f} / {runs[1][0]:.3f} s, peak {runs[0][1]:.3f} GiB", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
