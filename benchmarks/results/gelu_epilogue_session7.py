"""One-off: the FFN's first linear + tanh GELU as the engine ran it (F.linear, then F.gelu: a pass over the
(tokens, 8960) hidden) against torch._addmm_activation(use_gelu=True) (cuBLASLt's GELU epilogue), at a denoising
step's and a refresh's token counts; errors against fp32.

    python benchmarks/results/gelu_epilogue_session7.py     # on the GPU machine
"""

import torch
import torch.nn.functional as F
from triton.testing import do_bench


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref).norm() / ref.norm()).item()


def main() -> None:
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__)
    for m in (4680, 10530):
        x = torch.randn(1, m, 1536, device="cuda", dtype=torch.bfloat16)
        w = torch.randn(8960, 1536, device="cuda", dtype=torch.bfloat16) / 1536**0.5
        b = torch.randn(8960, device="cuda", dtype=torch.bfloat16)
        ref = F.gelu(x.float() @ w.float().t() + b.float(), approximate="tanh")

        def two_passes(x=x, w=w, b=b):
            return F.gelu(F.linear(x, w, b), approximate="tanh")

        def epilogue(x=x, w=w, b=b, m=m):
            return torch._addmm_activation(b, x.view(-1, 1536), w.t(), use_gelu=True).view(1, m, -1)

        t_two, t_epi = do_bench(two_passes), do_bench(epilogue)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = epilogue()
        graph.replay()
        torch.cuda.synchronize()
        print(f"M {m}: linear + gelu {t_two * 1e3:.1f} us, GELU epilogue {t_epi * 1e3:.1f} us ({t_two / t_epi:.3f}x);"
              f" rel err vs fp32: {rel(two_passes(), ref):.2e} / {rel(epilogue(), ref):.2e};"
              f" graph replay equal to eager: {torch.equal(out, epilogue())}")
    # which GELU the epilogue computes: in fp32, tanh-approximate and exact GELU differ by up to ~5e-4
    x, w, b = (torch.randn(256, 512, device="cuda"), torch.randn(1024, 512, device="cuda") / 512**0.5,
               torch.randn(1024, device="cuda"))
    y = torch._addmm_activation(b, x, w.t(), use_gelu=True)
    pre = (x.double() @ w.double().t() + b.double())
    for approximate in ("tanh", "none"):
        print(f"fp32 epilogue vs float64 GELU(approximate={approximate!r}): max abs diff"
              f" {(y.double() - F.gelu(pre, approximate=approximate)).abs().max().item():.2e}")


if __name__ == "__main__":
    main()
