"""One-off (session 15): does the streaming decode give the same frames when another stream keeps the GPU busy?
(`e2e_determinism_session15.txt`: overlapped with the generator, frames differ from run to run.) The 81-frame
480x832 decode of `vae_decode_case`, isolated twice, then three times on a high-priority side stream while the
default stream runs queued 8192^3 bf16 GEMMs; then the VAE's library calls one by one (the mid block's attention
GEMMs, a 1x1 conv as addmm) the same way; and the decode's GEMM and conv kernels by name (torch.profiler).

    cd benchmarks/results && PYTHONPATH=CHECKOUT python decode_under_load_session15.py [bisect]     # on the GPU
"""

import sys
from collections import Counter

import torch
from torch.profiler import ProfilerActivity, profile

import streamgen.vae as vaemod
from streamgen.bench import vae_decode_case

BISECT = sys.argv[1:] == ["bisect"]  # the decode again with the VAE's Triton paths off in turn

LOAD = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
SINK = torch.empty_like(LOAD)


def under_load(fn, side: torch.cuda.Stream, gemms: int = 300):
    """fn() on `side` while the default stream runs `gemms` queued GEMMs."""
    torch.cuda.synchronize()
    for _ in range(gemms):
        torch.mm(LOAD, LOAD, out=SINK)
    with torch.cuda.stream(side):
        out = fn()
    torch.cuda.synchronize()
    return out


def compare(name: str, fn, side: torch.cuda.Stream, reps: int = 5, gemms: int = 300) -> None:
    ref = fn()
    again = [torch.equal(fn(), ref) for _ in range(reps)]
    loaded = [under_load(fn, side, gemms) for _ in range(reps)]
    diffs = [(x.float() - ref.float()).abs().max().item() for x in loaded]
    print(f"{name}: isolated repeats equal {again}; under load max |diff| {diffs}", flush=True)


def main() -> None:
    device = torch.device("cuda")
    side = torch.cuda.Stream(priority=-1)
    with torch.no_grad():
        vae, latents, sizes = vae_decode_case(device)
        vae.to_channels_last()

        def decode():
            decoder = vae.stream_decoder()
            return torch.cat([decoder.decode(c) for c in latents.split(sizes, dim=2)], dim=2)

        compare("streaming decode, 81 frames", decode, side, reps=3, gemms=600)
        if BISECT:
            for name, triton_convs, fused, per_pass in (
                    ("whole chunks per pass", True, True, None), ("torch convs", False, True, 2),
                    ("torch convs, whole chunks", False, True, None), ("no Triton at all", False, False, 2)):
                vaemod.set_triton_convs(triton_convs)
                vaemod.set_fused_kernels(fused)
                vae.decode_pass_frames = per_pass
                compare(f"streaming decode, 81 frames, {name}", decode, side, reps=3, gemms=600)
            vaemod.set_triton_convs(True)
            vaemod.set_fused_kernels(True)
            vae.decode_pass_frames = 2
            return

        q = torch.randn(6240, 384, device=device, dtype=torch.bfloat16)
        k = torch.randn(6240, 384, device=device, dtype=torch.bfloat16)
        p = torch.rand(6240, 6240, device=device, dtype=torch.bfloat16) / 6240
        compare("mid attention q k^T (fp32 out)", lambda: torch.mm(q, k.t(), out_dtype=torch.float32), side)
        compare("mid attention p v", lambda: torch.mm(p, k), side)
        for c, o, rows in ((384, 1152, 18720), (192, 384, 74880), (384, 192, 74880), (96, 192, 399360)):
            x = torch.randn(rows, c, device=device, dtype=torch.bfloat16)
            w = torch.randn(c, o, device=device, dtype=torch.bfloat16) / c**0.5
            b = torch.randn(o, device=device, dtype=torch.bfloat16)
            compare(f"1x1 conv as addmm, {rows} x {c} -> {o}", lambda x=x, w=w, b=b: torch.addmm(b, x, w), side)

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            decode()
            torch.cuda.synchronize()
        names = Counter()
        for e in prof.events():
            if e.device_type == torch.autograd.DeviceType.CUDA and any(
                    s in e.name.lower() for s in ("gemm", "nvjet", "cutlass", "cudnn", "xmma", "splitk", "reduce",
                                                  "sm90", "conv")):
                names[e.name[:110]] += 1
        for name, n in names.most_common(25):
            print(f"   {n:5d}  {name}")


if __name__ == "__main__":
    main()
