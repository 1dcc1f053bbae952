"""One-off: same-machine A/B of cuDNN over two halves of a wave-short prefix (kernels.key_splits) against one call,
end to end with the streaming decode at one frame per decode pass (the 7.99 GiB configuration), 1.3B, 480x832, 81
frames, 4 steps: variants alternate, graphs re-captured for each, min of 3 streams after a warm-up.

    python benchmarks/results/cudnn_split_pass1_ab_session7.py     # on the GPU machine
"""

import time

import torch

import kernels
from streamgen.bench import random_pipeline

SPLITS = kernels.key_splits


def main() -> None:
    device = torch.device("cuda")
    pipe = random_pipeline("1.3B", device, torch.bfloat16)
    pipe.vae.decode_pass_frames = 1
    prompt = torch.randn(1, 512, pipe.transformer.config.text_dim, device=device, dtype=torch.bfloat16)
    print(torch.cuda.get_device_name(), torch.__version__)

    def stream():
        n = 0
        for chunk in pipe.stream(prompt, height=480, width=832, num_frames=81, steps=4, seed=0):
            n += chunk.frames.shape[1]
        return n

    for rnd in range(2):
        for name, splits in (("halves", SPLITS), ("one call", lambda programs, lk, device: 1)):
            kernels.key_splits = splits
            pipe.transformer.cuda_graphs.clear()
            stream()
            times = []
            for _ in range(3):
                torch.cuda.synchronize()
                start = time.perf_counter()
                frames = stream()
                times.append(time.perf_counter() - start)
            print(f"round {rnd} {name:9s}: {frames} frames, best {frames / min(times):.1f} fps"
                  f" (streams {', '.join(f'{t:.3f}' for t in times)} s)")


if __name__ == "__main__":
    main()
