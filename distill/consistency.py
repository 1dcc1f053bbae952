"""The baseline: consistency distillation of the same causal student, and its sampler.

The student's endpoint map is `f(z_t, t) = z_t - (t/1000) u(z_t, t, r = 0)`. Training uses stage 1's teacher-forcing
layout (a prefix of chunks, the last `full_chunk_limit` noisy targets over clean context): for adjacent times
t_hi > t_lo of a shifted `grid`-step schedule, one Euler step of the ODE takes z_{t_hi} (on the data's noising
path) to z_{t_lo}, and the loss is `mse(f(z_{t_hi}, t_hi), stopgrad f(z_{t_lo}, t_lo))`; f(z, 0) = z holds by
construction. The ODE is a frozen copy of the initial student at r = t: the causal diffusion mode stage 1 trained
on exactly this layout, with guidance distilled in, so it needs no guidance of its own.

The consistency sampler (`consistency_step`, for `streamgen.engine.Generator(step=...)`): at each time jump to 0,
then re-noise the estimate to the next time with fresh noise.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from distill.losses import Denoiser, noisy, teacher_forcing_batch
from streamgen.engine import Predict
from streamgen.model import CausalWanTransformer, Run
from streamgen.schedule import T_MAX, jump, shifted_times


class ConsistencySettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    grid: int = 50  # ODE steps of the discretisation (adjacent times of the shifted grid)
    shift: float = 5.0
    max_chunks: int = 8


def consistency_step(predict: Predict, z: Tensor, t: float, r: float, rng: torch.Generator | None) -> Tensor:
    """Consistency sampler step t -> r: x0 = f(z_t, t), then z_r = noising of x0 to r (x0 itself at r = 0)."""
    x0 = jump(z, predict(z, t, 0.0), t, 0.0)
    if r == 0:
        return x0
    eps = torch.randn(x0.shape, generator=rng).to(x0.device, x0.dtype)
    return noisy(x0, eps, torch.full((x0.shape[0],), r, device=x0.device))


class Consistency(nn.Module):
    """The student (`generator`) and the frozen ODE (`teacher`, a copy of the initial student)."""

    def __init__(self, student: CausalWanTransformer, ode: CausalWanTransformer, settings: ConsistencySettings):
        super().__init__()
        self.generator, self.teacher = Denoiser(student), Denoiser(ode)
        self.teacher.requires_grad_(False)
        self.settings = settings

    def forward(self, x_data: Tensor, embeds: Tensor, shared: torch.Generator,
                local: torch.Generator) -> tuple[Tensor, dict]:
        s, b, dev = self.settings, x_data.shape[0], x_data.device
        cfg = self.generator.model.config
        n, slots, visible, a, clean, x_tgt = teacher_forcing_batch(x_data, cfg, s.max_chunks, shared)

        def velocity(net: Denoiser, z: Tensor, t: Tensor, r: Tensor) -> Tensor:
            zero = torch.zeros_like(t)
            runs = [Run(z[:, :, sl.first_frame - a:sl.first_frame - a + sl.frames], t, r, sl.first_frame)
                    if sl.noisy else
                    Run(clean[:, :, sl.first_frame:sl.first_frame + sl.frames], zero, zero, sl.first_frame,
                        sl.compressed) for sl in slots]
            return torch.cat([u for u, sl in zip(net(runs, embeds, visible), slots) if sl.noisy], dim=2)

        def endpoint(z: Tensor, t: Tensor) -> Tensor:
            return z - (t / T_MAX).view(-1, 1, 1, 1, 1) * velocity(self.generator, z, t, torch.zeros_like(t))

        times = torch.tensor(shifted_times(s.grid, s.shift), dtype=torch.float32)
        i = torch.randint(s.grid, (b,), generator=local)
        t_hi, t_lo = times[i].to(dev), times[i + 1].to(dev)
        z_hi = noisy(x_tgt, torch.randn(x_tgt.shape, generator=local).to(dev), t_hi)
        with torch.no_grad():
            v = velocity(self.teacher, z_hi, t_hi, t_hi)
            z_lo = z_hi - ((t_hi - t_lo) / T_MAX).view(-1, 1, 1, 1, 1) * v
            target = endpoint(z_lo, t_lo)
        loss = F.mse_loss(endpoint(z_hi, t_hi), target)
        return loss, {"consistency_loss": loss.item(), "chunks": n}
