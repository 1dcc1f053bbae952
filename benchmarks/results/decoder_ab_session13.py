"""One-off, same machine, alternating: the thirteenth session's decoder changes against the code before them.

- up: the spatial upsamplers' conv as one Triton implicit GEMM per phase writing the interleaved output
  (`kernels.upsample_conv`), against cuDNN's conv of the four phases and the Triton interleave pass
  (`kernels.vae_ops.phase_interleave`), the previous fused path (`cudnn_phases` below);
- rgb: the decoder's RGB conv (96 -> 3 at full resolution) as one Triton pass over a chunk's padded frames
  (`kernels.few_outputs_conv`), against cuDNN's conv2d with 9 outputs and torch's tap sums (`few_outputs_by_frames`,
  what `CausalConv3d.convolve` runs with the Triton convs off).

Prints the GPU bf16 check of each variant (frames vs the baseline's), then the 81-frame decode (wall and GPU kernel
time), three each, alternating (both changes, the RGB conv only, neither); then the 1.3B stream end to end at 4 and 1
steps, three each, alternating (both changes against neither).

    python benchmarks/results/decoder_ab_session13.py     # on the GPU machine (the code of commit e7a1241; the
                                                          # interleave kernel it uses as a baseline left after it)
"""

import torch
import torch.nn.functional as F
from vae_ab_session8 import alternate_decodes, alternate_streams, variant_frames

import kernels.upsample_conv
import streamgen.vae as vae_module
from kernels.vae_ops import phase_interleave
from streamgen.bench import random_pipeline, vae_decode_case

CONVOLVE = vae_module.CausalConv3d.convolve
UPSAMPLE = kernels.upsample_conv.upsample2x_conv2d
VARIANTS = {"new": {"rgb": True, "up": True}, "rgb only": {"rgb": True, "up": False},
            "before": {"rgb": False, "up": False}}
variant = VARIANTS["new"]


def cudnn_phases(x, weight, bias):
    """The previous fused upsampling: cuDNN's conv of the four phases (4 O outputs), then the interleave kernel."""
    w4 = kernels.upsample_conv.phase_weights(weight).flatten(0, 1).to(x.dtype)
    y = F.conv2d(x, w4.contiguous(memory_format=torch.channels_last), padding=1)
    n, _, h, w_ = x.shape
    out = torch.empty((n, weight.shape[0], 2 * h, 2 * w_), dtype=y.dtype, device=y.device,
                      memory_format=torch.channels_last)
    return phase_interleave(y, bias, out)


def upsample(x, weight, bias):
    return (UPSAMPLE if variant["up"] else cudnn_phases)(x, weight, bias)


def convolve(self, *args, **kwargs):
    """`CausalConv3d.convolve`, the few-output conv on cuDNN where the variant says so."""
    if self.out_channels > vae_module.FEW_OUTPUTS or variant["rgb"]:
        return CONVOLVE(self, *args, **kwargs)
    vae_module.set_triton_convs(False)
    try:
        return CONVOLVE(self, *args, **kwargs)
    finally:
        vae_module.set_triton_convs(True)


vae_module.CausalConv3d.convolve = convolve
kernels.upsample_conv.upsample2x_conv2d = upsample


def use(name: str) -> str:
    global variant
    variant = VARIANTS[name]
    return name


def main():
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    device = torch.device("cuda")
    with torch.no_grad():
        vae, latents, sizes = vae_decode_case(device)
        vae.to_channels_last()
        frames = variant_frames(vae, latents, sizes, VARIANTS, use)
        for name in VARIANTS:
            diff = (frames[name] - frames["before"]).abs()
            print(f"decode frames {name} vs before: max abs diff {diff.max().item():.2e}, "
                  f"mean {diff.mean().item():.2e}")
        del frames, diff
        alternate_decodes(vae, latents, sizes, VARIANTS, use)
        del vae, latents
        torch.cuda.empty_cache()

        pipe = random_pipeline("1.3B", device, torch.bfloat16)
        prompt = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)
        alternate_streams(pipe, prompt, ("new", "before"), use)


if __name__ == "__main__":
    main()
