"""One-off: where a latents-only 1.3B stream's host-to-device copies come from (gpu_idle_session7.txt: the GPU's
longest idle gaps sit before them): for each cudaMemcpyAsync runtime call, its enclosing ops and Python frames.

    python benchmarks/results/htod_sources_session7.py     # on the GPU machine
"""

from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

from streamgen.bench import random_pipeline


def ancestry(evt) -> str:
    names, stack = [], []
    while evt is not None:
        stack = stack or list(evt.stack or [])
        names.append(evt.name.split("/")[-1][:60])
        evt = evt.cpu_parent
    ours = [f for f in stack if "streamgen" in f or "kernels" in f][:4]
    return " <- ".join(names[:8]) + ("  | " + " <- ".join(ours) if ours else "")


def main() -> None:
    device = torch.device("cuda")
    pipe = random_pipeline("1.3B", device, torch.bfloat16)
    prompt = torch.randn(1, 512, pipe.transformer.config.text_dim, device=device, dtype=torch.bfloat16)
    frames, h, w = pipe.latent_size(480, 832, 81)

    def stream():
        for _ in pipe.generator.stream(prompt, height=h, width=w, num_frames=frames, steps=1, seed=0):
            pass

    stream()
    stream()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        stream()
        torch.cuda.synchronize()
    copies = Counter(ancestry(e) for e in prof.events() if e.name == "cudaMemcpyAsync")
    for where, n in copies.most_common(15):
        print(f"{n:5d}x  {where}")


if __name__ == "__main__":
    main()
