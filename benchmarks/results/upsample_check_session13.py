"""One-off: the upsampling kernel (`kernels.upsample_conv`) against a float64 reference at the decoder's three shapes,
four runs each into NaN-filled outputs (every position written, the same bits each run). Run 26's kernel row at
120x208 reported a max error of 0.21 against `benchmarks/kernels.py`'s fp32 reference (cuDNN's fp32 conv, TF32 on by
default), where run 25 and this check (float64) give 1.1e-2: the reference, not the kernel.

    python benchmarks/results/upsample_check_session13.py     # on the GPU machine
"""

import torch

from kernels.upsample_conv import upsample2x_conv2d, upsample2x_conv2d_reference


def main():
    torch.manual_seed(0)
    for n, c, o, h, w in [(6, 384, 192, 60, 104), (12, 384, 192, 120, 208), (12, 192, 96, 240, 416)]:
        x = torch.randn(n, c, h, w, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        conv = torch.nn.Conv2d(c, o, 3, padding=1, device="cuda", dtype=torch.bfloat16)
        with torch.no_grad():
            ref = upsample2x_conv2d_reference(x.double(), conv.weight.double(), conv.bias.double())
            outs = []
            for i in range(4):
                out = torch.full((n, o, 2 * h, 2 * w), float("nan"), device="cuda", dtype=torch.bfloat16)
                out = out.contiguous(memory_format=torch.channels_last)
                upsample2x_conv2d(x, conv.weight, conv.bias, out=out)
                outs.append(out)
                err = (out.double() - ref).abs()
                nan = torch.isnan(out).sum().item()
                idx = torch.nonzero(err == err.max())[0].tolist() if nan == 0 else None
                print(f"{(n, c, o, h, w)} run {i}: nan {nan}, max err {err.max().item():.3e} at {idx}, ref there "
                      f"{ref[tuple(idx)].item() if idx else None:.3f}, rel L2 "
                      f"{((out.double() - ref).norm() / ref.norm()).item():.2e}", flush=True)
            print("deterministic:", all(torch.equal(outs[0], t) for t in outs[1:]), flush=True)


if __name__ == "__main__":
    main()
