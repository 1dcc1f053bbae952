r"""One-off, same machine, alternating: the VAE before and after session 11's two changes, (1) the upsampling's four
phases interleaved by the Triton kernel `kernels.vae_ops.phase_interleave` instead of torch's strided add, and (2)
the channels-last 1x1 convs (time convs' taps, shortcuts, `post_quant_conv`, the attention's projections) as GEMMs
with the bias and tap sums in cuBLAS's epilogue: the standalone 81-frame streaming decode (wall, then each one's GPU
kernel time), the frames of both, then the whole 1.3B stream end to end at 4 and 1 steps. The old module was commit
36e8b1e's `streamgen/vae.py`, put next to this script for the run (not kept in the repo):

    mkdir abtmp_session11 && touch abtmp_session11/__init__.py
    git show 36e8b1e:streamgen/vae.py > abtmp_session11/old_vae.py
    python benchmarks/results/vae_gemm_interleave_ab_session11.py     # on the GPU machine
"""

import torch
from vae_ab_session8 import code_copy, decode_seconds, kernel_seconds, stream_seconds

from streamgen.bench import random_pipeline, vae_decode_case


def main():
    from abtmp_session11 import old_vae

    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    device = torch.device("cuda")
    vae, latents, sizes = vae_decode_case(device)
    vae.to_channels_last()
    old = code_copy(vae, old_vae)
    with torch.no_grad():
        for v in (vae, old):
            decode_seconds(v, latents, sizes)
        for rep in range(3):
            for name, v in (("new", vae), ("old", old)):
                wall, host = decode_seconds(v, latents, sizes)
                print(f"decode {name} rep {rep}: {wall:.3f} s (host {host:.3f} s)", flush=True)
        for name, v in (("new", vae), ("old", old)):
            print(f"decode {name}: kernel time {kernel_seconds(v, latents, sizes):.3f} s", flush=True)
        a = vae.decode(latents, sizes)
        b = old.decode(latents, sizes)
        print(f"frames new vs old: max abs diff {(a - b).abs().max().item():.3e}, mean abs diff "
              f"{(a - b).abs().mean().item():.3e}", flush=True)
    del vae, old, a, b
    pipe = random_pipeline("1.3B", device, torch.bfloat16)
    new = pipe.vae
    old = code_copy(new, old_vae)
    prompt = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)
    for v in (new, old):
        pipe.vae = v
        stream_seconds(pipe, prompt, 1)  # warm-up: graphs, plans, compiles
    for steps in (4, 1):
        for rep in range(3):
            for name, v in (("new", new), ("old", old)):
                pipe.vae = v
                s, peak = stream_seconds(pipe, prompt, steps)
                print(f"stream {steps} steps {name} rep {rep}: {s:.3f} s, {81 / s:.1f} fps, peak {peak:.2f} GiB",
                      flush=True)


if __name__ == "__main__":
    main()
