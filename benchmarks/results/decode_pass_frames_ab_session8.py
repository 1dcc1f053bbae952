"""One-off, same machine, alternating: the whole 1.3B stream end to end (480x832, 81 frames) with the decoder taking a
whole chunk per pass (`vae.decode_pass_frames = None`) against one video frame per pass (`= 1`), at 4 and 1 steps,
three streams each after a warm-up; seconds, fps and peak memory per stream.

    python benchmarks/results/decode_pass_frames_ab_session8.py     # on the GPU machine
"""

import torch
from vae_ab_session8 import stream_seconds

from streamgen.bench import random_pipeline


def main() -> None:
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    pipe = random_pipeline("1.3B", device, torch.bfloat16)
    prompt = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)

    def stream(steps: int, frames: int | None) -> tuple[float, float]:
        pipe.vae.decode_pass_frames = frames
        return stream_seconds(pipe, prompt, steps)

    for frames in (None, 1):
        stream(1, frames)  # warm-up: graphs, plans, compiles
    for steps in (4, 1):
        for rep in range(3):
            for frames in (None, 1):
                s, peak = stream(steps, frames)
                print(f"{steps} steps, {frames or 'whole chunk'} frames per pass, rep {rep}: {s:.3f} s, "
                      f"{81 / s:.1f} fps, peak {peak:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
