"""One-off: does cuDNN attention at a denoising chunk's shape (4,680 queries, 12 heads: 37 query tiles x 12 = 444
CTAs, 3.4 waves on 132 SMs if one per SM) run faster when its keys are split in two halves run as a batch of two
(888 CTAs) and merged by log-sum-exp? Times each way at the engine's aligned key counts, and checks the merged
result against the single call.

    python benchmarks/results/cudnn_batched_split_session7.py     # on the GPU machine
"""

import torch
from triton.testing import do_bench

H, D = 12, 128


def cudnn(q, k, v):
    """(B, L, H, d) in, out (B, Lq, H, d) and lse (B, H, Lq)."""
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), None, True)[:2]
    return out.transpose(1, 2), lse.squeeze(-1) if lse.dim() == 4 else lse


def merged(q, k, v, parts):
    """The keys in `parts` equal slices run as one batch of `parts` (q repeated), merged by their lse."""
    lq, lk = q.shape[1], k.shape[1]
    n = lk // parts
    qb = q.expand(parts, lq, H, D)
    kb = k[0, : n * parts].view(parts, n, H, D)
    vb = v[0, : n * parts].view(parts, n, H, D)
    out, lse = cudnn(qb, kb, vb)
    w = torch.softmax(lse.float(), dim=0)  # (parts, H, Lq)
    return (out.float() * w.transpose(1, 2)[..., None]).sum(0, keepdim=True).to(q.dtype), out, lse


def main():
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__)
    bf = dict(device="cuda", dtype=torch.bfloat16)
    for lq, lk in ((4680, 12032), (4680, 4608), (4680, 16640), (4680, 17536), (10530, 12800)):
        q = torch.randn(1, lq, H, D, **bf)
        k, v = torch.randn(1, lk, H, D, **bf), torch.randn(1, lk, H, D, **bf)
        flop = 4 * lq * lk * H * D
        one = do_bench(lambda: cudnn(q, k, v))  # noqa: B023
        ref = cudnn(q, k, v)[0]
        line = f"Lq {lq:5d} Lk {lk:5d}: one call {one * 1e3:7.1f} us ({flop / one / 1e9:4.0f} TFLOP/s)"
        for parts in (2, 3, 4):
            n = lk // parts
            if lk % parts or n % 128:
                continue
            qb = q.expand(parts, lq, H, D)
            kb, vb = k[0].view(parts, n, H, D), v[0].view(parts, n, H, D)
            t = do_bench(lambda: cudnn(qb, kb, vb))  # noqa: B023
            t_copy = do_bench(lambda: cudnn(qb.contiguous(), kb, vb))  # noqa: B023
            err = (merged(q, k, v, parts)[0].float() - ref.float()).abs().max().item()
            line += (f" | {parts} x {n} as a batch {t * 1e3:7.1f} us ({flop / t / 1e9:4.0f}), q copied"
                     f" {t_copy * 1e3:7.1f} us, merged max diff {err:.1e}")
        print(line)


if __name__ == "__main__":
    main()
