"""One-off: same-machine A/B of the refresh's last layer stopping at its keys and values (model.Block kv_only) against
the full last layer, latents-only 1.3B streams (480x832, 81 frames) at 1 and 4 steps: variants alternate, graphs
re-captured for each, min of 3 streams after a warm-up. Also checks both give the same latents.

    python benchmarks/results/refresh_kv_only_ab_session7.py     # on the GPU machine
"""

import time

import torch

from streamgen import model as model_module
from streamgen.bench import random_pipeline

FULL = model_module.Block.forward


def full_last_layer(self, x, segments, rope, text_kv, mask, past, kv_only=False):
    return FULL(self, x, segments, rope, text_kv, mask, past)


def main() -> None:
    device = torch.device("cuda")
    pipe = random_pipeline("1.3B", device, torch.bfloat16)
    prompt = torch.randn(1, 512, pipe.transformer.config.text_dim, device=device, dtype=torch.bfloat16)
    frames, h, w = pipe.latent_size(480, 832, 81)
    print(torch.cuda.get_device_name(), torch.__version__)
    final = {}
    for rnd in range(2):
        for name, forward in (("kv only", FULL), ("full last layer", full_last_layer)):
            model_module.Block.forward = forward
            pipe.transformer.cuda_graphs.clear()
            for steps in (1, 4):
                def stream(steps=steps):
                    out = None
                    for chunk in pipe.generator.stream(prompt, height=h, width=w, num_frames=frames, steps=steps,
                                                       seed=0):
                        out = chunk
                    torch.cuda.synchronize()
                    return out

                stream()
                times = []
                for _ in range(3):
                    start = time.perf_counter()
                    last = stream()
                    times.append(time.perf_counter() - start)
                final[(name, steps)] = last.latents.float().clone() if hasattr(last, "latents") else None
                print(f"round {rnd} {name:16s} steps {steps}: latents-only stream min {min(times):.4f} s"
                      f" (of {', '.join(f'{t:.4f}' for t in times)})")
    model_module.Block.forward = FULL
    for steps in (1, 4):
        a, b = final[("kv only", steps)], final[("full last layer", steps)]
        if a is not None:
            print(f"steps {steps}: last chunk's latents equal: {torch.equal(a, b)}")


if __name__ == "__main__":
    main()
