"""One-off: the 1.3B transformer's linears at a denoising step's and a refresh's token counts, bf16 as the engine
runs them (one F.linear per projection) against q/k/v as one GEMM and against fp8 (e4m3, row-wise scales through
torch._scaled_mm, activations quantized by plain torch ops). Prints ms per layer and the relative error of each
against an fp32 product, so the note's "what fp8 would give" is a measurement, not the data sheet's 2x.

    python benchmarks/results/linear_shapes_session7.py     # on the GPU machine
"""

import torch
import torch.nn.functional as F
from triton.testing import do_bench

DIM, FFN = 1536, 8960
SHAPES = {"q": (DIM, DIM), "k": (DIM, DIM), "v": (DIM, DIM), "out": (DIM, DIM), "cross q": (DIM, DIM),
          "cross out": (DIM, DIM), "ffn up": (DIM, FFN), "ffn down": (FFN, DIM)}
F8 = torch.float8_e4m3fn


def quantize(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise e4m3 with fp32 scales (amax / 448)."""
    scale = x.abs().amax(dim=-1, keepdim=True).float().clamp(min=1e-12) / torch.finfo(F8).max
    return (x / scale).to(F8), scale


def rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref).norm() / ref.norm()).item()


def fp8_linear(x: torch.Tensor, wq: torch.Tensor, ws: torch.Tensor, b: torch.Tensor,
               xq: torch.Tensor | None = None, xs: torch.Tensor | None = None) -> torch.Tensor:
    """x @ w.T + b in fp8; x quantized here unless its quantization (xq, xs) is given."""
    if xq is None:
        xq, xs = quantize(x)
    return torch._scaled_mm(xq, wq.t(), scale_a=xs, scale_b=ws.t(), bias=b, out_dtype=torch.bfloat16)


def linear_case(m: int, k: int, n: int) -> dict[str, float]:
    """Times (ms) and errors of one (M, K) x (K, N) linear in bf16 and fp8."""
    dev = torch.device("cuda")
    x = torch.randn(m, k, device=dev, dtype=torch.bfloat16)
    w = torch.randn(n, k, device=dev, dtype=torch.bfloat16) / k**0.5
    b = torch.randn(n, device=dev, dtype=torch.bfloat16)
    ref = x.float() @ w.float().t() + b.float()
    wq, ws = quantize(w)
    xq, xs = quantize(x)
    return {
        "bf16": do_bench(lambda: F.linear(x, w, b)),
        "fp8 gemm only": do_bench(lambda: fp8_linear(x, wq, ws, b, xq, xs)),
        "fp8 with act quant": do_bench(lambda: fp8_linear(x, wq, ws, b)),
        "err bf16": rel(F.linear(x, w, b), ref),
        "err fp8": rel(fp8_linear(x, wq, ws, b), ref),
    }


def main() -> None:
    torch.manual_seed(0)
    print(torch.cuda.get_device_name(), torch.__version__)
    for m in (4680, 10530):
        total = dict.fromkeys(("bf16", "bf16 qkv fused", "fp8 gemm only", "fp8 with act quant"), 0.0)
        for name, (k, n) in SHAPES.items():
            r = linear_case(m, k, n)
            flop = 2 * m * k * n / 1e9
            print(f"M {m:5d} {name:9s} ({k}x{n}): bf16 {r['bf16'] * 1e3:7.1f} us {flop / r['bf16']:4.0f} TFLOP/s"
                  f" | fp8 {r['fp8 gemm only'] * 1e3:7.1f} us {flop / r['fp8 gemm only']:4.0f} TFLOP/s,"
                  f" with act quant {r['fp8 with act quant'] * 1e3:7.1f} us"
                  f" | rel err bf16 {r['err bf16']:.1e} fp8 {r['err fp8']:.1e}")
            for key in ("bf16", "fp8 gemm only", "fp8 with act quant"):
                total[key] += r[key]
            if name not in ("q", "k", "v"):
                total["bf16 qkv fused"] += r["bf16"]
        qkv = linear_case(m, DIM, 3 * DIM)["bf16"]
        total["bf16 qkv fused"] += qkv
        print(f"M {m:5d} qkv fused ({DIM}x{3 * DIM}): bf16 {qkv * 1e3:7.1f} us {2 * m * DIM * 3 * DIM / qkv / 1e9:4.0f}"
              " TFLOP/s")
        print(f"M {m:5d} per layer: " + ", ".join(f"{k} {v:.3f} ms" for k, v in total.items())
              + "; x 30 layers: " + ", ".join(f"{k} {30 * v:.1f} ms" for k, v in total.items()))


if __name__ == "__main__":
    main()
