"""One-off: GPU kernel time (torch.profiler, sum of device time) of the 81-frame streaming decode, a whole chunk per
pass against one frame per pass, and the wall time unprofiled: is the one-frame decode slower on the GPU or only on
the host?

    python benchmarks/results/decode_pass_kernel_time_session9.py     # on the GPU machine
"""

import torch
from torch.profiler import ProfilerActivity, profile
from vae_ab_session8 import decode_seconds

from streamgen.bench import vae_decode_case


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    vae, latents, sizes = vae_decode_case(torch.device("cuda"))
    vae.to_channels_last()
    with torch.no_grad():
        for frames in (None, 1, None, 1):
            vae.decode_pass_frames = frames
            decode_seconds(vae, latents, sizes)
            wall = decode_seconds(vae, latents, sizes)[0]
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                decode_seconds(vae, latents, sizes)
            events = prof.key_averages()
            kernel = sum(e.self_device_time_total for e in events) / 1e6
            launches = sum(e.count for e in events if e.self_device_time_total > 0)
            print(f"{frames or 'whole chunk'} frames per pass: wall {wall:.3f} s, kernel time {kernel:.3f} s, "
                  f"{launches} device ops", flush=True)
            if frames == 1:
                print(events.table(sort_by="self_cuda_time_total", row_limit=14), flush=True)


if __name__ == "__main__":
    main()
