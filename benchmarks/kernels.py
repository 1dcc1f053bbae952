"""Benchmark the Triton kernels at Wan2.1 streaming shapes against their torch baselines (GPU only).

For every kernel: check bf16 correctness against the fp32 reference (max abs error, relative L2 error, next to the
torch baseline's own error), time kernel and baseline with ``triton.testing.do_bench``, and report achieved TB/s
(memory-bound kernels: bytes that must move once) or TFLOP/s (attention: 4*B*H*d*sum(keys seen per query), i.e.
4*B*H*Lq*Lk*d without a mask). Baselines: the eager fp32 torch ops (the ``*_reference`` functions, as the eager
engine would run them) and ``scaled_dot_product_attention`` on (B, H, L, d) copies made outside the timed region
(for the chunk-causal refresh: one SDPA call per block of queries, concatenated, as the engine's SDPA path runs it).
Each attention case has a second row, the engine's ``cudnn`` backend (cuDNN over the keys up to a multiple of 128,
the rest folded in by ``kernels.extend_attention``) against the same SDPA baseline; each denoising case a third,
``cudnn apart``: the same keys as a cached context and the chunk's own tokens held apart, as the engine denoises
(cuDNN over each one's aligned prefix, one merge). The VAE decoder's causal 3x3x3 convs (``kernels.conv3d``, over
zero-padded frames, bias added) run against the faster of cuDNN's two complete convs: one 2D conv per time tap summed
in place (``vae.conv_by_frames``) or one conv3d; TFLOP/s = 2 * outputs * 27 * C.

Default shapes: Wan2.1 1.3B (H=12, d=128), one chunk of 3 latent frames at 480x832 (Lq = 3 x 1560 = 4680 tokens),
keys = own chunk + full cache of 2 chunks (9360) + k compressed frames (390 tokens each); plus the chunk-causal
cache refresh (last compressed chunk + full window as queries over the whole prefix).

    python benchmarks/kernels.py                 # 1.3B shapes
    python benchmarks/kernels.py --model 14b     # 40 heads (dim 5120)
    OUT=/tmp/out python benchmarks/kernels.py    # also writes $OUT/kernels.json
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
from functools import partial

MODELS = {"1.3b": 12, "14b": 40}  # heads; head dim 128 for both
FRAME_TOKENS = 1560  # 480x832 -> latent 60x104 -> patches 30x52
COMPRESSED_FRAME_TOKENS = 390  # (1, 4, 4) patches: 15x26
# the VAE decoder's causal 3x3x3 convs for a 3-latent chunk at 480x832: (C, CO, output frames, H, W) per stage
VAE_CONVS = [(96, 96, 12, 480, 832), (192, 192, 12, 240, 416), (384, 384, 6, 120, 208), (384, 384, 3, 60, 104)]
# its three 2x spatial upsamplers for the same chunk: (frames, C, CO, H, W) of the input
UPSAMPLERS = [(6, 384, 192, 60, 104), (12, 384, 192, 120, 208), (12, 192, 96, 240, 416)]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="1.3b", help="head count preset (d = 128)")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--chunk-frames", type=int, default=3, help="latent frames per chunk (queries)")
    p.add_argument("--full-chunks", type=int, default=2, help="chunks kept at full resolution in the cache")
    p.add_argument("--compressed-frames", type=int, nargs="+", default=[0, 9, 15],
                   help="compressed frames in the cache, one attention case each")
    p.add_argument("--refresh-compressed-chunks", type=int, default=3,
                   help="compressed chunks in the prefix for the chunk-causal refresh case (0: skip)")
    p.add_argument("--dtype", choices=["bf16", "fp16"], default="bf16")
    p.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    p.add_argument("--rep", type=int, default=100, help="do_bench repetition time (ms)")
    p.add_argument("--no-graph", action="store_true", help="skip the CUDA-graph timings (graph_ms columns)")
    p.add_argument("--skip-attention", action="store_true")
    p.add_argument("--skip-elementwise", action="store_true")
    p.add_argument("--skip-vae", action="store_true",
                   help="skip the VAE decoder's kernels (convs, upsamplers, RGB conv, mid attention)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)

    import torch
    import triton

    if not torch.cuda.is_available():
        print("benchmarks/kernels.py needs a CUDA GPU", file=sys.stderr)
        return 2
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from kernels import attention as attn_mod
    from kernels.attention import attention_reference, chunk_attention
    from kernels.conv3d import fuses_norm, padded_conv3d
    from kernels.few_outputs_conv import few_outputs_conv3d
    from kernels.modulate import (
        gated_residual,
        gated_residual_reference,
        layernorm_modulate,
        layernorm_modulate_reference,
    )
    from kernels.qk_norm_rope import rms_norm_rope, rms_norm_rope_reference, rope, rope_reference
    from kernels.upsample_conv import upsample2x_conv2d, upsample2x_conv2d_reference
    from kernels.vae_ops import channel_rms_norm, channel_rms_norm_reference
    from streamgen.attention import Mask
    from streamgen.attention import attention as engine_attention
    from streamgen.vae import conv_by_frames, few_outputs_by_frames, pixel_attention, upsample2x_conv
    from streamgen.vae import set_fused_kernels as set_vae_fused_kernels

    torch.manual_seed(0)
    torch.backends.cudnn.allow_tf32 = False  # the fp32 references' convs in fp32 (cuDNN's default TF32 put one row's
    # reference 0.2 off in run 26: results/upsample_check_session13.txt); the kernels and baselines run bf16
    dev = "cuda"
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    H, d = MODELS[args.model], 128
    D, B = H * d, args.batch
    Lq = args.chunk_frames * FRAME_TOKENS
    full = args.full_chunks * args.chunk_frames * FRAME_TOKENS
    rows: list[dict] = []

    def bench(fn) -> float:
        return triton.testing.do_bench(fn, warmup=args.warmup, rep=args.rep, return_mode="median")

    def bench_graph(fn) -> float | None:
        """Time replays of a CUDA graph of fn: no launch overhead, which can dominate a ~10 us memory-bound op."""
        if args.no_graph:
            return None
        try:
            return triton.testing.do_bench_cudagraph(fn, rep=args.rep, return_mode="median")
        except Exception as e:  # capture can fail (e.g. an op that syncs); the do_bench number still stands
            print(f"  (cuda graph timing failed: {type(e).__name__}: {e})", flush=True)
            return None

    def timings(kernel_fn, base_fn, amount: float) -> dict:
        """ms (do_bench) and graph_ms (CUDA graph) for kernel and baseline; perf = amount / time, in 1e12/s."""
        t = {"ms": bench(kernel_fn), "base_ms": bench(base_fn),
             "graph_ms": bench_graph(kernel_fn), "base_graph_ms": bench_graph(base_fn)}
        for key, tkey in (("perf", "ms"), ("base_perf", "base_ms"), ("graph_perf", "graph_ms"),
                          ("base_graph_perf", "base_graph_ms")):
            t[key] = amount / t[tkey] * 1e-9 if t[tkey] else None
        return t

    def errors(out, ref) -> dict:
        diff = (out.float() - ref.float())
        return {"max_abs_err": diff.abs().max().item(), "rel_err": (diff.norm() / ref.float().norm()).item()}

    def fmt(value, spec: str, width: int) -> str:
        return f"{value:{width}{spec}}" if value is not None else f"{'-':>{width}}"

    def report(row: dict) -> None:
        rows.append(row)
        unit = row["unit"]
        print(f"{row['name']:<34} {row['shape']:<28} kernel {row['ms']:8.4f} ms {row['perf']:8.2f} {unit} "
              f"(graph {fmt(row['graph_ms'], '.4f', 8)} ms)   torch {row['base_ms']:8.4f} ms {row['base_perf']:8.2f} "
              f"{unit} (graph {fmt(row['base_graph_ms'], '.4f', 8)} ms)   err {row['max_abs_err']:.2e} "
              f"(rel {row['rel_err']:.1e}) torch err {row['base_max_abs_err']:.2e}", flush=True)

    def compared(name, shape, unit, amount, kernel_fn, base_fn, e, be, **extra) -> None:
        """A row of kernel_fn against base_fn, both timed; e / be: their errors against the reference; amount:
        bytes moved (unit TB/s) or floating-point operations (TFLOP/s)."""
        report({"name": name, "shape": shape, "unit": unit, "bytes" if unit == "TB/s" else "flops": amount,
                **timings(kernel_fn, base_fn, amount), **e, "base_max_abs_err": be["max_abs_err"],
                "base_rel_err": be["rel_err"], **extra})

    def mem_row(name, shape, nbytes, kernel_fn, base_fn, ref) -> None:
        compared(name, shape, "TB/s", nbytes, kernel_fn, base_fn, errors(kernel_fn(), ref), errors(base_fn(), ref))

    print(f"device {torch.cuda.get_device_name()}  torch {torch.__version__}  triton {triton.__version__}  "
          f"model {args.model} (H={H}, d={d})  {args.dtype}", flush=True)

    if not args.skip_elementwise:
        el = dtype.itemsize
        x = torch.randn(B, Lq, D, device=dev, dtype=dtype) * 2 + 0.3
        shift = torch.randn(B, D, device=dev) * 0.5
        scale = torch.randn(B, D, device=dev) * 0.5
        ref = layernorm_modulate_reference(x.float(), shift, scale, 1e-6)
        mem_row("layernorm_modulate", f"({B},{Lq},{D})", 2 * x.numel() * el + 2 * B * D * 4,
                lambda: layernorm_modulate(x, shift, scale, 1e-6),
                lambda: layernorm_modulate_reference(x, shift, scale, 1e-6), ref)

        y = torch.randn_like(x)
        gate = torch.randn(B, D, device=dev)
        ref = gated_residual_reference(x.float(), y, gate)
        nbytes = 3 * x.numel() * el + B * D * 4
        mem_row("gated_residual", f"({B},{Lq},{D})", nbytes, lambda: gated_residual(x, y, gate),
                lambda: gated_residual_reference(x, y, gate), ref)
        # in place, repeated: a zero gate keeps x fixed across repetitions (same bytes moved, checkable result)
        x_inplace, zero_gate = x.clone(), torch.zeros_like(gate)
        mem_row("gated_residual (out=x)", f"({B},{Lq},{D})", nbytes,
                lambda: gated_residual(x_inplace, y, zero_gate, out=x_inplace),
                lambda: x_inplace.copy_(gated_residual_reference(x_inplace, y, zero_gate)), x.float())

        w = torch.randn(D, device=dev) * 0.1 + 1
        ang = torch.rand(Lq, d // 2, device=dev) * 6.3
        cos, sin = ang.cos(), ang.sin()
        ref = rms_norm_rope_reference(x.float(), w, 1e-6, cos, sin, H)
        nbytes = 2 * x.numel() * el + D * 4 + 2 * cos.numel() * 4
        mem_row("rms_norm_rope (q)", f"({B},{Lq},{H}x{d})", nbytes, lambda: rms_norm_rope(x, w, 1e-6, cos, sin, H),
                lambda: rms_norm_rope_reference(x, w, 1e-6, cos, sin, H), ref)
        ref = rms_norm_rope_reference(x.float(), w, 1e-6, None, None, H)
        mem_row("rms_norm (k, cos=None)", f"({B},{Lq},{H}x{d})", 2 * x.numel() * el + D * 4,
                lambda: rms_norm_rope(x, w, 1e-6, None, None, H),
                lambda: rms_norm_rope_reference(x, w, 1e-6, None, None, H), ref)

        Lc = full + Lq
        kc = torch.randn(B, Lc, H, d, device=dev, dtype=dtype)
        ang = torch.rand(Lc, d // 2, device=dev) * 6.3
        cos, sin = ang.cos(), ang.sin()
        ref = rope_reference(kc.float(), cos, sin)
        mem_row("rope (cached k)", f"({B},{Lc},{H},{d})", 2 * kc.numel() * el + 2 * cos.numel() * 4,
                lambda: rope(kc, cos, sin), lambda: rope_reference(kc, cos, sin), ref)
        del x, y, kc, ref

    if not args.skip_attention:
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def attention_case(name, lq, lk, blocks=None):
            """blocks: (query start, end, keys seen) of a prefix mask, given to the kernel as per-query key limits
            and to SDPA as the engine's SDPA path does: one unmasked call per block, outputs concatenated."""
            kv_limit = None if blocks is None else torch.cat(
                [torch.full((b - a,), e, dtype=torch.int32) for a, b, e in blocks]).to(dev)
            q = torch.randn(B, lq, H, d, device=dev, dtype=dtype)
            k = torch.randn(B, lk, H, d, device=dev, dtype=dtype)
            v = torch.randn(B, lk, H, d, device=dev, dtype=dtype)
            # reference head by head in fp32 (the full score matrix of all heads would be tens of GiB)
            ref = torch.cat([attention_reference(*(t[:, :, h:h + 1].float() for t in (q, k, v)), kv_limit)
                             for h in range(H)], dim=2)
            qt, kt, vt = (t.transpose(1, 2).contiguous() for t in (q, k, v))

            def library():
                if blocks is None:
                    return sdpa(qt, kt, vt)
                return torch.cat([sdpa(qt[:, :, a:b], kt[:, :, :e], vt[:, :, :e]) for a, b, e in blocks], dim=2)

            # the engine's `cudnn` backend: SDPA's cuDNN kernel over the keys up to a multiple of 128, the rest
            # folded in by kernels.extend_attention (each block of a prefix mask alike)
            mask = None if blocks is None else Mask(blocks, None)
            os.environ["STREAMGEN_ATTENTION"] = "cudnn"

            def cudnn_aligned():
                return engine_attention(q, k, v, mask)

            def cudnn_apart():  # as the engine denoises: the context (cache) and the chunk's own tokens held apart
                return engine_attention(q, k[:, -lq:], v[:, -lq:], context=(k[:, :-lq], v[:, :-lq]))

            out = chunk_attention(q, k, v, kv_limit)  # also runs the autotuner for this shape
            best = getattr(attn_mod._attn_fwd_tuned, "best_config", None)
            base = library().transpose(1, 2)
            e, be, ce = errors(out, ref), errors(base, ref), errors(cudnn_aligned(), ref)
            ae = errors(cudnn_apart(), ref) if blocks is None else None
            del ref, base
            seen = lq * lk if kv_limit is None else int(kv_limit.long().sum())
            flops = 4 * B * H * d * seen
            shape = f"q({B},{lq},{H},{d}) k({lk})"
            compared(name, shape, "TFLOP/s", flops, lambda: chunk_attention(q, k, v, kv_limit), library, e, be,
                     config=str(best) if best is not None else None)
            compared(f"{name}, cudnn", shape, "TFLOP/s", flops, cudnn_aligned, library, ce, be)
            if blocks is None:
                compared(f"{name}, cudnn apart", shape, "TFLOP/s", flops, cudnn_apart, library, ae, be)
            del os.environ["STREAMGEN_ATTENTION"]

        for cf in args.compressed_frames:
            lk = Lq + full + cf * COMPRESSED_FRAME_TOKENS
            attention_case(f"attention denoise (+{cf} cmp frames)", Lq, lk)

        n = args.refresh_compressed_chunks
        if n > 0:
            cchunk = args.chunk_frames * COMPRESSED_FRAME_TOKENS
            fchunk = args.chunk_frames * FRAME_TOKENS
            lk = n * cchunk + args.full_chunks * fchunk
            q_chunks = [cchunk] + [fchunk] * args.full_chunks  # the chunk that turned compressed + the full window
            ends = [n * cchunk + i * fchunk for i in range(args.full_chunks + 1)]
            starts = [0, *itertools.accumulate(q_chunks)]
            attention_case(f"attention refresh ({n} cmp chunks)", sum(q_chunks), lk,
                           list(zip(starts, starts[1:], ends)))

    if not args.skip_vae:
        F = torch.nn.functional
        for c, o, t, h, w in VAE_CONVS:
            buf = torch.randn(B, c, t + 2, h, w, device=dev, dtype=dtype).contiguous(
                memory_format=torch.channels_last_3d)
            weight = (torch.randn(o, c, 3, 3, 3, device=dev) / (27 * c) ** 0.5).to(dtype).contiguous(
                memory_format=torch.channels_last_3d)
            bias = torch.randn(o, device=dev, dtype=dtype)
            padded = F.pad(buf.permute(0, 2, 3, 4, 1), (0, 0, 1, 1, 1, 1)).contiguous()  # zero ring, as the VAE
            windows = [padded[:, k : k + t] for k in range(3)]
            ref = F.conv3d(buf.float(), weight.float(), bias.float(), padding=(0, 1, 1))
            # the faster of cuDNN's two ways: one 2D conv per time tap summed in place, or one 3D conv
            libraries = {"frame convs": lambda buf=buf, weight=weight, bias=bias: conv_by_frames(buf, weight, bias,
                                                                                                   (1, 1)),
                         "conv3d": lambda buf=buf, weight=weight, bias=bias: F.conv3d(buf, weight, bias,
                                                                                      padding=(0, 1, 1))}
            name, library = min(libraries.items(), key=lambda kv: bench(kv[1]))

            def ours(windows=windows, weight=weight, bias=bias, pair_frames=True):
                return padded_conv3d(windows, weight, bias, pair_frames=pair_frames)

            e, be = errors(ours(), ref), errors(library(), ref)
            one = errors(ours(pair_frames=False), ref) if o <= 96 else None  # o <= 96: two frames per program
            del ref
            flops = 2 * B * o * t * h * w * 27 * c
            shape = f"({B},{c},{t}+2,{h},{w})"
            compared(f"vae conv {c}->{o} (cuDNN {name})", shape, "TFLOP/s", flops, ours, library, e, be)
            if one is not None:  # the same conv with one output frame per program
                compared(f"vae conv {c}->{o} (one frame per program)", shape, "TFLOP/s", flops, ours,
                         partial(ours, pair_frames=False), e, one)
            if fuses_norm(c, o):  # the next norm + SiLU in the epilogue vs the same conv, then the norm kernel
                gamma = torch.randn(o, 1, 1, 1, device=dev, dtype=dtype)
                nxt = torch.zeros(B, t, h + 2, w + 2, o, device=dev, dtype=dtype)  # the next conv's padded frames
                inside = nxt[:, :, 1:-1, 1:-1].permute(0, 4, 1, 2, 3)
                conv = F.conv3d(buf.float(), weight.float(), bias.float(), padding=(0, 1, 1))
                ref = channel_rms_norm_reference(conv, gamma.float(), silu=True)
                del conv

                def fused(windows=windows, weight=weight, bias=bias, gamma=gamma, inside=inside):
                    return padded_conv3d(windows, weight, bias, norm_silu=gamma, out=inside)

                def apart(windows=windows, weight=weight, bias=bias, gamma=gamma, inside=inside):
                    return channel_rms_norm(padded_conv3d(windows, weight, bias), gamma, silu=True, out=inside)

                e, be = errors(fused().clone(), ref), errors(apart().clone(), ref)
                del ref
                compared(f"vae conv {c}->{o} + norm (apart)", shape, "TFLOP/s", flops, fused, apart, e, be)
                del nxt, inside
            del buf, padded, windows
        # the 2x upsamplers (nearest 2x + 3x3 conv) of a 3-latent chunk: the Triton phase GEMMs writing the
        # interleaved output against the library path (cuDNN's conv of the four phases + torch's strided interleave,
        # `upsample2x_conv` with the fused kernels off); TFLOP/s = 2 * outputs * 4 * C (each phase a 2x2 conv)
        for n, c, o, h, w in UPSAMPLERS:
            x = torch.randn(n, c, h, w, device=dev, dtype=dtype).contiguous(memory_format=torch.channels_last)
            conv = torch.nn.Conv2d(c, o, 3, padding=1, device=dev, dtype=dtype)
            with torch.no_grad():
                ref = upsample2x_conv2d_reference(x.float(), conv.weight.float(), conv.bias.float())

                def library(x=x, conv=conv):
                    set_vae_fused_kernels(False)
                    try:
                        return upsample2x_conv(x, conv)
                    finally:
                        set_vae_fused_kernels(True)

                e, be = errors(upsample2x_conv2d(x, conv.weight, conv.bias), ref), errors(library(), ref)
                flops = 2 * n * o * 4 * h * w * 4 * c
                compared(f"vae upsample conv {c}->{o} (cuDNN)", f"({n},{c},{h},{w})", "TFLOP/s", flops,
                         lambda x=x, conv=conv: upsample2x_conv2d(x, conv.weight, conv.bias), library, e, be)
            del x, conv, ref
        # the RGB conv (96 -> 3) of a 12-frame chunk at full resolution: one Triton pass over the padded frames
        # against cuDNN's conv2d with 9 outputs and the tap sums (`few_outputs_by_frames`); bytes: frames in, fp32 out
        n, c, h, w = 12, 96, 480, 832
        frames = torch.randn(1, n, h, w, c, device=dev, dtype=dtype)
        padded, video = F.pad(frames, (0, 0, 1, 1, 1, 1)), frames.permute(0, 4, 1, 2, 3)
        weight = (torch.randn(3, c, 3, 3, 3, device=dev) / (27 * c) ** 0.5).to(dtype)
        bias = torch.randn(3, device=dev, dtype=dtype)
        ref = F.conv3d(F.pad(video.float(), (1, 1, 1, 1, 2, 0)), weight.float(), bias.float())
        mem_row("vae rgb conv 96->3 (vs cuDNN)", f"(1,{c},{n},{h},{w})",
                padded.numel() * dtype.itemsize + ref.numel() * 4,
                lambda: few_outputs_conv3d(padded, weight, bias)[0],
                lambda: few_outputs_by_frames(video, weight, bias, (1, 1), None)[0], ref)
        del frames, padded, video, ref
        # the mid block's attention over a 3-latent chunk's frames at 60x104, head dim 384: the engine's GEMMs around
        # the softmax kernel against SDPA (its memory-efficient kernel: no flash or cuDNN kernel takes d = 384)
        n, L, c = 3, 60 * 104, 384
        q, k, v = (torch.randn(n, 1, L, c, device=dev, dtype=dtype) for _ in range(3))
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float())
        flops = 4 * n * L * L * c
        with torch.no_grad():
            e, be = errors(pixel_attention(q, k, v), ref), errors(F.scaled_dot_product_attention(q, k, v), ref)
            compared("vae mid attention (d 384, vs SDPA)", f"({n},1,{L},{c})", "TFLOP/s", flops,
                     lambda: pixel_attention(q, k, v), lambda: F.scaled_dot_product_attention(q, k, v), e, be)
        del q, k, v, ref

    print()
    print("ms: do_bench (includes launch overhead); graph: CUDA-graph replay (GPU time only); perf from each; "
          "torch = eager fp32 ops / SDPA / cuDNN")
    print(f"{'kernel':<34} {'shape':<28} {'ms':>9} {'torch ms':>9} {'speedup':>7} {'perf':>8} {'torch':>8} "
          f"{'graph ms':>9} {'torch':>9} {'speedup':>7} {'perf':>8} {'torch':>8} {'unit':<8} {'max err':>9} "
          f"{'torch err':>9}")
    for r in rows:
        gspeed = r["base_graph_ms"] / r["graph_ms"] if r["graph_ms"] and r["base_graph_ms"] else None
        print(f"{r['name']:<34} {r['shape']:<28} {r['ms']:9.4f} {r['base_ms']:9.4f} {r['base_ms'] / r['ms']:7.2f} "
              f"{r['perf']:8.2f} {r['base_perf']:8.2f} {fmt(r['graph_ms'], '.4f', 9)} "
              f"{fmt(r['base_graph_ms'], '.4f', 9)} {fmt(gspeed, '.2f', 7)} {fmt(r['graph_perf'], '.2f', 8)} "
              f"{fmt(r['base_graph_perf'], '.2f', 8)} {r['unit']:<8} {r['max_abs_err']:9.2e} "
              f"{r['base_max_abs_err']:9.2e}")

    out_dir = os.environ.get("OUT")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        meta = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "triton": triton.__version__,
                "model": args.model, "heads": H, "head_dim": d, "dtype": args.dtype, "lq": Lq}
        with open(os.path.join(out_dir, "kernels.json"), "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
        print(f"wrote {os.path.join(out_dir, 'kernels.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
