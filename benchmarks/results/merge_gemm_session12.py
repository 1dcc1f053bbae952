"""Would a cache refresh and the next chunk's first denoising step gain from one forward? The GEMMs of one block
at the token counts of a denoising step (4680), a refresh of chunk 5 (10530), both together (15210), timed from CUDA
graphs on the H100 (1.3B dims, bf16)."""

import torch
import torch.nn.functional as F


def block_gemms(m: int, dim: int = 1536, ffn: int = 8960):
    dev = torch.device("cuda")
    x = torch.randn(m, dim, device=dev, dtype=torch.bfloat16)
    w = {n: torch.randn(o, i, device=dev, dtype=torch.bfloat16) * i**-0.5
         for n, (o, i) in dict(q=(dim, dim), k=(dim, dim), v=(dim, dim), o=(dim, dim), cq=(dim, dim), co=(dim, dim),
                               up=(ffn, dim), down=(dim, ffn)).items()}
    b = {n: torch.zeros(t.shape[0], device=dev, dtype=torch.bfloat16) for n, t in w.items()}

    def run():
        for n in ("q", "k", "v", "o", "cq", "co"):
            F.linear(x, w[n], b[n])
        h = torch._addmm_activation(b["up"], x, w["up"].t(), use_gelu=True)
        F.linear(h, w["down"], b["down"])
    return run


def graph_ms(fn, reps: int = 20) -> float:
    fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(reps):
            fn()
    g.replay()
    torch.cuda.synchronize()
    best = []
    for _ in range(5):
        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        s.record()
        g.replay()
        e.record()
        torch.cuda.synchronize()
        best.append(s.elapsed_time(e) / reps)
    return min(best)


def main() -> None:
    print(torch.cuda.get_device_name(), torch.__version__)
    flops_per_token = 2 * (6 * 1536 * 1536 + 2 * 1536 * 8960)
    res = {}
    for m in (4680, 10530, 15210, 9360, 5850, 1560, 6240, 4680 * 2):
        ms = graph_ms(block_gemms(m))
        res[m] = ms
        print(f"M {m:6d}: {ms:.3f} ms per block ({flops_per_token * m / ms / 1e9:.0f} TFLOP/s)")
    print(f"refresh + step apart {res[10530] + res[4680]:.3f} ms vs together {res[15210]:.3f} ms per block; x30 layers "
          f"{30 * (res[10530] + res[4680] - res[15210]):.2f} ms per merge")


if __name__ == "__main__":
    main()
