"""One-off (session 12): the copies, concatenations and adds inside one cache refresh and one denoising step of chunk
5 (1.3B, 480x832, CUDA graphs off), by op and input shapes, with the Python line that called each (first frame in
streamgen/ or kernels/).

    python benchmarks/results/refresh_small_ops_session12.py     # on the GPU machine
"""

from collections import defaultdict
from functools import partial

import torch
from torch.profiler import ProfilerActivity, profile

from benchmarks.profile_step import chunk_case
from streamgen.bench import random_pipeline

OPS = ("aten::copy_", "aten::cat", "aten::add", "aten::add_", "aten::clone", "aten::contiguous", "aten::mul")


def report(fn, name: str) -> None:
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], record_shapes=True,
                 with_stack=True) as prof:
        fn()
        torch.cuda.synchronize()
    rows = defaultdict(lambda: [0.0, 0])
    for e in prof.key_averages(group_by_input_shape=True, group_by_stack_n=8):
        if e.key in OPS and e.self_device_time_total > 0:
            ours = [f for f in (e.stack or []) if "streamgen/" in f or "kernels/" in f]
            where = " <- ".join(f.split("/")[-1] for f in ours[:3]) or "?"
            key = f"{e.key} {str(e.input_shapes)[:90]} {where}"
            rows[key][0] += e.self_device_time_total
            rows[key][1] += e.count
    print(f"== {name}")
    for key, (us, n) in sorted(rows.items(), key=lambda kv: -kv[1][0])[:25]:
        print(f"  {us / 1e3:7.3f} ms {n:4d}  {key}")


@torch.no_grad()
def main() -> None:
    device = torch.device("cuda")
    model = random_pipeline("1.3B", device, torch.bfloat16).transformer
    model.cuda_graphs.enabled = False
    case = chunk_case(model, device)
    case.cache.refresh(case.layouts[4], case.finals.__getitem__, case.text)
    report(partial(case.refresh, 5), "refresh before chunk 5")
    run = case.denoise_run(5)
    report(lambda: model([run], case.text, past=case.cache.past()),
           f"denoising step of chunk 5, past {case.cache.length}")


if __name__ == "__main__":
    main()
