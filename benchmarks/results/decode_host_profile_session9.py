"""One-off: where the host's time goes in the 81-frame streaming decode at one frame per pass (cProfile, after a
warm-up decode), and the wall / host seconds of each pass setting.

    python benchmarks/results/decode_host_profile_session9.py     # on the GPU machine
"""

import cProfile
import pstats
import sys

import torch
from vae_ab_session8 import decode_seconds

from streamgen.bench import vae_decode_case


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    vae, latents, sizes = vae_decode_case(torch.device("cuda"))
    vae.to_channels_last()
    with torch.no_grad():
        for frames in (None, 1, None, 1):
            vae.decode_pass_frames = frames
            for _ in range(2):
                wall, host = decode_seconds(vae, latents, sizes)
                print(f"decode, {frames or 'whole chunk'} frames per pass: {wall:.3f} s, host {host:.3f} s", flush=True)
        vae.decode_pass_frames = 1
        profile = cProfile.Profile()
        profile.enable()
        decode_seconds(vae, latents, sizes)
        profile.disable()
    stats = pstats.Stats(profile, stream=sys.stdout)
    stats.sort_stats("tottime").print_stats(35)
    stats.sort_stats("cumulative").print_stats(45)


if __name__ == "__main__":
    main()
