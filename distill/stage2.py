"""Stage 2, on-policy: Flow Map Backward Simulation + DMD (spec section 5).

Per iteration one budget N and one step index k < N (the same on every rank). The student rolls the clip out
causally, chunk by chunk, with its KV cache holding its own outputs (refreshed without gradient): each chunk's
N-step trajectory is replaced by three flow-map jumps, 1000 -> s'[k] (shortcut, no gradient), s'[k] -> s'[k+1] (the
real step) and s'[k+1] -> 0 (shortcut), the last two with gradient. The rolled-out clip x0 is re-noised at one time
t = shift(uniform) per sample; the real score (teacher, guided `x_cond + g (x_cond - x_uncond)`) and the fake score (a
critic trained by flow matching on the student's samples) each jump once to 0, and the generator loss is
`mse(x0, stopgrad(x0 - grad))` with `grad = (x_fake - x_real) / mean|x0 - x_real|`. Critic and generator steps
alternate 1:1 (the trainer's phases); the stage-1 loss is added to the generator's.

Everything of a step runs inside one forward of `Stage2`, so DDP and FSDP see one forward and one backward.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor, nn

from distill.losses import Denoiser, Stage1Settings, noisy, shift_times, stage1_loss
from streamgen.cache import KVCache, context_layout
from streamgen.engine import chunk_sizes
from streamgen.model import CausalWanTransformer, Run
from streamgen.schedule import T_MAX, jump, shifted_times

CRITIC, GENERATOR = 0, 1  # the phase of step s is s % 2
PHASES = ("critic.", "generator.")  # the parameters each phase updates (name prefixes in `Stage2`)
Jump = tuple[float, float, bool]  # (t, r, with gradient)


class Stage2Settings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    budgets: list[int] = Field(default=[2, 4, 8, 16, 50], min_length=1)
    shift: float = 5.0  # of the sampler's grid and of the scores' time
    guidance: float = 3.0  # real score: x_cond + guidance * (x_cond - x_uncond)
    min_time: float = 0.02  # the scores' uniform draw, before the shift, on [0, 1]
    max_time: float = 0.98
    stage1_weight: float = 1.0  # co-trained stage-1 loss (0: off)


def backward_simulation_jumps(budget: int, k: int, shift: float) -> list[Jump]:
    """1000 -> s'[k] without gradient, s'[k] -> s'[k+1] and s'[k+1] -> 0 with; zero-length jumps left out."""
    if not 0 <= k < budget:
        raise ValueError(f"step index {k} outside budget {budget}")
    s = shifted_times(budget, shift)
    jumps = [(T_MAX, s[k], False), (s[k], s[k + 1], True), (s[k + 1], 0.0, True)]
    return [j for j in jumps if j[0] > j[1]]


def rollout(model: CausalWanTransformer, text: Tensor, noise: Tensor, jumps: list[Jump]) -> list[Tensor]:
    """Causal self-rollout of a clip: each chunk from its slice of `noise` (B, C, F, h, w) through `jumps`, against
    the FAR context of the chunks before it, as `streamgen.engine` builds it (the cache holds the rollout's own
    detached outputs; its refresh has no gradient). text: projected text tokens (B, L, D). Returns the chunks' final
    latents, carrying gradient through the jumps marked so (and nothing else)."""
    cfg = model.config
    b, _, frames, h, w = noise.shape
    sizes = chunk_sizes(cfg.chunk_partition, frames)
    contexts = [context_layout(sizes, j, cfg.full_chunk_limit) for j in range(len(sizes))]
    cache = KVCache.for_layouts(model, b, h, w, contexts)
    final: dict[int, Tensor] = {}
    out, start = [], 0
    try:
        for j, size in enumerate(sizes):
            if j:
                cache.refresh(contexts[j], final.__getitem__, text)
            z, past = noise[:, :, start:start + size].float(), cache.past()
            for t, r, grad in jumps:
                with torch.set_grad_enabled(grad and torch.is_grad_enabled()):
                    tt, rr = torch.full((b,), t, device=z.device), torch.full((b,), r, device=z.device)
                    z = jump(z, model([Run(z, tt, rr, start)], text, past=past).velocities[0], t, r)
            final[j] = z.detach()
            out.append(z)
            start += size
    finally:
        cache.release()
    return out


def one_jump_to_data(net: Denoiser, z: Tensor, t: Tensor, embeds: Tensor) -> Tensor:
    """A bidirectional flow-matching model's x0 estimate: z_t - (t/1000) v(z_t, t, r = t), whole clip."""
    v = net([Run(z, t, t, 0)], embeds)[0]
    return z - (t / T_MAX).view(-1, 1, 1, 1, 1) * v


def dmd_loss(x0: Tensor, x_real: Tensor, x_fake: Tensor) -> tuple[Tensor, Tensor]:
    """`mse(x0, stopgrad(x0 - grad))`, grad = (x_fake - x_real) / mean|x0 - x_real| per sample. Returns (loss, grad)."""
    with torch.no_grad():
        scale = (x0 - x_real).abs().flatten(1).mean(1).clamp_min(1e-8).view(-1, *[1] * (x0.ndim - 1))
        grad = (x_fake - x_real) / scale
    return F.mse_loss(x0, (x0 - grad).detach()), grad


class Stage2(nn.Module):
    """The student (`generator`), the fake-score `critic` and the frozen real score (`teacher`), all Denoisers."""

    def __init__(self, student: CausalWanTransformer, critic: CausalWanTransformer, teacher: CausalWanTransformer,
                 negative: Tensor, settings: Stage2Settings, stage1: Stage1Settings, kinds: Tensor, all_reduce=None):
        super().__init__()
        self.generator, self.critic, self.teacher = Denoiser(student), Denoiser(critic), Denoiser(teacher)
        self.teacher.requires_grad_(False)
        self.register_buffer("negative", negative, persistent=False)
        self.settings, self.stage1, self.kinds, self.all_reduce = settings, stage1, kinds, all_reduce

    def sample(self, embeds: Tensor, noise: Tensor, shared: torch.Generator) -> tuple[Tensor, dict]:
        """The backward-simulated clip (B, C, F, h, w) for a budget and step index drawn from `shared`."""
        s = self.settings
        budget = s.budgets[int(torch.randint(len(s.budgets), (), generator=shared))]
        k = int(torch.randint(budget, (), generator=shared))
        model = self.generator.model
        text = model.condition_embedder.text_embedder(embeds.to(model.dtype))
        x0 = torch.cat(rollout(model, text, noise, backward_simulation_jumps(budget, k, s.shift)), dim=2)
        return x0, {"budget": budget, "k": k}

    def score_time(self, b: int, gen: torch.Generator, device: torch.device) -> Tensor:
        s = self.settings
        u = s.min_time + (s.max_time - s.min_time) * torch.rand(b, generator=gen)
        return (T_MAX * shift_times(u, s.shift)).to(device)

    def forward(self, x_data: Tensor, embeds: Tensor, phase: int, shared: torch.Generator,
                local: torch.Generator) -> tuple[Tensor, dict]:
        """One step's loss: the critic's (phase CRITIC) or the generator's (phase GENERATOR)."""
        b, dev = x_data.shape[0], x_data.device
        noise = torch.randn(x_data.shape, generator=local).to(dev)
        t = self.score_time(b, local, dev)
        eps = torch.randn(x_data.shape, generator=local).to(dev)
        if phase == CRITIC:
            with torch.no_grad():
                x0, stats = self.sample(embeds, noise, shared)
            v = self.critic([Run(noisy(x0, eps, t), t, t, 0)], embeds)[0]
            loss = F.mse_loss(v, eps - x0)
            return loss, {**stats, "critic_loss": loss.item()}

        x0, stats = self.sample(embeds, noise, shared)
        with torch.no_grad():
            z = noisy(x0.detach(), eps, t)
            x_fake = one_jump_to_data(self.critic, z, t, embeds)
            x_cond = one_jump_to_data(self.teacher, z, t, embeds)
            x_uncond = one_jump_to_data(self.teacher, z, t, self.negative.to(embeds.dtype).expand_as(embeds))
            x_real = x_cond + self.settings.guidance * (x_cond - x_uncond)
        loss, _ = dmd_loss(x0, x_real, x_fake)
        stats = {**stats, "dmd_loss": loss.item()}
        if self.settings.stage1_weight:
            s1, _ = stage1_loss(self.generator, x_data, embeds, self.negative, self.stage1, self.kinds,
                                       shared, local, self.all_reduce)
            loss = loss + self.settings.stage1_weight * s1
            stats["stage1_loss"] = s1.item()
        return loss, stats
