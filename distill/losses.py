"""The training objectives: teacher flow matching and stage-1 causal flow-map pretraining (spec section 5).

Times are on the 0..1000 scale (1000 = noise) and `z_t = (t/1000) * noise + (1 - t/1000) * x0` throughout. All
randomness comes from generators the caller passes in, so a step's draws are a function of (seed, step, rank) and a
resumed run repeats them exactly.

Stage 1 sees one forward with gradient per step; every other model evaluation (the guidance's unconditional
prediction, the two finite-difference points) runs first, without gradient, through the same wrapped network, so
DDP and FSDP see one forward and one backward per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from pydantic import BaseModel, ConfigDict
from torch import Tensor, nn

from streamgen.engine import chunk_sizes
from streamgen.model import CausalWanTransformer, Run
from streamgen.schedule import T_MAX

DIFFUSION, CONSISTENCY, FREE = 0, 1, 2  # kinds of (t, r) pairs


class Denoiser(nn.Module):
    """The module DDP / FSDP wrap: prompt embeddings and runs in, velocities out.

    The text projection runs inside this forward and each block makes its own cross-attention keys, so every
    parameter is used within the forward of the module that owns it (as FSDP's per-block unsharding requires).
    """

    def __init__(self, model: CausalWanTransformer):
        super().__init__()
        self.model = model

    def forward(self, runs: list[Run], prompt_embeds: Tensor, visible: Tensor | None = None) -> list[Tensor | None]:
        text = self.model.condition_embedder.text_embedder(prompt_embeds.to(self.model.dtype))
        return self.model(runs, text, visible).velocities


def noisy(x0: Tensor, noise: Tensor, t: Tensor) -> Tensor:
    """The noising path at per-sample times t (B,)."""
    s = (t / T_MAX).view(-1, *[1] * (x0.ndim - 1)).to(x0.dtype)
    return s * noise + (1 - s) * x0


def shift_times(s: Tensor, shift: float) -> Tensor:
    """s in [0, 1] -> shift*s / (1 + (shift-1)*s): more time spent near noise, as the sampler's grid."""
    return shift * s / (1 + (shift - 1) * s)


def drop_captions(embeds: Tensor, negative: Tensor, p: float, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Replace each sample's prompt by the negative one with probability p, so the model keeps an unconditional
    prediction for guidance. Returns the embeddings and the (B,) bool mask of dropped samples."""
    dropped = torch.rand(embeds.shape[0], generator=gen) < p
    neg = negative.to(embeds.device, embeds.dtype).expand_as(embeds)
    return torch.where(dropped.to(embeds.device)[:, None, None], neg, embeds), dropped


def flow_matching_loss(net: nn.Module, x0: Tensor, embeds: Tensor, gen: torch.Generator, shift: float = 5.0) -> Tensor:
    """Teacher: `|v(z_t, t) - (noise - x0)|^2` over the whole clip, bidirectional, t logit-normal then shifted."""
    t = T_MAX * shift_times(torch.sigmoid(torch.randn(x0.shape[0], generator=gen)), shift).to(x0.device)
    noise = torch.randn(x0.shape, generator=gen).to(x0.device)
    u = net([Run(noisy(x0, noise, t), t, t, 0)], embeds)[0]
    return F.mse_loss(u, noise - x0)


# -- stage 1: teacher-forcing layout --------------------------------------------------------------------------------


@dataclass(frozen=True)
class Slot:
    """One run of the teacher-forcing sequence: a chunk's frames, clean (t = r = 0) or noisy, full or compressed."""

    chunk: int
    first_frame: int
    frames: int
    noisy: bool
    compressed: bool


def teacher_forcing_layout(sizes: list[int], full_chunk_limit: int) -> tuple[list[Slot], Tensor]:
    """Slots and their (R, R) visibility for a prefix of chunks `sizes` whose last `full_chunk_limit` are targets.

    Noisy target j sees exactly its FAR context made of clean tokens: chunks older than its last
    `full_chunk_limit - 1` compressed, those at full resolution (clean copies where they are targets themselves),
    and its own noisy tokens; never its own clean copy nor another noisy chunk. Clean tokens never see noisy ones:
    they form one chunk-causal FAR layout, the one the cache holds for the first target (compressed chunks see
    earlier compressed ones; full chunks see the compressed prefix below the full window and earlier full chunks).
    Later targets' full-window entries are thereby encoded under that one layout rather than each target's own
    refresh: one clean copy per chunk serves all targets. The last target's clean copy would be seen by nobody, so
    it is left out.
    """
    n = len(sizes)
    window = full_chunk_limit - 1
    starts = [sum(sizes[:i]) for i in range(n)]
    targets = list(range(max(0, n - full_chunk_limit), n))
    lo = max(0, targets[0] - window)  # first chunk with a full-resolution clean slot
    slot = lambda c, noisy, comp: Slot(c, starts[c], sizes[c], noisy, comp)  # noqa: E731
    slots = [slot(c, False, True) for c in range(max(0, n - 1 - window))]  # compressed for the last target
    slots += [slot(c, False, False) for c in range(lo, targets[0])]
    slots += [slot(j, True, False) for j in targets]
    slots += [slot(c, False, False) for c in range(targets[0], n - 1)]

    def sees(q: Slot, k: Slot) -> bool:
        if q.noisy:
            if k.noisy:
                return k is q
            return k.chunk < q.chunk and k.compressed == (k.chunk < q.chunk - window)
        if k.noisy or k.chunk > q.chunk:
            return False
        if q.compressed:
            return k.compressed
        return k.compressed == (k.chunk < lo)

    visible = torch.tensor([[sees(q, k) for k in slots] for q in slots])
    return slots, visible


def teacher_forcing_batch(x0: Tensor, cfg, max_chunks: int, shared: torch.Generator):
    """A sampled prefix of the clip x0 (B, C, F, h, w) laid out for teacher forcing.

    Returns (chunks in the prefix, slots, visibility, first target frame, the clean prefix, the clean targets).
    """
    sizes = chunk_sizes(cfg.chunk_partition, x0.shape[2])
    n = prefix_chunks(len(sizes), cfg.full_chunk_limit, max_chunks, shared)
    slots, visible = teacher_forcing_layout(sizes[:n], cfg.full_chunk_limit)
    targets = [slot for slot in slots if slot.noisy]
    a, e = targets[0].first_frame, targets[-1].first_frame + targets[-1].frames
    clean = x0[:, :, :e]
    return n, slots, visible, a, clean, clean[:, :, a:]


def prefix_chunks(num_chunks: int, full_chunk_limit: int, max_chunks: int, gen: torch.Generator) -> int:
    """How many leading chunks a step trains on: half the time exactly `full_chunk_limit`, else uniform in
    full_chunk_limit..max_chunks; never more than the clip has."""
    low = min(full_chunk_limit, num_chunks)
    high = max(low, min(max_chunks, num_chunks))
    if torch.rand((), generator=gen) < 0.5:
        return low
    return int(torch.randint(low, high + 1, (), generator=gen))


def pair_kinds(global_batch: int, rank: int, batch_size: int, diffusion: float, consistency: float) -> Tensor:
    """Kind of each local sample's (t, r) pair, decided by its index in the global batch, so the shares hold for the
    global batch whatever the number of ranks."""
    index = torch.arange(rank * batch_size, (rank + 1) * batch_size)
    n_diff = round(diffusion * global_batch)
    n_cons = round(consistency * global_batch)
    return torch.where(index < n_diff, DIFFUSION, torch.where(index < n_diff + n_cons, CONSISTENCY, FREE))


def sample_pairs(kinds: Tensor, gen: torch.Generator) -> tuple[Tensor, Tensor]:
    """Two uniform times per sample: t = max, r = min; r = t for diffusion pairs, r = 0 for consistency pairs."""
    u = T_MAX * torch.rand(len(kinds), 2, generator=gen, dtype=torch.float64)
    t, r = u.max(1).values, u.min(1).values
    r = torch.where(kinds == DIFFUSION, t, torch.where(kinds == CONSISTENCY, torch.zeros_like(r), r))
    return t.float(), r.float()


def central_difference(evaluate, x0: Tensor, noise: Tensor, t: Tensor, eps: float) -> Tensor:
    """dU/dt along the noising path by a central difference: (U(z_{t+e}, t+e) - U(z_{t-e}, t-e)) / 2e, the points
    clamped to [0, 1000]. `evaluate(z, t)` gives the model output for a (2B,) batch; called once, no gradient."""
    hi, lo = (t + eps).clamp(max=T_MAX), (t - eps).clamp(min=0.0)
    times = torch.cat([hi, lo])
    with torch.no_grad():
        u = evaluate(noisy(torch.cat([x0, x0]), torch.cat([noise, noise]), times), times)
    u_hi, u_lo = u.chunk(2)
    return (u_hi - u_lo) / (hi - lo).view(-1, *[1] * (u.ndim - 1))


def flow_map_target(x0: Tensor, noise: Tensor, dudt: Tensor, t: Tensor, r: Tensor, g: Tensor | float) -> Tensor:
    """`(noise - x0) - (t - r) * dU/dt / g`: what the flow map from t to r must output for z_t on the path of
    (x0, noise); g is the guidance scale the derivative of the conditional output is divided by (1: none)."""
    return (noise - x0) - (t - r).view(-1, *[1] * (x0.ndim - 1)) * dudt / g


def time_weight(t: Tensor) -> Tensor:
    """Per-sample loss weight t^1 (1 - t)^0.5, t on [0, 1]."""
    s = (t / T_MAX).clamp(0, 1)
    return s * (1 - s).sqrt()


class Stage1Settings(BaseModel):
    """Stage-1 knobs (the chunk partition and full-window size come from the model's config)."""

    model_config = ConfigDict(extra="forbid")

    max_chunks: int = 8
    guidance: float = 3.0
    fd_eps: float = 5.0
    diffusion_share: float = 0.5
    consistency_share: float = 0.25
    caption_dropout: float = 0.1
    bidirectional_prob: float = 0.0
    fm_shift: float = 5.0


def stage1_loss(
    net: nn.Module, x0: Tensor, embeds: Tensor, negative: Tensor, settings: Stage1Settings, kinds: Tensor,
    shared: torch.Generator, local: torch.Generator, all_reduce=None,
) -> tuple[Tensor, dict]:
    """One stage-1 step's loss for the local batch x0 (B, C, F, h, w).

    `shared` draws what every rank must agree on (prefix length, whether the bidirectional loss is added), `local`
    the per-sample noise and times. `all_reduce(tensor)` sums across ranks (for the diffusion-mean rescaling over
    the global batch); None on one process.
    """
    b, dev, cfg = x0.shape[0], x0.device, unwrap(net).config
    n, slots, visible, a, clean, x_tgt = teacher_forcing_batch(x0, cfg, settings.max_chunks, shared)

    embeds, dropped = drop_captions(embeds, negative, settings.caption_dropout, local)
    g = torch.where(dropped, 1.0, settings.guidance).to(dev).view(-1, 1, 1, 1, 1)
    t, r = (v.to(dev) for v in sample_pairs(kinds, local))
    noise = torch.randn(x_tgt.shape, generator=local).to(dev)
    fm = None
    if settings.bidirectional_prob > 0 and torch.rand((), generator=shared) < settings.bidirectional_prob:
        fm_t = T_MAX * shift_times(torch.sigmoid(torch.randn(b, generator=local)), settings.fm_shift).to(dev)
        fm_noise = torch.randn(x0.shape, generator=local).to(dev)
        fm = (fm_t, fm_noise)

    def runs(z: Tensor, tt: Tensor, rr: Tensor, reps: int = 1) -> list[Run]:
        """Runs for noisy target latents z (reps*B, ...) at times (tt, rr), clean context repeated reps times."""
        ctx = clean.repeat(reps, 1, 1, 1, 1)
        zero = torch.zeros_like(tt)
        out = []
        for s in slots:
            if s.noisy:
                lat, ts, rs = z[:, :, s.first_frame - a:s.first_frame - a + s.frames], tt, rr
            else:
                lat, ts, rs = ctx[:, :, s.first_frame:s.first_frame + s.frames], zero, zero
            out.append(Run(lat, ts, rs, s.first_frame, s.compressed))
        return out

    def velocity(outputs: list) -> Tensor:
        return torch.cat([u for u, s in zip(outputs, slots) if s.noisy], dim=2)

    z_t = noisy(x_tgt, noise, t)
    cond2 = torch.cat([embeds, embeds])
    dudt = central_difference(lambda z, tt: velocity(net(runs(z, tt, torch.cat([r, r]), 2), cond2, visible)),
                              x_tgt, noise, t, settings.fd_eps)
    with torch.no_grad():
        u_uncond = velocity(net(runs(z_t, t, r), negative.to(dev, embeds.dtype).expand_as(embeds), visible))

    all_runs, all_visible = runs(z_t, t, r), visible
    if fm is not None:  # the whole clip, bidirectional, r = t: one more run that sees and is seen by nothing else
        fm_t, fm_noise = fm
        all_runs.append(Run(noisy(x0, fm_noise, fm_t), fm_t, fm_t, 0))
        all_visible = torch.zeros(len(slots) + 1, len(slots) + 1, dtype=torch.bool)
        all_visible[:-1, :-1] = visible
        all_visible[-1, -1] = True
    outputs = net(all_runs, embeds, all_visible)
    u_cond = velocity(outputs[:len(slots)])

    target = flow_map_target(x_tgt, noise, dudt, t, r, g)
    u = (u_cond - (1 - g) * u_uncond) / g
    per_sample = (u - target).pow(2).flatten(1).mean(1) * time_weight(t)

    is_diff = (kinds == DIFFUSION).to(dev)
    sums = torch.stack([per_sample[is_diff].sum(), is_diff.sum(), per_sample[~is_diff].sum(), (~is_diff).sum()])
    sums = sums.detach().double()
    if all_reduce is not None:
        sums = all_reduce(sums)
    diff_mean, other_mean = sums[0] / sums[1].clamp(min=1), sums[2] / sums[3].clamp(min=1)
    scale = torch.where(is_diff | (sums[1] == 0) | (other_mean == 0), 1.0, (diff_mean / other_mean).float())
    loss = (per_sample * scale).mean()
    stats = {"diffusion_loss": float(diff_mean), "flow_map_loss": float(other_mean), "chunks": n}
    if fm is not None:
        fm_loss = F.mse_loss(outputs[-1], fm[1] - x0)
        loss = loss + fm_loss
        stats["bidirectional_loss"] = fm_loss.detach().item()
    stats["tokens"] = b * sum(math.prod(unwrap(net).token_grid(run.latents, run.compressed)) for run in all_runs)
    return loss, stats


def unwrap(net: nn.Module) -> CausalWanTransformer:
    """The transformer inside a Denoiser, itself possibly inside DDP (FSDP2 keeps the module's own class)."""
    while not isinstance(net, Denoiser):
        net = net.module
    return net.model


# -- student initialisation -----------------------------------------------------------------------------------------


@torch.no_grad()
def init_student_from_teacher(student: CausalWanTransformer, teacher_state: dict[str, Tensor]) -> None:
    """Teacher weights in; `delta_embedder` a copy of `time_embedder` (so with r = t the gated mix is the teacher's
    time embedding and the student starts as the teacher); `far_patch_embedding` the patch kernel resized
    trilinearly to the compressed patch, bias copied."""
    student.load_state_dict(teacher_state)
    emb = student.condition_embedder
    emb.delta_embedder.load_state_dict(emb.time_embedder.state_dict())
    weight = student.patch_embedding.weight.float()
    size = student.config.compressed_patch_size
    student.far_patch_embedding.weight.copy_(F.interpolate(weight, size=size, mode="trilinear", align_corners=False))
    student.far_patch_embedding.bias.copy_(student.patch_embedding.bias)
