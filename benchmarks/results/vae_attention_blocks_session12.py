"""One-off (session 12): `vae.pixel_attention` (GEMMs around the softmax kernel) against SDPA at a 480x832 chunk's
mid block (3 frames of 6,240 pixels: one block of rows per frame) and at 720x1280 (1 frame of 90 x 160 = 14,400
pixels: the scores of all rows would take 1.2 GB, so rows go in blocks under `ATTENTION_SCORES_BYTES`), head dim
384, bf16; time (do_bench) and error against an fp32 reference; the attention's peak memory above its inputs.

    python benchmarks/results/vae_attention_blocks_session12.py     # on the GPU machine
"""

from functools import partial

import torch
import torch.nn.functional as F
from triton.testing import do_bench

from streamgen.vae import ATTENTION_SCORES_BYTES, pixel_attention


@torch.no_grad()
def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__, f"ATTENTION_SCORES_BYTES {ATTENTION_SCORES_BYTES}")
    for frames, n in ((3, 6240), (1, 14400)):
        q, k, v = (torch.randn(frames, 1, n, 384, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        rel = {}
        for name, fn in (("gemm + softmax", partial(pixel_attention, q, k, v)),
                         ("sdpa", partial(F.scaled_dot_product_attention, q, k, v))):
            torch.cuda.synchronize()
            base = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            y = fn()
            peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            rel[name] = ((y.float() - ref).norm() / ref.norm()).item()
            ms = do_bench(fn, rep=200)
            tflops = 4 * frames * n * n * 384 / ms / 1e9
            print(f"{frames} x {n} pixels, {name:14s}: {ms:.3f} ms ({tflops:.0f} TFLOP/s), rel L2 vs fp32 "
                  f"{rel[name]:.2e}, peak {peak:.0f} MiB above the inputs", flush=True)
        del q, k, v, ref


if __name__ == "__main__":
    main()
