"""One-off: same-machine A/B of the refresh's last layer stopping at its keys and values (model.Block kv_only) against
the full last layer, latents-only 1.3B streams (480x832, 81 frames) at 1 and 4 steps (`latent_stream_ab.alternate`).
Also checks both give the same latents.

    python benchmarks/results/refresh_kv_only_ab_session7.py     # on the GPU machine
"""

import torch
from latent_stream_ab import alternate

from streamgen import model as model_module

FULL = model_module.Block.forward


def full_last_layer(self, x, segments, rope, text_kv, mask, past, kv_only=False):
    return FULL(self, x, segments, rope, text_kv, mask, past)


def main() -> None:
    final = alternate({"kv only": lambda: setattr(model_module.Block, "forward", FULL),
                       "full last layer": lambda: setattr(model_module.Block, "forward", full_last_layer)})
    model_module.Block.forward = FULL
    for steps in (1, 4):
        a, b = final[("kv only", steps)], final[("full last layer", steps)]
        print(f"steps {steps}: last chunk's latents equal: {torch.equal(a, b)}")


if __name__ == "__main__":
    main()
