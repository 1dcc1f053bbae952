"""One-off: how much of a latents-only 1.3B stream (480x832, 81 frames, as the engine runs it after a warm-up) the
GPU spends idle, and where: the union of kernel intervals against the span from the first kernel to the last, the
largest gaps with the kernels on either side, and the host-side synchronizing calls.

    python benchmarks/results/gpu_idle_session7.py     # on the GPU machine
"""

from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from streamgen.bench import random_pipeline

SYNCS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpyAsync")


def main() -> None:
    device = torch.device("cuda")
    pipe = random_pipeline("1.3B", device, torch.bfloat16)
    prompt = torch.randn(1, 512, pipe.transformer.config.text_dim, device=device, dtype=torch.bfloat16)
    frames, h, w = pipe.latent_size(480, 832, 81)
    for steps in (1, 4):
        def stream(steps=steps):
            for _ in pipe.generator.stream(prompt, height=h, width=w, num_frames=frames, steps=steps, seed=0):
                pass

        stream()
        stream()  # warm: graphs captured, plans made
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            stream()
            torch.cuda.synchronize()
        kernels = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events()
                         if e.device_type == torch.autograd.DeviceType.CUDA)
        busy, gaps, end = 0.0, [], kernels[0][0]
        prev = ""
        for s, e, name in kernels:
            if s > end:
                gaps.append((s - end, prev[:50], name[:50]))
            busy += max(0.0, e - max(s, end))
            if e > end:
                end, prev = e, name
        span = end - kernels[0][0]
        print(f"steps {steps}: GPU span {span / 1e3:.1f} ms, busy {busy / 1e3:.1f} ms ({100 * busy / span:.1f}%),"
              f" {len(gaps)} gaps, {sum(g[0] for g in gaps) / 1e3:.1f} ms idle")
        for gap, before, after in sorted(gaps, reverse=True)[:12]:
            print(f"   {gap / 1e3:7.3f} ms idle  after {before}  before {after}")
        syncs = Counter(e.name for e in prof.events() if e.name.startswith(SYNCS))
        print("   host syncs / copies:", dict(syncs))


if __name__ == "__main__":
    main()
