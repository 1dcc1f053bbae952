"""The VAE mid block's single-head attention over a frame's 6,240 pixels at head dim 384, which no flash or cuDNN
kernel serves (SDPA runs its memory-efficient kernel, about 114 TFLOP/s in a decode): against scores made by a
cuBLAS GEMM with fp32 output (`torch.bmm(..., out_dtype=torch.float32)`), a row softmax, and a second GEMM, per
frame. Time (do_bench) and error against float64 on the H100.

    python benchmarks/results/vae_attention_session12.py
"""

import torch
import torch.nn.functional as F
import triton
import triton.language as tl


@triton.jit
def _softmax_rows(s_ptr, p_ptr, n, scale, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    s = tl.load(s_ptr + row * n + offs, mask=offs < n, other=-float("inf")) * scale
    e = tl.exp(s - tl.max(s, axis=0))
    tl.store(p_ptr + row * n + offs, (e / tl.sum(e, axis=0)).to(p_ptr.dtype.element_ty), mask=offs < n)


def explicit(q, k, v, triton_softmax: bool):
    """q, k, v: (frames, L, d) bf16."""
    out = torch.empty_like(q)
    scale = q.shape[-1] ** -0.5
    for i in range(q.shape[0]):
        s = torch.mm(q[i], k[i].t(), out_dtype=torch.float32)
        if triton_softmax:
            p = torch.empty(s.shape, dtype=q.dtype, device=q.device)
            _softmax_rows[(s.shape[0],)](s, p, s.shape[1], scale, BLOCK=triton.next_power_of_2(s.shape[1]),
                                         num_warps=8)
        else:
            p = torch.softmax(s.mul_(scale), dim=-1).to(q.dtype)
        torch.mm(p, v[i], out=out[i])
    return out


def main() -> None:
    from triton.testing import do_bench

    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__)
    g = torch.Generator(device="cuda").manual_seed(0)
    frames, L, d = 3, 6240, 384
    q, k, v = (torch.randn(frames, L, d, device="cuda", generator=g).to(torch.bfloat16) for _ in range(3))
    ref = F.scaled_dot_product_attention(q.double()[:1], k.double()[:1], v.double()[:1])
    flops = 4 * frames * L * L * d
    rows = [("sdpa (memory-efficient)",
             lambda: F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0]),
            ("mm fp32 scores + torch softmax + mm", lambda: explicit(q, k, v, False)),
            ("mm fp32 scores + triton softmax + mm", lambda: explicit(q, k, v, True))]
    for _ in range(2):
        for name, fn in rows:
            y = fn()
            err = ((y[:1].double() - ref).norm() / ref.norm()).item()
            ms = do_bench(fn, rep=300)
            print(f"{name:38s} {ms:.3f} ms ({flops / ms / 1e9:.0f} TFLOP/s), rel L2 vs fp64 {err:.2e}, "
                  f"max abs {(y[:1].double() - ref).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
