"""What the Triton kernel tests share: the interpreter switch, the device, random inputs.

Without a GPU the kernels run in Triton's interpreter (numpy on the CPU). Triton picks interpreter or compiler
when ``@triton.jit`` decorates a function, which for its own library functions (``tl.zeros``, ...) happens when
triton is imported: importing this module first sets TRITON_INTERPRET=1 before the first import of triton, and
refuses (instead of failing obscurely later) if triton was already imported without it.
"""

from __future__ import annotations

import os
import sys

import torch

if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET", "0") != "1":
    if "triton" in sys.modules:  # its own @jit library functions (tl.zeros, ...) were decorated for a GPU
        raise RuntimeError(
            "no GPU: the kernels must run in Triton's interpreter, but triton was imported before TRITON_INTERPRET=1 "
            "was set; run `TRITON_INTERPRET=1 python -m pytest ...`"
        )
    os.environ["TRITON_INTERPRET"] = "1"

from kernels._launch import INTERPRET

DEVICE = "cpu" if INTERPRET else "cuda"


def rand(*shape, dtype=torch.float32, scale=1.0) -> torch.Tensor:
    """Standard normal values (times `scale`) on the test device, drawn in fp32 and rounded to `dtype`."""
    return (torch.randn(*shape, dtype=torch.float32, device=DEVICE) * scale).to(dtype)


def f64(*ts: torch.Tensor | None) -> list[torch.Tensor | None]:
    return [None if t is None else t.double() for t in ts]


def padded_frames(b: int, f: int, h: int, w: int, c: int, dtype=torch.float32) -> torch.Tensor:
    """Random frames (B, F, H + 2, W + 2, C) with the zero ring a padded conv input has."""
    return torch.nn.functional.pad(rand(b, f, h, w, c, dtype=dtype), (0, 0, 1, 1, 1, 1))
