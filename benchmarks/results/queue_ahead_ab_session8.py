"""One-off, same machine, alternating: the pipeline handing chunk k to the decoder once chunk k + 1 is queued on the
device (`pipeline._one_ahead`, the engine's) against once chunk k + 2 is queued (a deeper queue, so the generator's
work stays ahead of the host launching a one-frame-per-pass decode), each with whole-chunk and one-frame decode
passes, 1.3B stream end to end at 1 and 4 steps, two streams each after a warm-up.

    python benchmarks/results/queue_ahead_ab_session8.py     # on the GPU machine
"""

import collections
import time

import torch

from streamgen import pipeline as pipeline_module
from streamgen.bench import random_pipeline

one_ahead = pipeline_module._one_ahead


def two_ahead(chunks):
    """Chunk 0 at once, then chunk k once chunk k + 2 has been queued."""
    queue = collections.deque()
    for chunk in chunks:
        if chunk.index == 0:
            yield chunk
            continue
        queue.append(chunk)
        if len(queue) > 2:
            yield queue.popleft()
    yield from queue


def main() -> None:
    device = torch.device("cuda")
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    pipe = random_pipeline("1.3B", device, torch.bfloat16)
    prompt = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)

    def stream(steps: int, frames: int | None, ahead) -> tuple[float, float]:
        pipeline_module._one_ahead = ahead
        pipe.vae.decode_pass_frames = frames
        torch.cuda.synchronize()
        t = time.perf_counter()
        first = None
        for _ in pipe.stream(prompt, height=480, width=832, num_frames=81, steps=steps, seed=0):
            first = first or time.perf_counter() - t
        return time.perf_counter() - t, first

    for frames in (None, 1):
        stream(1, frames, one_ahead)  # warm-up
    for steps in (1, 4):
        for rep in range(2):
            for name, ahead in (("one ahead", one_ahead), ("two ahead", two_ahead)):
                for frames in (None, 1):
                    s, first = stream(steps, frames, ahead)
                    print(f"{steps} steps, {name}, {frames or 'whole chunk'} frames per pass, rep {rep}: {s:.3f} s, "
                          f"{81 / s:.1f} fps, first frame {first:.3f} s", flush=True)


if __name__ == "__main__":
    main()
