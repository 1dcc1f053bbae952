"""Would one q/k/v projection GEMM (N = 3 D) beat three (N = D each)? Timed from CUDA graphs on the H100 at a
denoising step's 4,680 tokens and a refresh's 10,530 (1.3B dims, bf16), each repeated 30 times (one per layer).

    python benchmarks/results/qkv_gemm_session12.py     # on the GPU machine
"""

import torch
import torch.nn.functional as F


def graph_ms(fn, reps: int = 30) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    best = []
    for _ in range(7):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        best.append(s.elapsed_time(e) / reps)
    return sorted(best)[len(best) // 2]


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__)
    dev, dim = torch.device("cuda"), 1536
    w = [torch.randn(dim, dim, device=dev, dtype=torch.bfloat16) * dim**-0.5 for _ in range(3)]
    b = [torch.zeros(dim, device=dev, dtype=torch.bfloat16) for _ in range(3)]
    wf, bf = torch.cat(w), torch.cat(b)
    for m in (4680, 10530, 1560):
        x = torch.randn(m, dim, device=dev, dtype=torch.bfloat16)
        for rep in range(2):
            three = graph_ms(lambda x=x: [F.linear(x, wi, bi) for wi, bi in zip(w, b)])
            one = graph_ms(lambda x=x: F.linear(x, wf, bf))
            print(f"M {m:6d} rep {rep}: three GEMMs {three * 1e3:.1f} us, one {one * 1e3:.1f} us "
                  f"(x30 layers: {30 * (three - one):.2f} ms per forward)")


if __name__ == "__main__":
    main()
