"""Everything the GPU has to say in one call: kernel checks and speeds, fast-path correctness, stream latency.

    python -m benchmarks.gpu        # from the repository root on a CUDA machine; JSON and markdown go under $OUT

Sections (each can be skipped), in order: VAE decode (first, in a fresh process, so its peaks are its own), correctness
of the fast path against the plain torch path on final latents (and the same seed giving the same frames), latency of
the 1.3B stream per step budget, A/B of the fast path's parts, 14B latency, kernels (benchmarks/kernels.py). Before and
after them the machine's bf16 GEMM rate and copy bandwidth are measured, so that runs on different machines of one
kind can be read against each other.
The short table comes last.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from streamgen import model as model_module
from streamgen import vae as vae_module
from streamgen.bench import markdown, plot, random_pipeline, run_budget, vae_decode_case
from streamgen.engine import chunk_sizes
from streamgen.vae import to_uint8_frames

ROOT = Path(__file__).resolve().parent.parent


@contextlib.contextmanager
def timed_section(name: str, report: dict, out: Path):
    """Prints how long a section took and writes the report so far: the whole run has to fit one device call, and
    one that does not keeps what it measured."""
    t = time.perf_counter()
    yield
    print(f"[{name} section {time.perf_counter() - t:.0f}s]", flush=True)
    (out / "gpu.json").write_text(json.dumps(report, indent=2, default=str))


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def correctness(pipe, prompt, steps: int) -> tuple[dict, torch.Tensor]:
    """Final latents of the whole 81-frame stream: fused kernels + default attention vs plain torch + SDPA. Returns
    the comparison and the default path's latents."""
    latent_frames, h, w = pipe.latent_size(480, 832, 81)
    kwargs = dict(height=h, width=w, num_frames=latent_frames, steps=steps, seed=0)
    fast = pipe.generator.generate(prompt, **kwargs)
    model_module.set_fused_kernels(False)
    os.environ["STREAMGEN_ATTENTION"] = "sdpa"
    try:
        ref = pipe.generator.generate(prompt, **kwargs)
    finally:
        model_module.set_fused_kernels(True)
        del os.environ["STREAMGEN_ATTENTION"]
    os.environ["STREAMGEN_ATTENTION"] = "triton"
    try:
        triton_attn = pipe.generator.generate(prompt, **kwargs)
    finally:
        del os.environ["STREAMGEN_ATTENTION"]
    return {"steps": steps, "rel_l2_fast_vs_torch": rel_l2(fast, ref), "rel_l2_triton_attention_vs_torch":
            rel_l2(triton_attn, ref), "finite": bool(torch.isfinite(fast).all())}, fast


def reproducible(pipe, prompt, steps: int, latents: torch.Tensor) -> dict:
    """The same seed must give the same frames: two end-to-end streams (the decode beside the generator, on its own
    stream) against each other and against `latents` (the same stream's, seed 0, from `correctness`) decoded alone,
    chunk by chunk."""
    first = pipe.generate(prompt, steps=steps, seed=0)
    again = pipe.generate(prompt, steps=steps, seed=0)
    sizes = chunk_sizes(pipe.transformer.config.chunk_partition, latents.shape[2])
    alone = to_uint8_frames(pipe.vae.decode(latents, latents_per_chunk=sizes))
    return {"frames_equal_run_to_run": bool((first == again).all()),
            "frames_equal_decode_alone": bool((first == alone).all()),
            "max_abs_diff_decode_alone": int(abs(first.astype(int) - alone.astype(int)).max())}


def vae_decode(device: torch.device) -> dict:
    """Whole-video streaming decode per VAE code path, chunked as the stream: seconds, peak GiB above the weights
    and max abs difference from the plain path (torch norm, channels-first, 3D convolutions)."""
    vae, latents, sizes = vae_decode_case(device)
    # (fused norm, channels-last, frame convolutions, Triton 3x3x3 convolutions, video frames per pass)
    variants = [(False, False, False, False, None), (True, True, False, False, None), (True, True, True, False, None),
                (True, True, True, True, None), (True, True, True, True, 2), (True, True, True, True, 4),
                (True, True, True, True, 1)]
    # the last four: the default path, a whole chunk or a few frames per pass (2: the default)
    results: dict[str, dict] = {}
    reference: list[torch.Tensor] = []  # the plain path's frames per chunk

    for fused, last, frame_convs, triton_convs, per_pass in variants:
        vae_module.set_fused_kernels(fused)
        vae_module.set_frame_convs(frame_convs)
        vae_module.set_triton_convs(triton_convs)
        vae.to_channels_last(last)
        vae.decode_pass_frames = per_pass
        name = (f"{'fused' if fused else 'torch'} norm, {'channels-last' if last else 'channels-first'}, "
                f"{'Triton 3x3x3' if triton_convs else 'frame' if frame_convs else '3D'} convs")
        name += f", {per_pass} frame{'s' if per_pass > 1 else ''} per pass" if per_pass else ""
        with torch.no_grad():
            for _ in range(2):  # the first pass builds cuDNN plans and compiles the kernels
                decoder = None  # the last decode's kept frames: not part of this one's baseline
                diff = torch.zeros((), device=device)
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats(device)
                base = torch.cuda.memory_allocated(device)
                t = time.perf_counter()
                decoder = vae.stream_decoder()
                for i, chunk in enumerate(latents.split(sizes, dim=2)):
                    frames = decoder.decode(chunk)
                    if len(reference) < len(sizes):
                        reference.append(frames)
                    diff = torch.maximum(diff, (frames - reference[i]).abs().max())  # on the GPU: no sync
                    del frames
                torch.cuda.synchronize()
                seconds = time.perf_counter() - t
                diff = diff.item()
        peak = (torch.cuda.max_memory_allocated(device) - base) / 2**30
        results[name] = {"seconds": seconds, "peak_gib": peak, "max_abs_diff": diff}
        print(f"vae {name}: {seconds:.3f}s, peak {peak:.2f} GiB above the weights, max abs diff vs the plain path "
              f"{diff:.3e}", flush=True)

    vae_module.set_fused_kernels(True)
    results["upsampling layers of a 3-latent chunk"] = upsampling_ab(vae)
    return results


def upsampling_ab(vae) -> dict[str, float]:
    """The decoder's three nearest-2x upsample + 3x3 conv layers at a 3-latent chunk's shapes (channels-last, bf16):
    `vae.upsample2x_conv` against upsampling then convolving, seconds of all three, and the max abs difference."""
    from torch.utils.benchmark import Timer

    from streamgen.vae import Resample, upsample2x_conv

    layers = [m for m in vae.decoder.modules() if isinstance(m, Resample) and m.mode.startswith("up")]
    shapes = [(6, 60, 104), (12, 120, 208), (12, 240, 416)]  # (frames, height, width) entering each layer
    inputs = [torch.randn(f, m.resample[1].in_channels, h, w, device=vae.device, dtype=vae.dtype).contiguous(
        memory_format=torch.channels_last) for m, (f, h, w) in zip(layers, shapes)]
    out = {}
    with torch.no_grad():
        pairs = list(zip(layers, inputs))
        sync = torch.cuda.synchronize if vae.device.type == "cuda" else lambda: None
        for name, fn in (("upsample then conv", lambda: [m.resample(x) for m, x in pairs]),
                         ("upsample2x_conv", lambda: [upsample2x_conv(x, m.resample[1]) for m, x in pairs])):
            out[name] = Timer("fn(); sync()", globals={"fn": fn, "sync": sync}).blocked_autorange(
                min_run_time=1.0).median
        diff = max((upsample2x_conv(x, m.resample[1]) - m.resample(x)).abs().max().item() for m, x in pairs)
    out["max_abs_diff"] = diff
    print(f"vae upsampling layers: {out}", flush=True)
    return out


def machine_probe(device: torch.device) -> dict:
    """This machine's bf16 GEMM rate and device copy bandwidth (medians of do_bench): H100s of the same kind differ by
    a few percent, as much as a small change to the engine, so a run's tables are read against its machine."""
    import triton

    n = 8192
    a, b = (torch.randn(n, n, device=device, dtype=torch.bfloat16) for _ in range(2))
    gemm_ms = triton.testing.do_bench(lambda: torch.mm(a, b), rep=300, return_mode="median")
    x = torch.empty(2**29, device=device, dtype=torch.bfloat16)  # 1 GiB
    y = torch.empty_like(x)
    copy_ms = triton.testing.do_bench(lambda: y.copy_(x), rep=300, return_mode="median")
    return {"gemm_bf16_8192_tflops": 2 * n**3 / gemm_ms / 1e9, "copy_tbps": 2 * x.nbytes / copy_ms / 1e9}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--skip", nargs="*", default=[],
                   choices=["kernels", "correctness", "latency", "ab", "14B", "vae"])
    p.add_argument("--steps", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    args = p.parse_args()
    out = Path(os.environ.get("OUT", "bench_out"))
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda")
    report: dict = {"device": torch.cuda.get_device_name(device), "torch": torch.__version__,
                    "command": "python -m benchmarks.gpu " + " ".join(sys.argv[1:])}
    import triton

    report["triton"] = triton.__version__
    print(json.dumps(report), flush=True)
    report["machine_at_start"] = machine_probe(device)
    print("machine at start:", report["machine_at_start"], flush=True)
    summary: list[str] = []

    if "vae" not in args.skip:
        with timed_section("vae", report, out):
            report["vae_decode"] = vae_decode(device)
            torch.cuda.empty_cache()
            paths = {k: v for k, v in report["vae_decode"].items() if "seconds" in v}
            summary.append("VAE streaming decode of 81 frames (480x832, bf16), chunked like the stream (s / peak GiB): "
                           + "; ".join(f"{k} {v['seconds']:.3f} / {v['peak_gib']:.2f}" for k, v in paths.items())
                           + f"; upsampling layers: {report['vae_decode']['upsampling layers of a 3-latent chunk']}")

    pipe = random_pipeline("1.3B", device, torch.bfloat16)
    prompt = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)

    if "correctness" not in args.skip:
        with timed_section("correctness", report, out):
            report["correctness"], latents = correctness(pipe, prompt, 4)
            c = report["correctness"]
            print("correctness:", c, flush=True)
            summary.append(f"fast path vs torch path, 4 steps, final latents: rel L2 {c['rel_l2_fast_vs_torch']:.2e} "
                           f"(Triton attention: {c['rel_l2_triton_attention_vs_torch']:.2e}; target < 2e-2)")
            report["reproducible"] = r = reproducible(pipe, prompt, 4, latents)
            print("reproducible:", r, flush=True)
            summary.append(f"same seed, same frames (4 steps, end to end): run to run {r['frames_equal_run_to_run']}, "
                           f"against the latents decoded alone {r['frames_equal_decode_alone']} (max |diff| "
                           f"{r['max_abs_diff_decode_alone']})")

    # The correctness runs' other kernel choices captured graphs of their own: dropped, so they neither hold memory
    # in the peaks below nor push the default path's graphs out of the runner's LRU. Then a warm-up: autotuning,
    # cuDNN plans, CUDA graphs.
    pipe.transformer.cuda_graphs.clear()
    torch.cuda.empty_cache()
    run_budget(pipe, 1, prompt, 480, 832, 81)
    if "latency" not in args.skip:
        with timed_section("latency", report, out):
            results = []
            for steps in args.steps:
                results.append(run_budget(pipe, steps, prompt, 480, 832, 81))
                r = results[-1]
                print(f"1.3B steps {steps}: first {r.first_frame_s:.3f}s fps {r.fps:.1f} (latents {r.fps_latents:.1f}) "
                      f"chunks {[round(c, 3) for c in r.chunk_s]} decode {[round(d, 3) for d in r.decode_s]} "
                      f"peak {r.peak_gib:.2f} GiB, graphs captured so far {pipe.transformer.cuda_graphs.captures}",
                      flush=True)
            report["latency_1.3B"] = [vars(r) | {"fps": r.fps, "fps_latents": r.fps_latents} for r in results]
            table = markdown(results, f"1.3B, 480x832, 81 frames, bf16, {report['device']}, torch {torch.__version__}")
            (out / "latency_1.3B.md").write_text(table + "\n")
            plot(results, f"1.3B, 480x832, 81 frames, bf16, {report['device']}", out / "latency_1.3B.png")
            summary.append(table)

    if "ab" not in args.skip:
        with timed_section("ab", report, out):
            def ab_run() -> dict:
                """A 4-step stream, the second of two: the first builds what this variant has not used yet (graphs,
                cuDNN plans, compiled kernels for new shapes)."""
                run_budget(pipe, 4, prompt, 480, 832, 81)
                r = run_budget(pipe, 4, prompt, 480, 832, 81)
                return {"fps": r.fps, "fps_latents": r.fps_latents, "first_frame_s": r.first_frame_s,
                        "peak_gib": r.peak_gib}

            ab = {}
            for backend in ("cudnn", "sdpa", "triton"):  # cudnn: the default on Hopper
                os.environ["STREAMGEN_ATTENTION"] = backend
                ab[backend] = ab_run()
                del os.environ["STREAMGEN_ATTENTION"]
            model_module.set_fused_kernels(False)
            ab["torch elementwise"] = ab_run()
            model_module.set_fused_kernels(True)
            pipe.transformer.cuda_graphs.enabled = False
            ab["no CUDA graphs"] = ab_run()
            pipe.transformer.cuda_graphs.enabled = True
            default = pipe.vae.decode_pass_frames  # 2 video frames per decode pass
            for frames in (None, 4, 1):  # whole chunks (more memory), and other pass sizes
                pipe.vae.decode_pass_frames = frames
                ab[f"decode {frames or 'whole chunks'} frame{'s' if frames != 1 else ''} per pass"] = ab_run()
            pipe.vae.decode_pass_frames = default
            report["ab_4_steps"] = ab
            print("A/B 4 steps:", ab, flush=True)
            summary.append("A/B at 4 steps (fps end to end / latents only): " + ", ".join(
                f"{k} {v['fps']:.1f}/{v['fps_latents']:.1f}" for k, v in ab.items())
                + "; peak GiB: " + ", ".join(f"{k} {v['peak_gib']:.1f}" for k, v in ab.items()))

    del pipe
    torch.cuda.empty_cache()
    if "14B" not in args.skip:
        with timed_section("14B", report, out):
            pipe = random_pipeline("14B", device, torch.bfloat16)
            run_budget(pipe, 1, prompt, 480, 832, 81)
            results = [run_budget(pipe, s, prompt, 480, 832, 81) for s in (1, 4)]
            for r in results:
                print(f"14B steps {r.steps}: first {r.first_frame_s:.3f}s fps {r.fps:.1f} "
                      f"(latents {r.fps_latents:.1f}) chunks {[round(c, 3) for c in r.chunk_s]} "
                      f"peak {r.peak_gib:.2f} GiB", flush=True)
            report["latency_14B"] = [vars(r) | {"fps": r.fps, "fps_latents": r.fps_latents} for r in results]
            table = markdown(results, f"14B, 480x832, 81 frames, bf16, {report['device']}, torch {torch.__version__}")
            (out / "latency_14B.md").write_text(table + "\n")
            summary.append(table)
            del pipe
            torch.cuda.empty_cache()

    if "kernels" not in args.skip:  # last: a run that outlasts its call keeps everything above (gpu.json)
        with timed_section("kernels", report, out):
            subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernels.py")], check=False)

    report["machine_at_end"] = machine_probe(device)
    summary.insert(0, "machine (bf16 GEMM 8192^3 TFLOP/s, device copy TB/s), at start / at end: " + " / ".join(
        f"{m['gemm_bf16_8192_tflops']:.0f}, {m['copy_tbps']:.2f}" for m in (report["machine_at_start"],
                                                                          report["machine_at_end"])))
    (out / "gpu.json").write_text(json.dumps(report, indent=2, default=str))
    print("\n" + "\n\n".join(summary))


if __name__ == "__main__":
    main()
