"""Which of torch's SDPA backends the engine's denoising and refresh attention shapes get, and how fast each is:
the library path the Triton attention kernel is measured against (benchmarks/RESULTS.md, Kernels).

    python benchmarks/sdpa_backends.py      # on a CUDA machine; bf16, 1.3B heads (12 x 128)
"""

import contextlib
import functools

import torch
import torch.nn.functional as F
import triton.testing
from torch.nn.attention import SDPBackend, sdpa_kernel

SHAPES = [(4680, 14040), (4680, 17550), (4680, 19890), (10530, 12870)]  # (queries, keys): denoise x3, refresh
BACKENDS = [("default", None), ("flash", SDPBackend.FLASH_ATTENTION), ("cudnn", SDPBackend.CUDNN_ATTENTION),
            ("efficient", SDPBackend.EFFICIENT_ATTENTION)]


def main() -> None:
    torch.manual_seed(0)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}")
    for lq, lk in SHAPES:
        q = torch.randn(1, lq, 12, 128, device="cuda", dtype=torch.bfloat16)
        k, v = (torch.randn(1, lk, 12, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        flops = 4 * lq * lk * 128 * 12
        # the engine's layout, passed as transposed views (as streamgen.attention does)
        call = functools.partial(F.scaled_dot_product_attention, q.transpose(1, 2), k.transpose(1, 2),
                                 v.transpose(1, 2))
        default, row = None, []
        for name, backend in BACKENDS:
            try:
                with sdpa_kernel([backend]) if backend is not None else contextlib.nullcontext():
                    out = call()
                    ms = triton.testing.do_bench(call, warmup=50, rep=300)
            except RuntimeError as e:
                row.append(f"{name} unavailable ({str(e)[:60]})")
                continue
            default = out if default is None else default
            err = (out.float() - default.float()).abs().max().item()
            row.append(f"{name} {ms:.3f} ms {flops / ms / 1e9:.0f} TFLOP/s max diff vs default {err:.1e}")
        print(f"q {lq} k {lk}: " + " | ".join(row), flush=True)


if __name__ == "__main__":
    main()
