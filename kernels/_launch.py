"""Small helpers shared by the kernel launchers.

Triton decides between compiling a kernel and interpreting it (numpy on the CPU) when the ``@triton.jit``
decorator runs, from the ``TRITON_INTERPRET`` environment variable; its own library functions (``tl.zeros``, ...)
are decorated when triton is imported. So on a machine without a GPU set ``TRITON_INTERPRET=1`` before triton is
first imported. The launchers read the same variable once at import so that they agree with the decorators.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

import torch
import triton
from torch.utils.weak import WeakIdKeyDictionary
from triton.tools.tensor_descriptor import TensorDescriptor

INTERPRET: bool = os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "yes", "on")
"""True when the kernels in this package were decorated in interpreter mode (CPU tensors, numpy semantics)."""


def check_tensors(*tensors: torch.Tensor | None) -> None:
    """Fail early, with a useful message, when tensors cannot reach the kernel (wrong device or mode)."""
    devices = {t.device for t in tensors if t is not None}
    if len(devices) > 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")
    (device,) = devices
    if device.type == "cpu" and not INTERPRET:
        raise RuntimeError(
            "Triton kernels need GPU tensors; to run them on the CPU set TRITON_INTERPRET=1 in the environment "
            "before triton is imported"
        )


def row_warps(block: int) -> int:
    """Warps for a program that owns one row of ``block`` elements: ~16 elements per thread, 1..16 warps.

    H100, bf16 rows of a 1.3B chunk (D = 1536, 4,680 tokens) from CUDA graphs: 4 warps take 8.1 / 10.5 / 7.6 us for
    the q/k norm + RoPE / modulated LayerNorm / gated residual, 8 warps (8 elements per thread) 9.9 / 14.7 / 7.5;
    at D = 5120 16 warps are within 5% of the best (benchmarks/results/row_kernels_session11.txt)."""
    return min(max(block // 512, 1), 16)


def pow2(n: int) -> int:
    """Smallest power of two >= n (blocks must be powers of two; the tail is masked)."""
    return triton.next_power_of_2(max(int(n), 1))


def channel_blocks(CO: int) -> tuple[int, int]:
    """(BLOCK_N, BLOCK_N2): the two accumulator widths covering CO output channels in one program of the VAE's conv
    kernels: 128 + 64 for multiples of 192, 64 + 32 for multiples of 96 (no MMA work spent on padding), else one
    power of two up to 128 (BLOCK_N2 = 0; several programs along CO where it is larger)."""
    if CO % 192 == 0:
        return 128, 64
    if CO % 96 == 0:
        return 64, 32
    return min(pow2(CO), 128), 0


def k_block(C: int, widest: int = 64) -> int:
    """The K block of a conv kernel over C input channels (a multiple of 16): the largest of 64, 32, 16 dividing C,
    at most `widest`."""
    return next(k for k in (64, 32, 16) if C % k == 0 and k <= widest)


def dense_frames(frames: torch.Tensor) -> bool:
    """Whether padded frames (B, T, HP, WP, C) have dense frames (strides (*, HP WP C, WP C, C, 1)) and a batch
    stride that is a multiple of C, as `frame_rows` reads them."""
    _, _, HP, WP, C = frames.shape
    return frames.stride()[1:] == (HP * WP * C, WP * C, C, 1) and frames.stride(0) % C == 0


def frame_rows(frames: torch.Tensor, block_rows: int, block_k: int) -> TensorDescriptor:
    """A TMA descriptor over padded frames (B, T, HP, WP, C) (`dense_frames`) as one (rows, C) matrix, tiles of
    block_rows x block_k: batch b's frame t, padded position p is row b * stride(0) / C + t * HP * WP + p (rows past a
    batch's last frame run into the next batch's or, past the last, read as zeros)."""
    B, T, HP, WP, C = frames.shape
    return TensorDescriptor(frames, [(B - 1) * frames.stride(0) // C + T * HP * WP, C], [C, 1], [block_rows, block_k])


def kept_per_weight(make: Callable[[torch.Tensor, torch.dtype], torch.Tensor]):
    """`make(weight, dtype)` (a kernel's copy of a weight in its own layout and dtype), kept per weight while the
    weight lives with the same storage and version counter (no in-place change, no `.to()`), so a decode does not copy
    each conv's weight at every call (a launch each: host time on one-frame decode passes)."""
    kept = WeakIdKeyDictionary()  # weight -> ((its storage, version counter, dtype), copy)

    @functools.wraps(make)
    def copy(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        key = (weight.data_ptr(), weight._version, dtype)
        entry = kept.get(weight)
        if entry is None or entry[0] != key:
            entry = kept[weight] = (key, make(weight, dtype))
        return entry[1]

    copy.kept = kept  # the weights with a copy, for tests
    return copy
