"""One-off: which lines of streamgen/ launch the streaming decode's non-convolution GPU work (copies, adds, norms,
fills), 81 frames at 480x832 in bf16 as the engine decodes them: CUDA time per (op, source line), largest first.

    python benchmarks/results/vae_op_sources_session7.py     # on the GPU machine
"""

from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from streamgen.bench import vae_decode_case


def source(evt) -> str:
    """The innermost three frames of streamgen/ or kernels/ above an op (the profiler records Python frames as
    the op's parent events)."""
    ours = []
    while evt is not None and len(ours) < 3:
        if "streamgen/" in evt.name or "kernels/" in evt.name:
            ours.append(evt.name.split("/")[-1])
        evt = evt.cpu_parent
    return " <- ".join(ours) or "?"


def main() -> None:
    device = torch.device("cuda")
    vae, latents, sizes = vae_decode_case(device)
    vae.to_channels_last()
    vae.decode(latents, sizes)  # warm-up
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA], with_stack=True) as prof:
        vae.decode(latents, sizes)
        torch.cuda.synchronize()
    totals, counts = defaultdict(float), defaultdict(int)
    for evt in prof.events():
        if evt.device_type != torch.autograd.DeviceType.CPU or not evt.name.startswith("aten::"):
            continue
        if evt.cpu_parent is not None and evt.cpu_parent.name.startswith("aten::"):
            continue  # count each top-level op once (its device time includes its children's kernels)
        key = (evt.name, source(evt))
        totals[key] += evt.device_time_total / 1e3
        counts[key] += 1
    conv = sum(v for (name, _), v in totals.items() if "conv" in name)
    print(f"convolutions {conv:.1f} ms; everything else by (op, source):")
    for (name, src), ms in sorted(totals.items(), key=lambda kv: -kv[1])[:40]:
        if "conv" not in name and ms >= 0.5:
            print(f"{ms:8.1f} ms {counts[(name, src)]:5d}x  {name:28s} {src}")


if __name__ == "__main__":
    main()
