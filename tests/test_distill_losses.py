import pytest
import torch
from torch.func import jvp
from wan_reference import velocity

from distill.losses import (
    CONSISTENCY,
    DIFFUSION,
    FREE,
    Denoiser,
    Stage1Settings,
    central_difference,
    flow_map_target,
    init_student_from_teacher,
    noisy,
    pair_kinds,
    sample_pairs,
    stage1_loss,
    teacher_forcing_layout,
)
from streamgen import CausalWanTransformer, preset
from streamgen.attention import Mask
from streamgen.cache import context_layout
from streamgen.engine import chunk_sizes
from streamgen.model import Run


def test_central_difference_target_matches_float64_jvp(tiny_model):
    """The finite-difference target equals (noise - x0) - (t - r) dU/dt with dU/dt an exact forward-mode derivative of
    a float64 transcription of the model along the noising path; the error shrinks as eps^2.

    Small eps here: a random model's time embedding has sinusoids of period ~6 time units, so the spec's eps = 5 only
    approximates the derivative of models that are smooth in t at that scale (trained ones)."""
    torch.manual_seed(3)
    x0 = torch.randn(2, 16, 2, 8, 8, dtype=torch.float64)
    noise = torch.randn_like(x0)
    prompt = torch.randn(2, 6, 32, dtype=torch.float64)
    t, r = torch.tensor([700.0, 350.0], dtype=torch.float64), torch.tensor([200.0, 0.0], dtype=torch.float64)

    def along_path(tau):
        return velocity(tiny_model, noisy(x0, noise, tau), tau, r, prompt)

    _, exact = jvp(along_path, (t,), (torch.ones_like(t),))
    reference = flow_map_target(x0, noise, exact, t, r, 1.0)

    def evaluate(z, tt):
        return velocity(tiny_model, z, tt, torch.cat([r, r]), torch.cat([prompt, prompt]))

    errors = []
    for eps in (0.1, 0.01):
        dudt = central_difference(evaluate, x0, noise, t, eps)
        target = flow_map_target(x0, noise, dudt, t, r, 1.0)
        errors.append(((target - reference).norm() / (reference - (noise - x0)).norm()).item())
    assert errors[0] < 1e-2
    assert errors[1] < errors[0] / 30  # second order: 100x smaller in theory


@pytest.mark.parametrize("partition,frames", [([1, 3, 3, 3, 3, 3, 3, 2], 21), ([1, 2, 2, 2, 1], 8), ([2], 6)])
def test_teacher_forcing_mask_obeys_the_rules(partition, frames):
    window = 2  # full_chunk_limit 3
    all_sizes = chunk_sizes(partition, frames)
    for n in range(1, len(all_sizes) + 1):
        sizes = all_sizes[:n]
        slots, visible = teacher_forcing_layout(sizes, window + 1)
        per_frame = {True: 1, False: 4}  # tokens per frame, compressed / full
        lens = [s.frames * per_frame[s.compressed] for s in slots]
        dense = Mask.from_runs(visible, lens, lens).dense
        if dense is None:  # a prefix mask: every query sees a prefix of the keys
            dense = visible.repeat_interleave(torch.tensor(lens), 0).repeat_interleave(torch.tensor(lens), 1)
        owner = torch.arange(len(slots)).repeat_interleave(torch.tensor(lens))
        targets = [s.chunk for s in slots if s.noisy]
        assert targets == list(range(max(0, n - window - 1), n))
        copies = {s.chunk for s in slots if not s.noisy and not s.compressed and s.chunk in targets}
        assert copies == set(targets[:-1])  # every target's clean copy but the last's (seen by nobody)
        for qi in range(len(owner)):
            q = slots[owner[qi]]
            seen = {}
            for ki in range(len(owner)):
                k = slots[owner[ki]]
                allowed = bool(dense[qi, ki])
                seen.setdefault(int(owner[ki]), []).append(allowed)
                if k.chunk > q.chunk:
                    assert not allowed, "no token sees a later chunk"
                if q.noisy and not k.noisy and k.chunk == q.chunk:
                    assert not allowed, "noisy tokens never see their own chunk's clean copy"
                if q.noisy and k.noisy and k.chunk != q.chunk:
                    assert not allowed, "noisy tokens never see other noisy chunks"
                if not q.noisy and k.noisy:
                    assert not allowed, "clean tokens never see noisy ones"
                if owner[ki] == owner[qi]:
                    assert allowed, "a chunk's tokens see each other"
            if q.noisy:  # the clean context is exactly the engine's FAR context of this chunk
                context = {(e.chunk, e.compressed) for e in context_layout(sizes, q.chunk, window + 1)}
                got = set()
                for si, flags in seen.items():
                    k = slots[si]
                    assert all(flags) or not any(flags), "a slot is seen whole or not at all"
                    if all(flags) and not k.noisy:
                        got.add((k.chunk, k.compressed))
                assert got == context


def test_pair_shares_over_the_global_batch():
    kinds = torch.cat([pair_kinds(8, rank, 2, 0.5, 0.25) for rank in range(4)])
    assert kinds.tolist() == [DIFFUSION] * 4 + [CONSISTENCY] * 2 + [FREE] * 2
    t, r = sample_pairs(kinds, torch.Generator().manual_seed(0))
    assert torch.equal(t[:4], r[:4]) and (r[4:6] == 0).all() and (t[6:] > r[6:]).all() and (r[6:] > 0).all()


def test_student_starts_as_the_teacher(tiny_model, prompt):
    teacher = CausalWanTransformer(preset("tiny").model_copy(update={"gate_value": 0.0}))
    teacher.load_state_dict(tiny_model.state_dict())
    student = CausalWanTransformer(preset("tiny"))
    init_student_from_teacher(student, teacher.state_dict())
    z, t = torch.randn(1, 16, 2, 8, 8), torch.tensor([400.0])
    with torch.no_grad():
        a = teacher([Run(z, t, t, 0)], teacher.encode_text(prompt)).velocities[0]
        b = student([Run(z, t, t, 0)], student.encode_text(prompt)).velocities[0]
    assert torch.allclose(a, b, atol=1e-5)
    w = student.far_patch_embedding.weight
    assert w.shape[-2:] == (4, 4) and torch.allclose(w.mean((-1, -2)), teacher.patch_embedding.weight.mean((-1, -2)))


def test_stage1_loss_decreases_on_a_fixed_batch(prompt):
    torch.manual_seed(0)
    net = Denoiser(CausalWanTransformer(preset("tiny")))
    x0, embeds = torch.randn(2, 16, 8, 4, 4), prompt.repeat(2, 1, 1)
    settings = Stage1Settings(bidirectional_prob=0.5, caption_dropout=0.25)
    kinds = torch.tensor([DIFFUSION, FREE])
    optimizer = torch.optim.AdamW(net.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        loss, stats = stage1_loss(net, x0, embeds, torch.zeros_like(prompt), settings, kinds,
                                  torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    assert stats["chunks"] >= 3 and stats["tokens"] > 0
    assert losses[-1] < 0.6 * losses[0]
