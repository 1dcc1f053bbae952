"""3D rotary position tables: (frame, row, column) of every token, full or compressed.

The head dimension splits into time / height / width parts of `d - 4*(d//6)`, `2*(d//6)`, `2*(d//6)` features, each
rotated in adjacent pairs at frequencies `theta^(-2j/part)`. A compressed token covers a block of full-resolution
patches; its phase per axis is the mean of theirs, renormalised to unit modulus.
"""

from __future__ import annotations

import torch
from torch import Tensor


class RotaryTables:
    """cos/sin tables of shape (tokens, head_dim/2), float32, memoised per run geometry."""

    def __init__(self, head_dim: int, patch_size, compressed_patch_size, theta: float = 10000.0):
        part = head_dim // 6
        self.dims = (head_dim - 4 * part, 2 * part, 2 * part)
        self.freqs = [theta ** (-torch.arange(0, n, 2, dtype=torch.float64, device="cpu") / n) for n in self.dims]
        self.pool = tuple(c // p for p, c in zip(patch_size, compressed_patch_size))
        self._memo: dict[tuple, tuple[Tensor, Tensor]] = {}

    def run(self, first_frame: int, grid: tuple[int, int, int], compressed: bool, device) -> tuple[Tensor, Tensor]:
        """Tables for a run of tokens laid out (frame, row, col) over `grid` = its token grid (f, h, w).

        For a full run, token (i, y, x) sits at frame `first_frame + i`, row y, column x. For a compressed run each
        grid index covers `pool` full-resolution positions along each axis.
        """
        key = (first_frame, grid, compressed, str(device))
        if key not in self._memo:
            pool = self.pool if compressed else (1, 1, 1)
            phases = []
            for axis, (n, k, freqs) in enumerate(zip(grid, pool, self.freqs)):
                start = first_frame if axis == 0 else 0
                # full-resolution positions covered by each grid index: (n, k)
                pos = start + torch.arange(n, dtype=torch.float64)[:, None] * k + torch.arange(k, dtype=torch.float64)
                phase = torch.exp(1j * pos[..., None] * freqs).mean(dim=1)
                phase = phase / phase.abs()
                shape = [1, 1, 1, -1]
                shape[axis] = n
                phases.append(phase.view(shape).expand(*grid, -1))
            table = torch.cat(phases, dim=-1).reshape(-1, sum(self.dims) // 2)
            self._memo[key] = (table.real.float().to(device), table.imag.float().to(device))
        return self._memo[key]


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate adjacent pairs of the last dim of x (B, L, H, d) by angles given as cos/sin (L, d/2); fp32 math."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[:, None, :], sin[:, None, :]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).to(x.dtype)
