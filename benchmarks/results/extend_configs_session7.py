"""One-off: launch parameters of kernels.extend_attention's kernel at the engine's shapes (a denoising chunk of
chunk 5: two cuDNN partial results, context tail 58 keys, own tail 72; a refresh: one partial, tail 70), against
the fixed (BLOCK_M 64, BLOCK_N 128, 4 warps) the wrapper launches. Checks each against the wrapper's output.

    python benchmarks/results/extend_configs_session7.py     # on the GPU machine
"""

import itertools
import math

import torch
import triton
from triton.testing import do_bench

from kernels.attention import _LOG2E, _attn_extend_kernel, extend_attention

H, D = 12, 128


def launch(q, keys, partials, block_m, block_n, warps, stages):
    B, Lq, _, d = q.shape
    out = torch.empty_like(q)
    (k1, v1), (k2, v2) = keys[0], keys[-1]
    L2 = k2.shape[1] if len(keys) == 2 else 0
    (p1, l1), (p2, l2) = partials[0], partials[-1]
    _attn_extend_kernel[(B * H, triton.cdiv(Lq, block_m))](
        q, k1, v1, k2, v2, out, p1, l1, p2, l2, H, Lq, k1.shape[1], L2, d, _LOG2E / math.sqrt(d),
        *q.stride(), *k1.stride(), *v1.stride(), *k2.stride(), *v2.stride(), *out.stride(), *p1.stride(),
        *p2.stride(), *l1.stride(), *l2.stride(),
        PARTIALS=len(partials), BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=D, EVEN_D=True, IEEE=False,
        num_warps=warps, num_stages=stages,
    )
    return out


def case(name, lq, tails, n_partials):
    bf = dict(device="cuda", dtype=torch.bfloat16)
    q = torch.randn(1, lq, H, D, **bf)
    keys = [(torch.randn(1, n, H, D, **bf), torch.randn(1, n, H, D, **bf)) for n in tails]
    partials = [(torch.randn(1, lq, H, D, **bf), torch.randn(1, H, lq, device="cuda") + 8) for _ in range(n_partials)]
    ref = extend_attention(q, keys, partials)
    base = do_bench(lambda: extend_attention(q, keys, partials))
    print(f"{name}: wrapper (64, 128, 4 warps) {base * 1e3:.1f} us")
    rows = []
    for bm, bn, w, s in itertools.product((64, 128), (64, 128), (4, 8), (1, 2, 3)):
        try:
            out = launch(q, keys, partials, bm, bn, w, s)
            t = do_bench(lambda: launch(q, keys, partials, bm, bn, w, s))  # noqa: B023
        except Exception as e:  # out of resources
            print(f"  BLOCK_M {bm} BLOCK_N {bn} warps {w} stages {s}: {type(e).__name__}")
            continue
        rows.append((t, bm, bn, w, s, (out.float() - ref.float()).abs().max().item()))
    for t, bm, bn, w, s, err in sorted(rows)[:8]:
        print(f"  BLOCK_M {bm:3d} BLOCK_N {bn:3d} warps {w} stages {s}: {t * 1e3:6.1f} us"
              f"  max diff vs wrapper {err:.1e}")


def main():
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    case("denoise, chunk 5", 4680, (58, 72), 2)
    case("refresh", 10530, (70,), 1)


if __name__ == "__main__":
    main()
