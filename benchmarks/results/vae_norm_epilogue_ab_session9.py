r"""One-off, same machine, alternating: the session-8 VAE (every residual block's second norm a kernel of its own,
the tap-major weight copied at every conv call) against this session's (the norm applied in the first conv's
epilogue where one program holds all output channels, the weight copy kept): the standalone 81-frame streaming
decode (wall, host launch time, and one profiled decode's kernel time), whole chunks and one frame per pass; then the
whole 1.3B stream end to end at 4 and 1 steps. The old modules were session 8's last commit's files, put next to
this script for the run (not kept in the repo):

    mkdir abtmp_session9 && touch abtmp_session9/__init__.py
    git show 2fd596b:streamgen/vae.py | sed 's/from kernels.conv3d import/from abtmp_session9.old_conv3d import/' \
        > abtmp_session9/old_vae.py
    git show 2fd596b:kernels/conv3d.py | sed 's/from \._launch import/from kernels._launch import/' \
        > abtmp_session9/old_conv3d.py
    python benchmarks/results/vae_norm_epilogue_ab_session9.py     # on the GPU machine
"""
import torch
from vae_ab_session8 import code_copy, decode_seconds, kernel_seconds, stream_seconds

from streamgen.bench import random_pipeline, vae_decode_case


def session8_copy(vae):
    from abtmp_session9 import old_vae

    return code_copy(vae, old_vae)


def main():
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    device = torch.device("cuda")
    vae, latents, sizes = vae_decode_case(device)
    vae.to_channels_last()
    old = session8_copy(vae)
    with torch.no_grad():
        for frames in (None, 1):
            for v in (vae, old):
                v.decode_pass_frames = frames
                decode_seconds(v, latents, sizes)
            for rep in range(3):
                for name, v in (("new", vae), ("old", old)):
                    wall, host = decode_seconds(v, latents, sizes)
                    print(f"decode {frames or 'whole chunk'} frames per pass, {name} rep {rep}: {wall:.3f} s, host "
                          f"{host:.3f} s", flush=True)
            for name, v in (("new", vae), ("old", old)):
                print(f"decode {frames or 'whole chunk'} frames per pass, {name}: kernel time "
                      f"{kernel_seconds(v, latents, sizes):.3f} s", flush=True)
        a, b = vae.decode(latents, sizes), old.decode(latents, sizes)
        diff = (a - b).abs()
        print(f"frames new vs old: max abs diff {diff.max().item():.3e}, mean {diff.mean().item():.3e}", flush=True)
    del vae, old, a, b, diff
    pipe = random_pipeline("1.3B", device, torch.bfloat16)
    new = pipe.vae
    old = session8_copy(new)
    prompt = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)

    def stream(v, steps, frames):
        pipe.vae = v
        v.decode_pass_frames = frames
        return stream_seconds(pipe, prompt, steps)

    variants = [("new", new, None), ("old", old, None), ("new", new, 1), ("old", old, 1)]
    for _, v, frames in variants:
        stream(v, 1, frames)  # warm-up: graphs, plans, compiles
    for steps in (4, 1):
        for rep in range(3):
            for name, v, frames in variants:
                s, peak = stream(v, steps, frames)
                print(f"stream {steps} steps, {frames or 'whole chunk'} frames per pass, {name} rep {rep}: {s:.3f} s, "
                      f"{81 / s:.1f} fps, peak {peak:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
