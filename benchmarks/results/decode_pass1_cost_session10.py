"""One-off, same machine, alternating: what one video frame per decode pass (`vae.decode_pass_frames = 1`, the setting
that keeps the stream under the issue's 8.3 GiB) costs against whole chunks at this session's code, where whole
chunks' full-resolution second convs take two frames per program and one-frame passes cannot: the whole 1.3B stream
end to end at 4 and 1 steps, three each, with its peak.

    python benchmarks/results/decode_pass1_cost_session10.py     # on the GPU machine
"""

import torch
from vae_ab_session8 import stream_seconds

from streamgen.bench import random_pipeline


def main():
    print(torch.cuda.get_device_name(), torch.__version__, flush=True)
    device = torch.device("cuda")
    pipe = random_pipeline("1.3B", device, torch.bfloat16)
    prompt = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)
    for frames in (None, 1):
        pipe.vae.decode_pass_frames = frames
        stream_seconds(pipe, prompt, 1)  # warm-up: graphs, plans, compiles
    for steps in (4, 1):
        for rep in range(3):
            for frames in (None, 1):
                pipe.vae.decode_pass_frames = frames
                s, peak = stream_seconds(pipe, prompt, steps)
                print(f"stream {steps} steps, {frames or 'whole chunk'} frames per pass, rep {rep}: {s:.3f} s, "
                      f"{81 / s:.1f} fps, peak {peak:.2f} GiB", flush=True)


if __name__ == "__main__":
    main()
