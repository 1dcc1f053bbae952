"""One-off, same machine, alternating: the Triton conv reading its weight through a tap-major copy made per call (the
kernel as kept) against reading a channels-last weight in place as a (CO, 27 C) matrix through transposed tiles (tried
in commit 599020a, reverted: 2.4-3.2% slower at the three large shapes, faster only at 60x104 where the copy is most
of the difference). The in-place variant was `git show 599020a:kernels/conv3d.py`, the kept one was imported as
`abtmp_session8.old_conv3d` from `git show 6a797b7:kernels/conv3d.py` for the run.

    python benchmarks/results/conv3d_weight_layout_ab_session8.py     # on the GPU machine, with those two modules
"""
import torch
import torch.nn.functional as F
from abtmp_session8.in_place_conv3d import padded_conv3d as in_place_conv
from triton.testing import do_bench

from kernels.conv3d import padded_conv3d as tap_major_conv

SHAPES = [(96, 96, 12, 480, 832), (192, 192, 12, 240, 416), (384, 384, 6, 120, 208), (384, 384, 3, 60, 104)]
print(torch.cuda.get_device_name(), flush=True)
for c, o, t, h, w in SHAPES:
    padded = F.pad(torch.randn(1, t + 2, h, w, c, device="cuda", dtype=torch.bfloat16), (0, 0, 1, 1, 1, 1))
    wins = [padded[:, k : k + t] for k in range(3)]
    weight = (torch.randn(o, c, 3, 3, 3, device="cuda") / (27 * c) ** 0.5).to(torch.bfloat16).contiguous(
        memory_format=torch.channels_last_3d)
    bias = torch.randn(o, device="cuda", dtype=torch.bfloat16)
    a, b = tap_major_conv(wins, weight, bias), in_place_conv(wins, weight, bias)
    res = {}
    for _ in range(3):
        for name, fn in (("tap-major copy", tap_major_conv), ("in place, transposed", in_place_conv)):
            def run(fn=fn, wins=wins, weight=weight, bias=bias):
                return fn(wins, weight, bias)

            res.setdefault(name, []).append(do_bench(run, warmup=25, rep=100) * 1e3)
    print(f"C {c} O {o} T {t} {h}x{w}: " + "; ".join(f"{k} {min(v):.0f} us (reps {[round(x) for x in v]})"
                                                    for k, v in res.items())
          + f"; equal outputs: {torch.equal(a, b)}", flush=True)
