"""One-off: same-machine A/B of the cudnn attention path splitting a wave-short key prefix into a batch of two halves
(kernels.key_splits) against one call per prefix, latents-only 1.3B streams (480x832, 81 frames) at 1 and 4 steps:
variants alternate, graphs re-captured for each, min of 3 streams after a warm-up; also the final latents of both.

    python benchmarks/results/cudnn_split_ab_session7.py     # on the GPU machine
"""

import time

import torch

import kernels
from streamgen.bench import random_pipeline

SPLITS = kernels.key_splits


def main() -> None:
    device = torch.device("cuda")
    pipe = random_pipeline("1.3B", device, torch.bfloat16)
    prompt = torch.randn(1, 512, pipe.transformer.config.text_dim, device=device, dtype=torch.bfloat16)
    frames, h, w = pipe.latent_size(480, 832, 81)
    print(torch.cuda.get_device_name(), torch.__version__)
    final = {}
    for rnd in range(2):
        for name, splits in (("halves", SPLITS), ("one call", lambda programs, lk, device: 1)):
            kernels.key_splits = splits
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
                    final[(name, steps)] = stream().float().clone()
                    times.append(time.perf_counter() - start)
                print(f"round {rnd} {name:9s} steps {steps}: latents-only stream min {min(times):.4f} s"
                      f" (of {', '.join(f'{t:.4f}' for t in times)})")
    kernels.key_splits = SPLITS
    for steps in (1, 4):
        a, b = final[("halves", steps)], final[("one call", steps)]
        print(f"steps {steps}: last chunk's latents rel L2 halves vs one call "
              f"{((a - b).norm() / b.norm()).item():.2e}")


if __name__ == "__main__":
    main()
