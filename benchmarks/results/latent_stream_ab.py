"""Shared by this session's same-machine A/B scripts (`refresh_kv_only_ab_session7.py`, `cudnn_split_ab_session7.py`):
latents-only 1.3B streams (480x832, 81 frames) at 1 and 4 steps, the variants alternating over two rounds, graphs
re-captured for each, min of 3 streams after a warm-up."""

import time
from collections.abc import Callable

import torch

from streamgen.bench import random_pipeline


def alternate(variants: dict[str, Callable[[], None]]) -> dict[tuple[str, int], torch.Tensor]:
    """Time each variant (set up by calling it) as above, printing a line per variant, round and step budget; returns
    the last chunk's latents of each (variant, steps)'s last stream. The caller restores what the variants changed."""
    device = torch.device("cuda")
    pipe = random_pipeline("1.3B", device, torch.bfloat16)
    prompt = torch.randn(1, 512, pipe.transformer.config.text_dim, device=device, dtype=torch.bfloat16)
    frames, h, w = pipe.latent_size(480, 832, 81)
    print(torch.cuda.get_device_name(), torch.__version__)
    width = max(map(len, variants)) + 1
    final = {}
    for rnd in range(2):
        for name, setup in variants.items():
            setup()
            pipe.transformer.cuda_graphs.clear()
            for steps in (1, 4):
                def stream(steps=steps):
                    last = None
                    for chunk in pipe.generator.stream(prompt, height=h, width=w, num_frames=frames, steps=steps,
                                                       seed=0):
                        last = chunk.latents
                    torch.cuda.synchronize()
                    return last

                stream()
                times = []
                for _ in range(3):
                    start = time.perf_counter()
                    last = stream()
                    times.append(time.perf_counter() - start)
                final[(name, steps)] = last.float().clone()
                print(f"round {rnd} {name:{width}s} steps {steps}: latents-only stream min {min(times):.4f} s"
                      f" (of {', '.join(f'{t:.4f}' for t in times)})")
    return final
