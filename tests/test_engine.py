import pytest
import torch

from streamgen import Generator, Schedule
from streamgen.cache import context_layout
from streamgen.engine import chunk_sizes, upload
from streamgen.model import Run
from streamgen.schedule import jump


def slow_generate(model, prompt, noise, budgets):
    """Obviously correct and slow: every step re-runs the transformer over the whole context, no cache.

    The context of chunk k is chunks < k as the FAR layout says (old ones compressed), clean (t = r = 0), mutually
    chunk-causal; the noisy chunk sees all of it and itself.
    """
    cfg = model.config
    sizes = chunk_sizes(cfg.chunk_partition, noise.shape[2])
    text = model.encode_text(prompt)
    finals, start = [], 0
    for k, size in enumerate(sizes):
        zero = torch.zeros(noise.shape[0])
        ctx = [Run(finals[e.chunk], zero, zero, e.first_frame, e.compressed)
               for e in context_layout(sizes, k, cfg.full_chunk_limit)]
        n = len(ctx) + 1
        visible = torch.tensor([[j <= i or i == n - 1 for j in range(n)] for i in range(n)])
        z = noise[:, :, start:start + size].clone()
        for t, r in budgets[k]:
            tt, rr = torch.full((noise.shape[0],), t), torch.full((noise.shape[0],), r)
            u = model(ctx + [Run(z, tt, rr, start)], text, visible=visible).velocities[-1]
            z = jump(z, u, t, r)
        finals.append(z)
        start += size
    return torch.cat(finals, dim=2)


@pytest.mark.parametrize("steps", [1, 2, 4, 7])
def test_cached_generator_equals_slow_reference(tiny_model, prompt, steps):
    noise = torch.randn(1, 16, 8, 16, 16, generator=torch.Generator().manual_seed(steps))
    with torch.no_grad():
        fast = Generator(tiny_model).generate(prompt, noise=noise, steps=steps)
        slow = slow_generate(tiny_model, prompt, noise, [Schedule.from_steps(steps)] * 5)
    assert fast.shape == noise.shape
    assert torch.allclose(fast, slow, atol=1e-4, rtol=1e-4), (fast - slow).abs().max()


def test_per_chunk_budgets_and_explicit_schedules(tiny_model, prompt):
    noise = torch.randn(1, 16, 8, 16, 16, generator=torch.Generator().manual_seed(0))
    budgets = [1, Schedule([(1000.0, 600.0), (600.0, 0.0)]), 3, 1, 2]
    chunks = list(Generator(tiny_model).stream(prompt, noise=noise, steps=budgets))
    assert [c.steps for c in chunks] == [1, 2, 3, 1, 2]
    assert [c.first_frame for c in chunks] == [0, 1, 3, 5, 7]
    with torch.no_grad():
        slow = slow_generate(tiny_model, prompt, noise,
                             [b if isinstance(b, Schedule) else Schedule.from_steps(b) for b in budgets])
    assert torch.allclose(torch.cat([c.latents for c in chunks], 2), slow, atol=1e-4, rtol=1e-4)


def test_seed_determinism(tiny_model, prompt):
    gen = Generator(tiny_model)
    a = gen.generate(prompt, height=16, width=16, num_frames=5, steps=2, seed=11)
    b = gen.generate(prompt, height=16, width=16, num_frames=5, steps=2, seed=11)
    c = gen.generate(prompt, height=16, width=16, num_frames=5, steps=2, seed=12)
    assert torch.equal(a, b)
    assert (a - c).abs().mean() > 0.1


def test_context_prefill_continues_the_same_video(tiny_model, prompt):
    """Given the first chunks of a video as context, the rest comes out as when they were generated."""
    noise = torch.randn(1, 16, 8, 16, 16, generator=torch.Generator().manual_seed(5))
    gen = Generator(tiny_model)
    full = gen.generate(prompt, noise=noise, steps=2)
    chunks = list(gen.stream(prompt, noise=noise, steps=2, context=full[:, :, :3]))
    assert [c.from_context for c in chunks] == [True, True, False, False, False]
    assert torch.equal(chunks[0].latents, full[:, :, :1]) and torch.equal(chunks[1].latents, full[:, :, 1:3])
    assert torch.allclose(torch.cat([c.latents for c in chunks], 2), full, atol=1e-5)


def test_batch_rows_are_independent(tiny_model, prompt):
    noise = torch.randn(2, 16, 3, 16, 16, generator=torch.Generator().manual_seed(9))
    prompts = torch.cat([prompt, prompt.flip(1)])
    gen = Generator(tiny_model)
    both = gen.generate(prompts, noise=noise, steps=2)
    one = gen.generate(prompts[1:], noise=noise[1:], steps=2)
    assert torch.allclose(both[1:], one, atol=1e-5)


def test_chunk_sizes():
    assert chunk_sizes([1, 3, 3, 2], 9) == [1, 3, 3, 2]
    assert chunk_sizes([1, 3, 3, 2], 5) == [1, 3, 1]
    assert chunk_sizes([1, 3, 3, 2], 13) == [1, 3, 3, 2, 3, 1]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(height=16, width=16, steps=0), "step budget"),
        (dict(height=16, width=16, steps=[1, 2]), "budgets for 5"),
        (dict(height=18, width=16), "multiples of the compressed patch"),
        (dict(height=16, width=16, num_frames=0), "num_frames"),
        (dict(noise=torch.zeros(1, 4, 8, 16, 16)), "noise must be"),
        (dict(noise=torch.zeros(1, 16, 8, 16, 16), num_frames=9), "contradicts"),
        (dict(height=16, width=16, context=torch.zeros(1, 16, 2, 16, 16)), "whole chunks"),
        (dict(height=16, width=16, num_frames=3, context=torch.zeros(1, 16, 3, 16, 16)), "nothing left"),
        (dict(), "height and width"),
    ],
)
def test_bad_requests_are_named(tiny_model, prompt, kwargs, message):
    with pytest.raises(ValueError, match=message):
        next(Generator(tiny_model).stream(prompt, **kwargs))


def test_cache_holds_exactly_the_largest_context(tiny_model, prompt):
    # tiny: chunks [1, 2, 2, 2, 1] of 16x16 latents (64 tokens per full frame, 16 compressed), 3 chunks at full
    # resolution: chunk 4's context, the largest, is 16 + 2 * 16 + 4 * 64 = 304 tokens; a chunk's own tokens stay
    # out of the cache (chunk 3 with its context would need 400)
    assert tiny_model.config.chunk_partition == [1, 2, 2, 2, 1] and tiny_model.config.full_chunk_limit == 3
    with Generator(tiny_model).open(prompt, height=16, width=16, num_frames=8, steps=1, seed=0) as video:
        assert video.sizes == [1, 2, 2, 2, 1] and video.cache.capacity == 304
        chunks = [chunk.latents for chunk in video]
    assert sum(c.shape[2] for c in chunks) == 8


def test_bad_prompt_shape(tiny_model):
    with pytest.raises(ValueError, match="prompt_embeds"):
        next(Generator(tiny_model).stream(torch.zeros(1, 8, 31), height=16, width=16))


def one_by_one(gen, specs, chunks):
    """Latent chunks of each (prompt, seed, steps) stream made alone: the reference for `next_chunks`."""
    out = []
    for prompt, seed, steps in specs:
        with gen.open(prompt, height=16, width=16, steps=steps, seed=seed) as video:
            out.append([video.next_chunk().latents for _ in range(chunks)])
    return out


def test_next_chunks_shares_forwards_where_chunks_match_and_equals_one_by_one(tiny_model, prompt):
    """Endless streams, well past their window: equal budgets share forwards, a different budget runs alone."""
    gen = Generator(tiny_model)
    specs = [(prompt, 1, 2), (prompt.flip(1), 2, 2), (prompt, 3, 3)]
    expected = one_by_one(gen, specs, 12)
    videos = [gen.open(p, height=16, width=16, steps=steps, seed=seed) for p, seed, steps in specs]
    batches = []
    for k in range(12):
        made = gen.next_chunks(videos)
        batches.append([c.batch for c in made])
        for i, chunk in enumerate(made):
            assert chunk.index == k
            torch.testing.assert_close(chunk.latents, expected[i][k], atol=1e-5, rtol=0)
    assert batches == [[2, 2, 1]] * 12
    for video in videos:
        video.close()


def test_next_chunks_of_streams_at_different_points(tiny_model, prompt):
    """A stream started later is at another position: alone until both are endless steady state (same layout)."""
    gen = Generator(tiny_model)
    expected = one_by_one(gen, [(prompt, 1, 2), (prompt, 2, 2)], 14)
    early = gen.open(prompt, height=16, width=16, steps=2, seed=1)
    late = gen.open(prompt, height=16, width=16, steps=2, seed=2)
    for _ in range(4):
        early.next_chunk()
    batches = []
    for k in range(10):
        a, b = gen.next_chunks([early, late], steps=[None, 2])
        batches.append(a.batch)
        torch.testing.assert_close(a.latents, expected[0][k + 4], atol=1e-5, rtol=0)
        torch.testing.assert_close(b.latents, expected[1][k], atol=1e-5, rtol=0)
    assert batches[0] == 1 and batches[-1] == 2  # joined once their contexts had the same layout


def test_next_chunks_reports_each_streams_failure_in_its_place(tiny_model, prompt):
    gen = Generator(tiny_model)
    videos = [gen.open(prompt, height=16, width=16, num_frames=1, steps=1, seed=s) for s in range(3)]
    videos[1].close()
    made = gen.next_chunks(videos)
    assert isinstance(made[1], RuntimeError) and "closed" in str(made[1])
    assert made[0].batch == 2 and made[2].batch == 2
    with pytest.raises(ValueError, match="2 step budgets for 3 streams"):
        gen.next_chunks(videos, steps=[1, 2])
    with pytest.raises(ValueError, match="listed twice"):
        gen.next_chunks([videos[0], videos[0]])


def test_next_chunks_falls_back_to_one_by_one_when_the_shared_forward_fails(tiny_model, prompt, monkeypatch):
    gen = Generator(tiny_model)
    expected = one_by_one(gen, [(prompt, 1, 2), (prompt, 2, 2)], 3)
    videos = [gen.open(prompt, height=16, width=16, steps=2, seed=s) for s in (1, 2)]

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("simulated")

    monkeypatch.setattr(gen, "_denoise_together", out_of_memory)
    for k in range(3):
        made = gen.next_chunks(videos)
        assert [c.batch for c in made] == [1, 1]
        for i in range(2):
            torch.testing.assert_close(made[i].latents, expected[i][k], atol=1e-5, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the copy that must not wait is a CUDA one")
def test_noise_upload_does_not_wait_for_the_device():
    x = torch.randn(2, 16, 3, 60, 104)
    busy = torch.cuda.Event()
    torch.cuda._sleep(2_000_000_000)  # a second or so of GPU work queued ahead of the copy
    busy.record()
    y = upload(x, torch.device("cuda"))
    assert not busy.query(), "upload waited for the queued GPU work"
    assert y.dtype == torch.float32 and torch.equal(y.cpu(), x)
