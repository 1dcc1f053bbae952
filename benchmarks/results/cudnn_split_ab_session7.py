"""One-off: same-machine A/B of the cudnn attention path splitting a wave-short key prefix into a batch of two halves
(kernels.key_splits) against one call per prefix, latents-only 1.3B streams (480x832, 81 frames) at 1 and 4 steps
(`latent_stream_ab.alternate`); also the final latents of both.

    python benchmarks/results/cudnn_split_ab_session7.py     # on the GPU machine
"""

from latent_stream_ab import alternate

import kernels

SPLITS = kernels.key_splits


def main() -> None:
    final = alternate({"halves": lambda: setattr(kernels, "key_splits", SPLITS),
                       "one call": lambda: setattr(kernels, "key_splits", lambda programs, lk, device: 1)})
    kernels.key_splits = SPLITS
    for steps in (1, 4):
        a, b = final[("halves", steps)], final[("one call", steps)]
        print(f"steps {steps}: last chunk's latents rel L2 halves vs one call "
              f"{((a - b).norm() / b.norm()).item():.2e}")


if __name__ == "__main__":
    main()
