"""One-off (session 11): GPU time of one cache refresh and one denoising step of chunk 5 (1.3B, 480x832), per kernel
and per the line of streamgen/ or kernels/ that launched it. CUDA graphs off, so each kernel has its launching op.

    python benchmarks/results/kernel_sources_session11.py
"""

from collections import defaultdict
from functools import partial

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.profile_step import chunk_case
from streamgen.bench import random_pipeline


def site(evt) -> str:
    ours = [f for f in evt.stack if "/streamgen/" in f or "/kernels/" in f]
    return ours[0].split("/", 3)[-1] if ours else (evt.stack[0] if evt.stack else "?")


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def by_site(fn, name: str, rows: int = 25) -> None:
    fn()
    sync()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        fn()
        sync()
    total = defaultdict(float)
    calls = defaultdict(int)
    for evt in prof.events():
        if evt.device_type.name != "CPU" or evt.self_device_time_total <= 0:
            continue
        key = f"{evt.name[:40]:40s} {site(evt)}"
        total[key] += evt.self_device_time_total
        calls[key] += 1
    all_us = sum(total.values())
    kernels_us = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type.name != "CPU")
    print(f"== {name}: {kernels_us / 1e3:.1f} ms of kernels, {all_us / 1e3:.1f} ms of them under aten ops:")
    for key, us in sorted(total.items(), key=lambda kv: -kv[1])[:rows]:
        print(f"  {us / 1e3:8.3f} ms {calls[key]:5d}  {key}")
    print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=12, max_name_column_width=50))


@torch.no_grad()
def main(size: str = "1.3B", device: str = "cuda", chunk: int = 5, height: int = 60, width: int = 104) -> None:
    """(The arguments other than the defaults are for a smoke run on the CPU: main("tiny", "cpu", 3, 8, 8).)"""
    device = torch.device(device)
    model = random_pipeline(size, device, torch.bfloat16).transformer
    model.cuda_graphs.enabled = False
    case = chunk_case(model, device, height, width)
    cache, layouts, finals, text = case.cache, case.layouts, case.finals, case.text
    cache.refresh(layouts[chunk - 1], finals.__getitem__, text)
    refresh = partial(case.refresh, chunk)  # the same incremental refresh, again and again
    cache.refresh(layouts[chunk], finals.__getitem__, text)
    by_site(refresh, f"refresh before chunk {chunk}")
    run = case.denoise_run(chunk)
    step = lambda: model([run], text, past=cache.past())  # noqa: E731
    by_site(step, f"denoising step of chunk {chunk}, past {cache.length}")
    if torch.cuda.is_available():  # the same step replayed from its CUDA graph: wall time against its kernels' sum
        model.cuda_graphs.enabled = True
        for fn, name in ((step, "denoising step"), (refresh, "refresh")):
            fn()
            fn()
            sync()
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(10):
                fn()
            end.record()
            sync()
            with profile(activities=[ProfilerActivity.CUDA]) as prof:
                fn()
                sync()
            kernels = sum(e.self_device_time_total for e in prof.key_averages())
            print(f"== {name} from its CUDA graph: {start.elapsed_time(end) / 10:.2f} ms per call (events, 10 calls), "
                  f"kernels {kernels / 1e3:.2f} ms")
            print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=8, max_name_column_width=50))


if __name__ == "__main__":
    main()
