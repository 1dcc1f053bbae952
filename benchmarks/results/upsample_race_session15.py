"""One-off (session 15): `kernels.upsample_conv` at 384 -> 192 channels on 120x208 frames gave different results
from run to run when another stream loaded the GPU (`conv_replay_under_load_session15.txt`); its other decoder
shapes did not. Per decoder shape and launch setting (tile width, pipeline stages, warps): bit-equality with its
first result over 8 runs alone and 8 on a side stream under queued GEMMs, its max |diff| against the float32
reference, and its time (triton do_bench, median ms).

    cd benchmarks/results && PYTHONPATH=CHECKOUT python upsample_race_session15.py     # on the GPU machine
"""

import torch
from decode_under_load_session15 import under_load
from triton.testing import do_bench

from kernels.upsample_conv import upsample2x_conv2d, upsample2x_conv2d_reference

SHAPES = ((1, 384, 120, 208, 192), (4, 384, 120, 208, 192), (12, 384, 120, 208, 192), (2, 384, 60, 104, 192),
          (12, 384, 60, 104, 192), (2, 192, 240, 416, 96), (12, 192, 240, 416, 96))
SETTINGS = ({}, {"block_w": 8}, {"block_w": 32}, {"num_stages": 2}, {"num_stages": 4}, {"num_warps": 8})


def main() -> None:
    side = torch.cuda.Stream(priority=-1)
    torch.manual_seed(0)
    for n, c, h, w, o in SHAPES:
        x = torch.randn(n, c, h, w, device="cuda", dtype=torch.bfloat16).contiguous(memory_format=torch.channels_last)
        conv = torch.nn.Conv2d(c, o, 3, padding=1).cuda().to(torch.bfloat16)
        ref = upsample2x_conv2d_reference(x.float(), conv.weight.float(), conv.bias.float())
        for setting in SETTINGS:
            run = lambda x=x, conv=conv, setting=setting: upsample2x_conv2d(x, conv.weight, conv.bias, **setting)  # noqa: E731
            first = run()
            alone = sum(torch.equal(run(), first) for _ in range(8))
            loaded = sum(torch.equal(under_load(run, side, 20), first) for _ in range(8))
            err = (first.float() - ref).abs().max().item()
            ms = do_bench(run, warmup=5, rep=40)
            print(f"{n}x{c}x{h}x{w} -> {o} {setting or 'default'}: equal alone {alone}/8, under load {loaded}/8; "
                  f"max |diff| vs fp32 {err:.4f}; {ms:.3f} ms", flush=True)


if __name__ == "__main__":
    main()
