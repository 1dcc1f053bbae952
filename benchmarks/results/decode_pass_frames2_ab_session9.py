"""One-off, same machine, alternating: the 81-frame decode alone (wall, host launch time, peak above the weights) and
the whole 1.3B stream end to end (seconds, fps, peak) at 1 and 4 steps, with the decoder's full-resolution blocks
taking a whole chunk, 2 or 1 video frames per pass (`vae.decode_pass_frames`).

    python benchmarks/results/decode_pass_frames2_ab_session9.py     # on the GPU machine
"""

import time

import torch
from vae_ab_session8 import stream_seconds

from streamgen.bench import random_pipeline, vae_decode_case

PASSES = (None, 2, 1)


def main() -> None:
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    vae, latents, sizes = vae_decode_case(device)
    vae.to_channels_last()
    with torch.no_grad():
        for rep in range(3):
            for frames in PASSES:
                vae.decode_pass_frames = frames
                torch.cuda.synchronize()
                base = torch.cuda.memory_allocated(device)
                torch.cuda.reset_peak_memory_stats(device)
                start, host = time.perf_counter(), 0.0
                decoder = vae.stream_decoder()
                for chunk in latents.split(sizes, dim=2):
                    t = time.perf_counter()
                    decoder.decode(chunk)
                    host += time.perf_counter() - t
                torch.cuda.synchronize()
                peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30
                print(f"decode, {frames or 'whole chunk'} frames per pass, rep {rep}: {time.perf_counter() - start:.3f}"
                      f" s, host {host:.3f} s, peak {peak:.2f} GiB above what was allocated", flush=True)
    del vae, latents
    pipe = random_pipeline("1.3B", device, torch.bfloat16)
    prompt = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)

    def stream(steps: int, frames: int | None) -> tuple[float, float]:
        pipe.vae.decode_pass_frames = frames
        return stream_seconds(pipe, prompt, steps)

    for frames in PASSES:
        stream(1, frames)  # warm-up: graphs, plans, compiles
    for steps in (1, 4):
        for rep in range(3):
            for frames in PASSES:
                s, peak = stream(steps, frames)
                print(f"stream {steps} steps, {frames or 'whole chunk'} frames per pass, rep {rep}: {s:.3f} s, "
                      f"{81 / s:.1f} fps, peak {peak:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
