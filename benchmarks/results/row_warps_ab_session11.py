"""One-off, same machine, alternating: the row kernels (q/k norm + RoPE, modulated LayerNorm, gated residual) at
`row_warps` = block // 512 (4 warps at the 1.3B's D = 1536) against the rule before, block // 256 (8 warps): the
whole 1.3B stream at 4 and 1 steps, latents only and end to end, three rounds each. The CUDA graphs are captured
again (one warm-up stream) after every switch, since a graph replays the launch settings it was captured with.

    python benchmarks/results/row_warps_ab_session11.py     # on the GPU machine
"""

import time

import torch
from vae_ab_session8 import stream_seconds

import kernels.modulate as modulate
import kernels.qk_norm_rope as qk_norm_rope
from streamgen.bench import random_pipeline

NEW = modulate.row_warps


def old(block: int) -> int:
    return min(max(block // 256, 1), 16)


def latents_seconds(pipe, prompt: torch.Tensor, steps: int) -> float:
    frames, h, w = pipe.latent_size(480, 832, 81)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in pipe.generator.stream(prompt, height=h, width=w, num_frames=frames, steps=steps, seed=0):
        pass
    torch.cuda.synchronize()
    return time.perf_counter() - t


def main():
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    device = torch.device("cuda")
    pipe = random_pipeline("1.3B", device, torch.bfloat16)
    prompt = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)
    results = {}
    for steps in (4, 1):
        for rep in range(3):
            for name, rule in (("block // 512", NEW), ("block // 256", old)):
                modulate.row_warps = qk_norm_rope.row_warps = rule
                pipe.transformer.cuda_graphs.clear()
                stream_seconds(pipe, prompt, steps)  # capture the graphs with these launch settings
                latents = latents_seconds(pipe, prompt, steps)
                e2e, peak = stream_seconds(pipe, prompt, steps)
                results.setdefault((steps, name), []).append((latents, e2e))
                print(f"{steps} steps rep {rep} {name}: latents {latents:.3f} s, end to end {e2e:.3f} s, "
                      f"peak {peak:.2f} GiB", flush=True)
    for (steps, name), rows in results.items():
        print(f"{steps} steps {name}: latents " + " / ".join(f"{a:.3f}" for a, _ in rows) + " s, end to end "
              + " / ".join(f"{b:.3f}" for _, b in rows) + " s")


if __name__ == "__main__":
    main()
