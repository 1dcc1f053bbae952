"""One-off (session 15): are the end-to-end stream's latents and frames the same from run to run (1.3B, 480x832,
81 frames, 4 steps, seed 0, random weights)? Latents-only streams and decodes of given latents are; end-to-end
frames were seen to differ. Compares, pairwise: the latents of end-to-end runs against a latents-only run, the frames
of end-to-end runs against each other, each run's frames against a standalone streaming decode of its own latents,
and the same with the decode on the generator's stream (no overlap).

    cd benchmarks/results && PYTHONPATH=CHECKOUT python e2e_determinism_session15.py     # on the GPU machine
"""

import numpy as np
import torch

from streamgen.bench import random_pipeline
from streamgen.vae import to_uint8_frames


def run(pipe, prompt):
    chunks = list(pipe.stream(prompt, steps=4, seed=0))
    latents = torch.cat([c.latents.latents.clone() for c in chunks], dim=2)
    return latents, np.concatenate([c.frames for c in chunks], axis=1), [c.latents.latents.shape[2] for c in chunks]


def diff(a: np.ndarray, b: np.ndarray) -> str:
    d = np.abs(a.astype(int) - b.astype(int))
    return f"max |diff| {d.max()}, values differing {(d > 0).mean():.2e}"


def main() -> None:
    device = torch.device("cuda")
    pipe = random_pipeline("1.3B", device, torch.bfloat16)
    prompt = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        f, h, w = pipe.latent_size(480, 832, 81)
        reference = pipe.generator.generate(prompt, height=h, width=w, num_frames=f, steps=4, seed=0)
        for overlap in (True, False):
            stream = pipe._decode_stream
            if not overlap:
                pipe._decode_stream = None
            runs = [run(pipe, prompt) for _ in range(4)]  # the first warms this mode up
            pipe._decode_stream = stream
            label = "decode on its own stream" if overlap else "decode on the generator's stream"
            for i, (latents, frames, sizes) in enumerate(runs):
                decoder = pipe.vae.stream_decoder()
                alone = np.concatenate([to_uint8_frames(decoder.decode(c)) for c in latents.split(sizes, dim=2)], 1)
                print(f"{label}, run {i}: latents equal the latents-only run's: {torch.equal(latents, reference)}; "
                      f"frames against run 0's: {diff(frames, runs[0][1])}; against a standalone decode of its "
                      f"latents: {diff(frames, alone)}", flush=True)


if __name__ == "__main__":
    main()
