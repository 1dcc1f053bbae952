"""One-off: the decoder's causal 3x3x3 convs as one Triton implicit GEMM over zero-padded frames
(`kernels.conv3d.padded_conv3d`, TMA loads) against cuDNN: three 2D convs, one per time tap, summed in place
(`vae.conv_by_frames`), and one conv3d; at the shapes of a 3-latent chunk of 480x832 (T output frames after 2 kept
ones), bf16, channels-last. Sweeps the kernel's launch settings per shape; errors against an fp32 conv3d.
(`conv3d_triton_session8.txt` was measured against the engine's path of the time: the per-tap outputs left unsummed
+ one pass adding taps and bias; `conv3d_triton_gather_session8.txt`: a first kernel with masked gather loads;
this script as it is wrote `conv3d_triton_tiles_session8.txt`.)

    python benchmarks/results/conv3d_triton_session8.py     # on the GPU machine
"""

import itertools

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from kernels.conv3d import padded_conv3d
from streamgen.vae import conv_by_frames

SHAPES = [  # (C, O, T, H, W)
    (96, 96, 12, 480, 832),
    (96, 96, 1, 480, 832),
    (192, 192, 12, 240, 416),
    (384, 384, 6, 120, 208),
]
SETTINGS = [(m, n, w, s) for m, n, w, s in itertools.product((128, 256), (None, 128), (4, 8), (3, 4))
            if not (m == 256 and w == 4)]


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref).norm() / ref.norm()).item()


def one_shape(c: int, o: int, t: int, h: int, w: int) -> None:
    buf = torch.randn(1, c, t + 2, h, w, device="cuda", dtype=torch.bfloat16).contiguous(
        memory_format=torch.channels_last_3d)
    weight = (torch.randn(o, c, 3, 3, 3, device="cuda") / (27 * c) ** 0.5).to(torch.bfloat16).contiguous(
        memory_format=torch.channels_last_3d)
    bias = torch.randn(o, device="cuda", dtype=torch.bfloat16)
    padded = F.pad(buf.permute(0, 2, 3, 4, 1), (0, 0, 1, 1, 1, 1)).contiguous()  # (1, T + 2, H + 2, W + 2, C)
    wins = [padded[:, k : k + t] for k in range(3)]
    ref = F.conv3d(buf.float(), weight.float(), bias.float(), padding=(0, 1, 1))
    flop = 2 * ref.numel() * 27 * c
    frames = do_bench(lambda: conv_by_frames(buf, weight, bias, (1, 1)), warmup=25, rep=100)
    one_3d = do_bench(lambda: F.conv3d(buf, weight, bias, padding=(0, 1, 1)), warmup=25, rep=100)
    print(f"C {c} O {o} T {t} {h}x{w}: cuDNN frame convs summed {frames * 1e3:.0f} us ({flop / frames / 1e9:.0f} "
          f"TFLOP/s, rel err {rel(conv_by_frames(buf, weight, bias, (1, 1)), ref):.2e}); cuDNN conv3d "
          f"{one_3d * 1e3:.0f} us ({flop / one_3d / 1e9:.0f})", flush=True)
    best = None
    for m, n, nw, ns in SETTINGS:
        if n is not None and n <= o // 2:  # one accumulator narrower than the default split
            continue

        def run(m=m, n=n, nw=nw, ns=ns):
            return padded_conv3d(wins, weight, bias, block_m=m, block_n=n, num_warps=nw, num_stages=ns)

        try:
            err = rel(run(), ref)
            ms = do_bench(run, warmup=10, rep=50)
        except Exception as e:  # a setting that does not compile (shared memory) is skipped
            print(f"  block_m {m} block_n {n} warps {nw} stages {ns}: failed ({type(e).__name__}: {str(e)[:80]})")
            continue
        print(f"  block_m {m} block_n {n} warps {nw} stages {ns}: {ms * 1e3:.0f} us ({flop / ms / 1e9:.0f} TFLOP/s), "
              f"rel err {err:.2e}", flush=True)
        if best is None or ms < best[0]:
            best = (ms, m, n, nw, ns)
    if best:
        print(f"  BEST {best[1:]}: {best[0] * 1e3:.0f} us = {frames / best[0]:.2f}x cuDNN frame convs", flush=True)


def main() -> None:
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    for shape in SHAPES:
        one_shape(*shape)


if __name__ == "__main__":
    main()
