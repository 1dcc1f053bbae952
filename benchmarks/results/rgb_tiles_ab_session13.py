"""One-off, same machine: the RGB conv kernel (`kernels.few_outputs_conv`) with 2D tiles (each input row loaded once
per horizontal shift: 3.75 L2 tile loads per output position at 8-row tiles) against its first version (a tile of
consecutive positions loading each of the 9 spatial taps: 9 loads; `few_outputs_conv_v1_session13.py`, that version's
code as it was at commit 7fe579c, kept here as the baseline).

Prints: both kernels against an fp32 conv3d of a 12-frame chunk at 480x832 (96 -> 3, bf16) and each other; kernel times
(do_bench median) of the new one at several tile shapes and of the first; then the 81-frame decode's GPU kernel time
and the 1.3B stream end to end at 1 and 4 steps, new against first, alternating, three each.

    python benchmarks/results/rgb_tiles_ab_session13.py     # on the GPU machine
"""

import itertools
from functools import partial

import few_outputs_conv_v1_session13 as first
import torch
import torch.nn.functional as F
import triton
from vae_ab_session8 import alternate_decodes, alternate_streams

import kernels.few_outputs_conv
from streamgen.bench import random_pipeline, vae_decode_case

NEW = kernels.few_outputs_conv.few_outputs_conv3d


def use(name: str) -> str:
    kernels.few_outputs_conv.few_outputs_conv3d = NEW if name == "new" else first.few_outputs_conv3d
    return name


def main():
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    torch.manual_seed(0)
    n, c, h, w = 12, 96, 480, 832
    frames = torch.randn(1, n, h, w, c, device="cuda", dtype=torch.bfloat16)
    padded = F.pad(frames, (0, 0, 1, 1, 1, 1))
    weight = (torch.randn(3, c, 3, 3, 3, device="cuda") / (27 * c) ** 0.5).to(torch.bfloat16)
    bias = torch.randn(3, device="cuda", dtype=torch.bfloat16)
    pending = torch.randn(1, 2, 3, h, w, device="cuda")
    video = frames.permute(0, 4, 1, 2, 3).float()
    ref = F.conv3d(F.pad(video, (1, 1, 1, 1, 2, 2)), weight.float(), padding=0)
    ref[:, :, :2] += pending.transpose(1, 2)
    ref_out = ref[:, :, :n] + bias.float().view(-1, 1, 1, 1)
    out_new, pend_new = NEW(padded, weight, bias, pending)
    out_first, _ = first.few_outputs_conv3d(padded, weight, bias, pending)
    print(f"new vs fp32: out max abs err {(out_new - ref_out).abs().max().item():.2e}, pending "
          f"{(pend_new - ref[:, :, n:].transpose(1, 2)).abs().max().item():.2e}; first vs fp32: "
          f"{(out_first - ref_out).abs().max().item():.2e}; new vs first "
          f"{(out_new - out_first).abs().max().item():.2e}", flush=True)
    bytes_in = padded.numel() * 2 + out_new.numel() * 4
    ms = triton.testing.do_bench(partial(first.few_outputs_conv3d, padded, weight, bias, pending), warmup=25, rep=200,
                                 return_mode="median")
    print(f"first: {ms:.3f} ms ({bytes_in / ms * 1e-9:.2f} TB/s)", flush=True)
    for block_h, block_w, warps, stages in itertools.product((4, 8, 16), (64, 128), (4, 8), (3, 4)):
        kw = dict(block_h=block_h, block_w=block_w, num_warps=warps, num_stages=stages)
        try:
            ms = triton.testing.do_bench(partial(NEW, padded, weight, bias, pending, **kw), warmup=25, rep=200,
                                         return_mode="median")
            print(f"new {kw}: {ms:.3f} ms ({bytes_in / ms * 1e-9:.2f} TB/s)", flush=True)
        except Exception as e:  # out of registers or shared memory
            print(f"new {kw}: {type(e).__name__}", flush=True)
    ms = triton.testing.do_bench(partial(NEW, padded, weight, bias, pending), warmup=25, rep=200, return_mode="median")
    print(f"new (defaults): {ms:.3f} ms ({bytes_in / ms * 1e-9:.2f} TB/s)", flush=True)
    del frames, padded, video, ref, ref_out

    with torch.no_grad():
        vae, latents, sizes = vae_decode_case(torch.device("cuda"))
        vae.to_channels_last()
        alternate_decodes(vae, latents, sizes, ("new", "first"), use)
        del vae, latents
        torch.cuda.empty_cache()
        pipe = random_pipeline("1.3B", torch.device("cuda"), torch.bfloat16)
        prompt = torch.randn(1, 512, 4096, device="cuda", dtype=torch.bfloat16)
        alternate_streams(pipe, prompt, ("new", "first"), use, budgets=(1, 4))


if __name__ == "__main__":
    main()
