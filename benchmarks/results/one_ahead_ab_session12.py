"""One-off, same machine, alternating: the pipeline decoding chunk 0 only once chunk 1's denoising is queued (as
every later chunk), against chunk 0 going straight to the decoder (the code before: the GPU then decodes the first
frame alone, its one-frame pass bound by the host launching its kernels). The pipeline kept the code before; the
variant lives here. Time to the first frame on the host and the whole stream end to end, 1.3B, 480x832, 81 frames,
at 4 and 1 steps, three each.

    python benchmarks/results/one_ahead_ab_session12.py     # on the GPU machine
"""

import time

import torch

import streamgen.pipeline as pipeline_module
from streamgen.bench import random_pipeline

STRAIGHT = pipeline_module._one_ahead  # the engine's: chunk 0 straight to the decoder


def after_chunk_one(chunks):
    """The variant measured: every chunk, chunk 0 too, handed over once the next one is queued."""
    previous = None
    for chunk in chunks:
        if previous is not None:
            yield previous
        previous = chunk
    if previous is not None:
        yield previous


def timed_stream(pipe, prompt, steps):
    torch.cuda.synchronize()
    start = time.perf_counter()
    first = None
    for _ in pipe.stream(prompt, height=480, width=832, num_frames=81, steps=steps, seed=0):
        first = first if first is not None else time.perf_counter() - start
    return first, time.perf_counter() - start


def main():
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    device = torch.device("cuda")
    pipe = random_pipeline("1.3B", device, torch.bfloat16)
    prompt = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        for steps in (4, 1):
            for ahead in (True, False):
                pipeline_module._one_ahead = after_chunk_one if ahead else STRAIGHT
                timed_stream(pipe, prompt, steps)  # graphs captured
            for rep in range(3):
                for ahead in (True, False):
                    pipeline_module._one_ahead = after_chunk_one if ahead else STRAIGHT
                    first, total = timed_stream(pipe, prompt, steps)
                    print(f"{steps} steps rep {rep} {'chunk 0 after chunk 1 queued' if ahead else 'chunk 0 straight'}: "
                          f"first frame {first:.3f} s, end to end {total:.3f} s ({81 / total:.1f} fps)", flush=True)


if __name__ == "__main__":
    main()
