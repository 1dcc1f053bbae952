"""One-off (session 14), run once per code version (the old code from a git worktree on PYTHONPATH): per decode pass
size, the 81-frame 480x832 streaming decode's peak GiB above the weights, its wall seconds (three decodes) and a
checksum of its frames; then the 1.3B stream at 4 steps per pass size (a warm-up stream, then one): end to end seconds
and peak GiB. Used for the decoder's flat layer loop (`Decoder3d.forward`: no block's input kept alive through the
block's later layers) against the loop per block before it.

    PYTHONPATH=CHECKOUT:... python benchmarks/results/decoder_memory_session14.py LABEL     # on the GPU machine
"""

import sys
import time

import torch
from vae_ab_session8 import stream_seconds

from streamgen.bench import random_pipeline, vae_decode_case

PASSES = (None, 4, 2, 1)


def decode(vae, latents: torch.Tensor, sizes: list[int]) -> tuple[float, float, float]:
    """Wall seconds, peak GiB above what was allocated before (the weights) and the frames' sum of |x| (float64)."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    start = time.perf_counter()
    decoder = vae.stream_decoder()
    total = torch.zeros((), dtype=torch.float64, device=latents.device)
    for chunk in latents.split(sizes, dim=2):
        total += decoder.decode(chunk).abs().sum(dtype=torch.float64)
    torch.cuda.synchronize()
    return time.perf_counter() - start, (torch.cuda.max_memory_allocated() - base) / 2**30, total.item()


def main(label: str) -> None:
    device = torch.device("cuda")
    with torch.no_grad():
        vae, latents, sizes = vae_decode_case(device)
        vae.to_channels_last()
        decode(vae, latents, sizes)  # compiles and autotunes
        for per_pass in PASSES:
            vae.decode_pass_frames = per_pass
            runs = [decode(vae, latents, sizes) for _ in range(3)]
            print(f"{label} decode, {per_pass or 'whole chunk'} frames per pass: "
                  f"{' / '.join(f'{r[0]:.3f}' for r in runs)} s, peak {runs[0][1]:.3f} GiB above the weights, "
                  f"sum |frames| {runs[0][2]:.6f}", flush=True)
        del vae, latents
        torch.cuda.empty_cache()
        pipe = random_pipeline("1.3B", device, torch.bfloat16)
        prompt = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)
        for per_pass in PASSES:
            pipe.vae.decode_pass_frames = per_pass
            stream_seconds(pipe, prompt, 4)
            seconds, peak = stream_seconds(pipe, prompt, 4)
            print(f"{label} stream, 4 steps, {per_pass or 'whole chunk'} frames per pass: {seconds:.3f} s, "
                  f"peak {peak:.3f} GiB", flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
