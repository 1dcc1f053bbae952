import json
from itertools import pairwise

import pytest
import torch
from test_distill_train import final_state, flat, setup, torchrun  # noqa: F401 (setup is a fixture)

from distill.consistency import consistency_step
from distill.losses import Stage1Settings, init_student_from_teacher, noisy, pair_kinds
from distill.stage2 import CRITIC, GENERATOR, Stage2, Stage2Settings, backward_simulation_jumps, dmd_loss, rollout
from streamgen import CausalWanTransformer, Generator, Schedule, preset
from streamgen.model import Run
from streamgen.schedule import jump, shifted_times

SIZE = 8  # latent height and width


def text_of(model, prompt):
    return model.condition_embedder.text_embedder(prompt)


def noise_for(frames=8, seed=4):
    return torch.randn(1, 16, frames, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("budget,k", [(4, 0), (4, 1), (4, 3), (2, 1)])
def test_three_jump_rollout_is_the_engine_on_the_same_jumps(tiny_model, prompt, budget, k):
    """Chunk by chunk over 5 chunks (compressed and full context): the rollout (with gradient on) gives what
    `Generator.stream` gives for the same three jumps and noise: its cache holds the engine's FAR context."""
    noise = noise_for()
    jumps = backward_simulation_jumps(budget, k, 5.0)
    s = shifted_times(budget)
    assert [(t, r) for t, r, _ in jumps] == [j for j in [(1000.0, s[k]), (s[k], s[k + 1]), (s[k + 1], 0.0)]
                                             if j[0] > j[1]]
    video = torch.cat(rollout(tiny_model, text_of(tiny_model, prompt), noise, jumps), dim=2)
    engine = Generator(tiny_model).generate(prompt, noise=noise, steps=Schedule([(t, r) for t, r, _ in jumps]))
    torch.testing.assert_close(video.detach(), engine, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # and the plain N-step rollout is the engine's N-step generation
        plain = rollout(tiny_model, text_of(tiny_model, prompt), noise,
                        [(t, r, False) for t, r in Schedule.from_steps(budget)])
    torch.testing.assert_close(torch.cat(plain, 2), Generator(tiny_model).generate(prompt, noise=noise, steps=budget),
                               rtol=1e-4, atol=1e-4)


def test_three_jumps_equal_the_n_step_rollout_when_the_flow_map_is_exact(tiny_model, prompt):
    """A model whose output is a constant (proj_out weight zero) is an exact flow map: jumps compose, so every
    (N, k) three-jump rollout equals the N-step one (and noise - u)."""
    with torch.no_grad():
        tiny_model.proj_out.weight.zero_()
    noise = noise_for()
    text = text_of(tiny_model, prompt)
    with torch.no_grad():
        u = tiny_model([Run(noise, torch.tensor([500.0]), torch.tensor([100.0]), 0)], text).velocities[0]
        for budget in (2, 4, 8):
            steps = [(t, r, False) for t, r in Schedule.from_steps(budget)]
            plain = torch.cat(rollout(tiny_model, text, noise, steps), 2)
            torch.testing.assert_close(plain, noise - u, rtol=1e-5, atol=1e-5)
            for k in range(budget):
                three = torch.cat(rollout(tiny_model, text, noise, backward_simulation_jumps(budget, k, 5.0)), 2)
                torch.testing.assert_close(three, plain, rtol=1e-5, atol=1e-5)


def test_gradient_flows_through_the_real_step_and_the_last_shortcut_only(tiny_model, prompt):
    noise = noise_for().requires_grad_(True)
    calls = []
    tiny_model.register_forward_hook(lambda m, args, kwargs, out: calls.append(torch.is_grad_enabled()),
                                     with_kwargs=True)
    chunks = rollout(tiny_model, text_of(tiny_model, prompt).detach(), noise, backward_simulation_jumps(4, 1, 5.0))
    assert len(chunks) == 5
    # per chunk: shortcut (no grad), real step and shortcut to 0 (grad); 4 cache refreshes (no grad)
    assert calls.count(True) == 2 * 5 and calls.count(False) == 5 + 4
    assert all(c.requires_grad for c in chunks)
    # the cache carries no gradient: the last chunk does not depend on earlier chunks through autograd
    assert torch.autograd.grad(chunks[-1].sum(), chunks[:-1], allow_unused=True, retain_graph=True) == (None,) * 4
    sum(c.square().sum() for c in chunks).backward()
    assert noise.grad is None  # the first shortcut has no gradient
    grads = {n: p.grad for n, p in tiny_model.named_parameters()}
    assert grads["proj_out.weight"].abs().sum() > 0 and grads["blocks.0.attn1.to_q.weight"].abs().sum() > 0
    assert grads["far_patch_embedding.weight"] is None  # compressed context only reaches the cache


def test_dmd_gradient_normalisation_by_hand():
    x0 = torch.tensor([[1.0, 2.0], [3.0, 5.0]], requires_grad=True)
    x_real = torch.tensor([[0.0, 0.0], [1.0, 1.0]])  # mean |x0 - x_real|: 1.5 and 3
    x_fake = torch.tensor([[3.0, 0.0], [1.0, 4.0]])  # x_fake - x_real: [3, 0] and [0, 3]
    loss, grad = dmd_loss(x0, x_real, x_fake)
    torch.testing.assert_close(grad, torch.tensor([[2.0, 0.0], [0.0, 1.0]]))
    torch.testing.assert_close(loss, torch.tensor(1.25))  # mean of grad^2
    loss.backward()
    torch.testing.assert_close(x0.grad, torch.tensor([[1.0, 0.0], [0.0, 0.5]]))  # 2 grad / numel: the DMD direction


def test_stage2_on_a_tiny_model_critic_loss_decreases_on_a_fixed_batch(prompt):
    torch.manual_seed(0)
    teacher = CausalWanTransformer(preset("tiny").model_copy(update={"gate_value": 0.0}))
    student = CausalWanTransformer(preset("tiny"))
    init_student_from_teacher(student, teacher.state_dict())
    critic = CausalWanTransformer(teacher.config)
    critic.load_state_dict(teacher.state_dict())
    kinds = pair_kinds(2, 0, 2, 0.5, 0.25)
    core = Stage2(student, critic, teacher, torch.zeros(1, 8, 32), Stage2Settings(budgets=[2, 4]),
                  Stage1Settings(), kinds)
    x_data, embeds = torch.randn(2, 16, 8, SIZE, SIZE), prompt.expand(2, -1, -1)
    optims = {CRITIC: torch.optim.AdamW(core.critic.parameters(), lr=1e-3, betas=(0.0, 0.999)),
              GENERATOR: torch.optim.AdamW(core.generator.parameters(), lr=1e-5, betas=(0.0, 0.999))}
    losses = {CRITIC: [], GENERATOR: []}
    for step in range(8):
        phase = step % 2
        loss, stats = core(x_data, embeds, phase, torch.Generator().manual_seed(1), torch.Generator().manual_seed(2))
        assert torch.isfinite(loss) and {"budget", "k"} <= set(stats)
        assert ("critic_loss" in stats) == (phase == CRITIC) and ("dmd_loss" in stats) == (phase == GENERATOR)
        loss.backward()
        assert all(p.grad is None for p in core.teacher.parameters())
        idle = core.generator if phase == CRITIC else core.critic
        assert all(p.grad is None for p in idle.parameters())
        optims[phase].step()
        for o in optims.values():
            o.zero_grad(set_to_none=True)
        losses[phase].append(loss.item())
    critic = losses[CRITIC]
    assert all(b < a for a, b in pairwise(critic)) and critic[-1] < 0.95 * critic[0], critic


def stage2_config(root, name):
    return {"task": "stage2", "output_dir": str(root / name), "steps": 4, "batch_size": 1, "seed": 5,
            "data": str(root / "data"), "vae": str(root / "vae"), "init_from": str(root / "teacher"),
            "teacher": str(root / "teacher"), "log_every": 1, "save_every": 2,
            "optim": {"lr": 1e-4, "betas": [0.0, 0.999], "ema_decay": 0.99}, "stage2": {"budgets": [2, 4]}}


def test_two_process_stage2_kill_and_resume_is_bit_identical(setup):  # noqa: F811
    torchrun(stage2_config(setup, "s2_whole"), setup)
    torchrun(stage2_config(setup, "s2_killed"), setup, "--kill-after", "2")
    torchrun(stage2_config(setup, "s2_killed"), setup)
    whole, resumed = final_state(setup / "s2_whole"), final_state(setup / "s2_killed")
    assert whole["step"] == resumed["step"] == 4 and len(whole["optimizer"]) == 2  # critic's and generator's
    a, b = (dict(flat({k: s[k] for k in ("model", "ema", "optimizer")})) for s in (whole, resumed))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k], k
    log = [json.loads(line) for line in (setup / "s2_killed" / "log.jsonl").read_text().splitlines()]
    assert [("critic_loss" in r, "dmd_loss" in r) for r in log] == [(True, False), (False, True)] * 2
    model = whole["model"]
    changed = lambda prefix: any(not torch.equal(model[k], model[k.replace(prefix, "teacher.")])  # noqa: E731
                                 for k in model if k.startswith(prefix) and "delta_embedder" not in k)
    assert changed("critic.")
    assert all(torch.equal(model[k], v) for k, v in model.items() if k.startswith("teacher."))
    assert (setup / "s2_whole" / "model" / "transformer" / "config.json").is_file()


def test_consistency_sampler_on_an_exact_flow_is_its_definition():
    """Data = one point x*: the exact endpoint map is f(z, t) = x*; each step re-noises x* to the next time with
    the sampler's own draws, and the last step returns x*."""
    x_star = torch.randn(1, 16, 2, SIZE, SIZE)

    def predict(z, t, r):
        assert r == 0.0  # the sampler only asks for endpoints
        return (z - x_star) / (t / 1000)

    rng, twin = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    z = torch.randn(x_star.shape, generator=rng)
    torch.randn(x_star.shape, generator=twin)
    for t, r in Schedule.from_steps(4):
        z = consistency_step(predict, z, t, r, rng)
        expect = x_star if r == 0 else noisy(x_star, torch.randn(x_star.shape, generator=twin), torch.tensor([r]))
        torch.testing.assert_close(z, expect, rtol=1e-5, atol=1e-5)


def test_consistency_sampler_in_the_engine(tiny_model, prompt):
    """Generator(step=consistency_step): one step is the flow-map jump 1000 -> 0; two steps on the first chunk are
    jump to 0, re-noise with the stream's generator, jump to 0."""
    gen = Generator(tiny_model, step=consistency_step)
    one = gen.generate(prompt, height=SIZE, width=SIZE, num_frames=5, steps=1, seed=7)
    torch.testing.assert_close(one, Generator(tiny_model).generate(prompt, height=SIZE, width=SIZE, num_frames=5,
                                                                   steps=1, seed=7))
    first = next(gen.stream(prompt, height=SIZE, width=SIZE, num_frames=5, steps=2, seed=7)).latents
    rng = torch.Generator().manual_seed(7)
    z = torch.randn(1, 16, 1, SIZE, SIZE, generator=rng)
    text = tiny_model.encode_text(prompt)
    with torch.no_grad():
        for t, r in Schedule.from_steps(2):
            u = tiny_model([Run(z, torch.tensor([t]), torch.tensor([0.0]), 0)], text).velocities[0]
            z = jump(z, u, t, 0.0)
            if r:
                z = noisy(z, torch.randn(z.shape, generator=rng), torch.tensor([r]))
    torch.testing.assert_close(first, z, rtol=1e-5, atol=1e-5)
