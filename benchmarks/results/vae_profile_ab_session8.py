"""One-off, same machine: CUDA kernel time of one 81-frame streaming decode by op, the Triton-conv VAE against session
7's (old modules provided as described in `vae_triton_conv_ab_session8.py`), twice each, alternating.

    python benchmarks/results/vae_profile_ab_session8.py     # on the GPU machine; output: *_session8.txt
"""
import time

import torch
from torch.profiler import ProfilerActivity, profile
from vae_ab_session8 import session7_copy

from streamgen.bench import vae_decode_case


def main():
    device = torch.device("cuda")
    vae, latents, sizes = vae_decode_case(device)
    vae.to_channels_last()
    old = session7_copy(vae)
    with torch.no_grad():
        for name, v in (("new", vae), ("old", old), ("new", vae), ("old", old)):
            v.decode(latents, sizes)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CUDA, ProfilerActivity.CPU]) as prof:
                t = time.perf_counter()
                v.decode(latents, sizes)
                torch.cuda.synchronize()
                wall = time.perf_counter() - t
            events = prof.key_averages()
            kernel = sum(e.self_device_time_total for e in events) / 1e6
            print(f"== {name}: wall {wall:.3f} s (profiled), kernel time {kernel:.3f} s", flush=True)
            print(events.table(sort_by="self_device_time_total", row_limit=14, max_name_column_width=60), flush=True)


if __name__ == "__main__":
    main()
