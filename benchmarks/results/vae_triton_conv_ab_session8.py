r"""One-off, same machine: the session-7 VAE (cuDNN per-tap 2D convs, taps summed by the next kernel, `add_n`) against
the Triton implicit-GEMM convs (`kernels.conv3d`): the standalone 81-frame streaming decode (and the CPU time spent
launching it), then the whole 1.3B stream end to end at 4 and 1 steps, alternating. The old modules were session 7's
last commit's files, put next to this script for the run (not kept in the repo):

    mkdir abtmp_session8 && touch abtmp_session8/__init__.py
    git show d446090:streamgen/vae.py | sed 's/from kernels.vae_ops import/from abtmp_session8.old_vae_ops import/' \
        > abtmp_session8/old_vae.py
    git show d446090:kernels/vae_ops.py | sed 's/from \._launch import/from kernels._launch import/' \
        > abtmp_session8/old_vae_ops.py
    python benchmarks/results/vae_triton_conv_ab_session8.py     # on the GPU machine; output: *_session8.txt
"""
import time

import torch
from vae_ab_session8 import decode_seconds, session7_copy

from streamgen.bench import random_pipeline, vae_decode_case


def stream_seconds(pipe, prompt, steps):
    torch.cuda.synchronize()
    t = time.perf_counter()
    dec = []
    for chunk in pipe.stream(prompt, height=480, width=832, num_frames=81, steps=steps, seed=0):
        dec.append(chunk.decode_s)
    return time.perf_counter() - t, dec


def main():
    device = torch.device("cuda")
    vae, latents, sizes = vae_decode_case(device)
    vae.to_channels_last()
    old = session7_copy(vae)
    with torch.no_grad():
        for rep in range(3):
            for name, v in (("new", vae), ("old", old)):
                s, cpu = decode_seconds(v, latents, sizes)
                print(f"decode {name} rep {rep}: {s:.3f} s (CPU launch time {cpu:.3f} s)", flush=True)
        a = torch.cat([vae.stream_decoder().decode(c) for c in latents.split(sizes, dim=2)], dim=2)
        b = torch.cat([old.stream_decoder().decode(c) for c in latents.split(sizes, dim=2)], dim=2)
        print(f"max abs diff new vs old {(a - b).abs().max().item():.3e}", flush=True)
    del vae, a, b
    pipe = random_pipeline("1.3B", device, torch.bfloat16)
    new = pipe.vae
    old = session7_copy(new)
    prompt = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)
    for v in (new, old):
        pipe.vae = v
        stream_seconds(pipe, prompt, 1)  # warm-up: graphs, plans, compiles
    for steps in (4, 1):
        for rep in range(3):
            for name, v in (("new", new), ("old", old)):
                pipe.vae = v
                s, dec = stream_seconds(pipe, prompt, steps)
                print(f"stream {steps} steps {name} rep {rep}: {s:.3f} s, {81 / s:.1f} fps; decode "
                      f"{[round(d, 3) for d in dec]}", flush=True)


if __name__ == "__main__":
    main()
