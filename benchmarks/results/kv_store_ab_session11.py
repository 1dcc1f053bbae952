"""One-off, same machine, alternating: a cache refresh writing each layer's new keys and values straight into the KV
cache (the norm + RoPE kernel's `out=`, the values' GEMM `addmm(out=)`) against making them apart and copying them in
(the code before; here `Attention.key_value` patched to do that): one refresh of chunk 5 replayed from its CUDA graph,
then the whole 1.3B stream at 4 and 1 steps, latents only and end to end, graphs captured again after every switch.

    python benchmarks/results/kv_store_ab_session11.py     # on the GPU machine
"""

import torch
from row_warps_ab_session11 import latents_seconds
from vae_ab_session8 import stream_seconds

from benchmarks.profile_step import chunk_case
from streamgen.bench import random_pipeline
from streamgen.model import Attention

DIRECT = Attention.key_value


def apart(self, x, rope=None, out=None):
    k, v = DIRECT(self, x, rope)
    if out is not None:
        out[0].copy_(k)
        out[1].copy_(v)
    return k, v


def use(direct: bool, model) -> str:
    Attention.key_value = DIRECT if direct else apart
    model.cuda_graphs.clear()
    return "direct" if direct else "copied"


def refresh_ms(model, device) -> dict[str, float]:
    case = chunk_case(model, device)
    case.cache.refresh(case.layouts[4], case.finals.__getitem__, case.text)
    results = {}
    for _ in range(3):
        for direct in (True, False):
            name = use(direct, model)
            case.refresh(5)
            case.refresh(5)
            torch.cuda.synchronize()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                case.refresh(5)
            end.record()
            torch.cuda.synchronize()
            results.setdefault(name, []).append(start.elapsed_time(end) / 10)
    case.cache.release()
    return results


def main():
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    device = torch.device("cuda")
    pipe = random_pipeline("1.3B", device, torch.bfloat16)
    model = pipe.transformer
    with torch.no_grad():
        for name, ms in refresh_ms(model, device).items():
            print(f"refresh before chunk 5 from its graph, {name}: " + " / ".join(f"{m:.2f}" for m in ms) + " ms",
                  flush=True)
    prompt = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)
    for steps in (4, 1):
        for rep in range(2):
            for direct in (True, False):
                name = use(direct, model)
                stream_seconds(pipe, prompt, steps)  # capture the graphs
                latents = latents_seconds(pipe, prompt, steps)
                e2e, peak = stream_seconds(pipe, prompt, steps)
                print(f"{steps} steps rep {rep} {name}: latents {latents:.3f} s, end to end {e2e:.3f} s, "
                      f"peak {peak:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
