"""One-off (session 11): the 81-frame streaming decode's GPU time by op and input shapes (torch.profiler,
record_shapes), the default path (whole chunks per pass, channels-last, Triton convs and norms).

    python benchmarks/results/decode_ops_by_shape_session11.py     # on the GPU machine
"""

import torch
from torch.profiler import ProfilerActivity, profile

from streamgen.bench import vae_decode_case


@torch.no_grad()
def main() -> None:
    vae, latents, sizes = vae_decode_case(torch.device("cuda"))
    vae.to_channels_last()
    vae.decode(latents, sizes)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True) as prof:
        vae.decode(latents, sizes)
        torch.cuda.synchronize()
    ops = [e for e in prof.key_averages(group_by_input_shape=True) if e.self_device_time_total > 0 and
           e.key.startswith("aten::")]
    print(f"{'ms':>8s} {'calls':>6s}  op  input shapes")
    for e in sorted(ops, key=lambda e: -e.self_device_time_total)[:40]:
        print(f"{e.self_device_time_total / 1e3:8.3f} {e.count:6d}  {e.key}  {e.input_shapes}"[:230])


if __name__ == "__main__":
    main()
