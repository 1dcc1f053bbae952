"""Step budgets for the flow map: which (t, r) jumps a chunk takes.

Time runs from 1000 (noise) to 0 (data). A flow-map student jumps `z_t -> z_r` for any t > r, so a budget of N steps
is just N consecutive jumps along a shifted grid; nothing else changes with N.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise

import numpy as np
import torch

T_MAX = 1000.0


def shifted_times(steps: int, shift: float = 5.0) -> list[float]:
    """The N+1 times of an N-step budget: `s = linspace(1, 0, N+1)`, `s' = shift*s / (1 + (shift-1)*s)`, times 1000."""
    if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"a step budget must be an integer >= 1, got {steps!r}")
    if not shift > 0:
        raise ValueError(f"shift must be positive, got {shift}")
    s = np.linspace(1.0, 0.0, int(steps) + 1, dtype=np.float64)
    return (shift * s / (1.0 + (shift - 1.0) * s) * T_MAX).tolist()


class Schedule:
    """An ordered list of jumps (t, r), t > r, starting at 1000 and ending at 0."""

    def __init__(self, jumps: Sequence[tuple[float, float]]):
        jumps = [(float(t), float(r)) for t, r in jumps]
        if not jumps:
            raise ValueError("a schedule needs at least one jump")
        for i, (t, r) in enumerate(jumps):
            if not (0.0 <= r < t <= T_MAX):
                raise ValueError(f"jump {i} ({t}, {r}) must satisfy 0 <= r < t <= {T_MAX:g}")
            if i and t != jumps[i - 1][1]:
                raise ValueError(f"jump {i} starts at {t} but the previous one ended at {jumps[i - 1][1]}")
        if jumps[0][0] != T_MAX or jumps[-1][1] != 0.0:
            raise ValueError(f"a schedule must run from {T_MAX:g} to 0, got {jumps[0][0]} -> {jumps[-1][1]}")
        self.jumps = jumps

    @classmethod
    def from_steps(cls, steps: int, shift: float = 5.0) -> Schedule:
        times = shifted_times(steps, shift)
        return cls(list(pairwise(times)))

    @classmethod
    def from_times(cls, times: Sequence[float]) -> Schedule:
        return cls(list(pairwise(times)))

    def __len__(self) -> int:
        return len(self.jumps)

    def __iter__(self):
        return iter(self.jumps)

    def __repr__(self) -> str:
        return f"Schedule({len(self)} steps: " + ", ".join(f"{t:.1f}->{r:.1f}" for t, r in self.jumps) + ")"


def jump(z_t: torch.Tensor, u: torch.Tensor, t: float, r: float) -> torch.Tensor:
    """One flow-map jump `z_r = z_t - ((t - r)/1000) * u`, in float32 whatever the model's dtype."""
    return (z_t.float() - ((t - r) / T_MAX) * u.float()).to(z_t.dtype)


def as_schedule(budget: int | Schedule, shift: float) -> Schedule:
    """A step count (shifted grid) or an explicit Schedule."""
    if isinstance(budget, Schedule):
        return budget
    if isinstance(budget, (int, np.integer)) and not isinstance(budget, bool):
        return Schedule.from_steps(int(budget), shift)
    raise TypeError(f"a step budget is an int or a Schedule, got {type(budget).__name__}")
