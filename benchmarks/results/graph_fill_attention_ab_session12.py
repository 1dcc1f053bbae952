"""One-off, same machine, alternating: this session's two changes against the code before them.

- graphs: a static input buffer that still holds its unchanged source (the prompt's per-layer text keys and values)
  is not copied again before a replay (`GraphRunner._fill`), against copying every input before every replay;
- VAE: the mid block's attention (head dim 384) as two GEMMs around the softmax kernel (`vae.pixel_attention`),
  against SDPA (its memory-efficient kernel).

Neither change is inside a CUDA graph, so no recapture between switches. Prints: the 81-frame decode (wall and GPU
kernel time) and its frames' difference, then the 1.3B stream latents only (both changes vs neither; only the
graphs' part acts there) and end to end, at 4 and 1 steps, three each.

    python benchmarks/results/graph_fill_attention_ab_session12.py     # on the GPU machine
"""

import torch
import torch.nn.functional as F
from row_warps_ab_session11 import latents_seconds
from vae_ab_session8 import alternate_decodes, stream_seconds, variant_frames

import streamgen.vae as vae_module
from streamgen.bench import random_pipeline, vae_decode_case
from streamgen.graphs import GraphRunner

NEW_FILL, NEW_ATTENTION = GraphRunner._fill, vae_module.pixel_attention


def copy_all(self, static, inputs):
    torch._foreach_copy_(list(static), list(inputs))


def use(new: bool) -> str:
    GraphRunner._fill = NEW_FILL if new else copy_all
    vae_module.pixel_attention = NEW_ATTENTION if new else (lambda q, k, v: F.scaled_dot_product_attention(q, k, v))
    return "new" if new else "before"


def main():
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    device = torch.device("cuda")
    with torch.no_grad():
        vae, latents, sizes = vae_decode_case(device)
        vae.to_channels_last()
        frames = variant_frames(vae, latents, sizes, (True, False), use)
        diff = (frames["new"] - frames["before"]).abs()
        print(f"decode frames new vs before: max abs diff {diff.max().item():.2e}, mean {diff.mean().item():.2e}")
        del frames, diff
        alternate_decodes(vae, latents, sizes, (True, False), use)
        del vae, latents
        torch.cuda.empty_cache()

        pipe = random_pipeline("1.3B", device, torch.bfloat16)
        prompt = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)
        for steps in (4, 1):
            for new in (True, False):
                use(new)
                stream_seconds(pipe, prompt, steps)  # graphs captured, both paths warm
            for rep in range(3):
                for new in (True, False):
                    name = use(new)
                    latents_s = latents_seconds(pipe, prompt, steps)
                    e2e, peak = stream_seconds(pipe, prompt, steps)
                    print(f"{steps} steps rep {rep} {name}: latents {latents_s:.3f} s, end to end {e2e:.3f} s, "
                          f"peak {peak:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
