"""One-off, same machine, alternating: `padded_conv3d` with two output frames per program (where the windows are one
buffer, at most 96 output channels and no norm in the epilogue: the decoder's full-resolution residual blocks'
second convs) against one frame per program (the same kernel with the pairing switched off). The 96-channel conv
alone, with a residual and with the next norm in its epilogue (do_bench, ms; with the norm both rows are one frame
per program), the standalone 81-frame streaming decode (wall and one profiled decode's kernel time), the frames of
both, then the whole 1.3B stream end to end at 4 and 1 steps.

    python benchmarks/results/pair_frames_ab_session10.py     # on the GPU machine
"""

from functools import partial

import torch
from triton.testing import do_bench
from vae_ab_session8 import decode_seconds, kernel_seconds, stream_seconds

import kernels.conv3d as conv3d
from streamgen.bench import random_pipeline, vae_decode_case

ONE_BUFFER = conv3d._one_buffer


def pairs(on: bool) -> str:
    conv3d._one_buffer = ONE_BUFFER if on else (lambda windows: False)
    return "pairs" if on else "single"


def main():
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    dev, dt, c, h, w = "cuda", torch.bfloat16, 96, 480, 832
    weight = (torch.randn(c, c, 3, 3, 3, device=dev) / (27 * c) ** 0.5).to(dt)
    bias, gamma = torch.randn(c, device=dev, dtype=dt), torch.randn(c, device=dev, dtype=dt)
    for t in (12, 4):
        buf = torch.randn(1, t + 2, h + 2, w + 2, c, device=dev, dtype=dt)
        windows = [buf[:, k : k + t] for k in range(3)]
        nxt = torch.zeros(1, t, h + 2, w + 2, c, device=dev, dtype=dt)
        inside = nxt[:, :, 1:-1, 1:-1].permute(0, 4, 1, 2, 3)
        res = torch.randn_like(inside).contiguous(memory_format=torch.channels_last_3d)
        flops = 2 * c * c * 27 * t * h * w
        for rep in range(2):
            for on in (True, False):
                row = [f"96 ch T {t} rep {rep} {pairs(on)}:"]
                for name, more in (("conv", {}), ("conv + residual", {"residual": res}),
                                   ("conv + norm", {"norm_silu": gamma, "out": inside})):
                    ms = do_bench(partial(conv3d.padded_conv3d, windows, weight, bias, **more))
                    row.append(f"{name} {ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s)")
                print(", ".join(row), flush=True)
    del buf, nxt, inside, windows, res
    device = torch.device("cuda")
    vae, latents, sizes = vae_decode_case(device)
    vae.to_channels_last()
    with torch.no_grad():
        for frames in (None, 4):
            vae.decode_pass_frames = frames
            for on in (True, False):
                pairs(on)
                decode_seconds(vae, latents, sizes)
            for rep in range(3):
                for on in (True, False):
                    name = pairs(on)
                    wall, host = decode_seconds(vae, latents, sizes)
                    print(f"decode {frames or 'whole chunk'} frames per pass, {name} rep {rep}: {wall:.3f} s, host "
                          f"{host:.3f} s", flush=True)
            for on in (True, False):
                name = pairs(on)
                print(f"decode {frames or 'whole chunk'} frames per pass, {name}: kernel time "
                      f"{kernel_seconds(vae, latents, sizes):.3f} s", flush=True)
        vae.decode_pass_frames = None
        pairs(True)
        a = vae.decode(latents, sizes)
        pairs(False)
        b = vae.decode(latents, sizes)
        print(f"frames pairs vs single: max abs diff {(a - b).abs().max().item():.3e}", flush=True)
    del vae, a, b
    pipe = random_pipeline("1.3B", device, torch.bfloat16)
    prompt = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)
    for on in (True, False):
        pairs(on)
        stream_seconds(pipe, prompt, 1)  # warm-up: graphs, plans, compiles
    for steps in (4, 1):
        for rep in range(3):
            for on in (True, False):
                name = pairs(on)
                s, peak = stream_seconds(pipe, prompt, steps)
                print(f"stream {steps} steps, {name} rep {rep}: {s:.3f} s, {81 / s:.1f} fps, peak {peak:.2f} GiB",
                      flush=True)


if __name__ == "__main__":
    main()
