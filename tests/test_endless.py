"""Endless streams, re-indexing and prompt/step changes of `LatentStream`."""

import pytest
import torch

from streamgen import Generator, Schedule
from streamgen.cache import Entry, KVCache, live_caches, rotate_time, window_layout
from streamgen.model import Run
from streamgen.schedule import jump

SIZE = 16  # latent height and width of these tests


def partition_size(cfg):
    return lambda k: cfg.chunk_partition[k] if k < len(cfg.chunk_partition) else max(cfg.chunk_partition)


def slow_endless(model, prompt, seed, num_chunks, steps, max_frames, window=None, prompts=None):
    """From scratch, no cache: chunk k's context is `window_layout`'s, re-encoded clean and chunk-causal at its
    positions, and chunk k is denoised at the position after it. `prompts[k]` overrides the prompt from chunk k."""
    cfg = model.config
    size = partition_size(cfg)
    rng = torch.Generator("cpu").manual_seed(seed)
    text = model.encode_text(prompt)
    finals, floor = [], 1
    zero = torch.zeros(1)
    for k in range(num_chunks):
        if prompts and k in prompts:
            text = model.encode_text(prompts[k])
        layout, floor = window_layout(size, k, cfg.full_chunk_limit, max_frames, window, floor)
        ctx = [Run(finals[e.chunk], zero, zero, e.first_frame, e.compressed) for e in layout]
        n = len(ctx) + 1
        visible = torch.tensor([[j <= i or i == n - 1 for j in range(n)] for i in range(n)])
        z = torch.randn((1, cfg.in_channels, size(k), SIZE, SIZE), generator=rng)
        for t, r in Schedule.from_steps(steps):
            u = model(ctx + [Run(z, torch.full((1,), t), torch.full((1,), r), sum(e.frames for e in layout))], text,
                      visible=visible).velocities[-1]
            z = jump(z, u, t, r)
        finals.append(z)
    return finals


def fresh_cache(model, layout, latents, text):
    cache = KVCache.for_layouts(model, 1, SIZE, SIZE, [layout])
    cache.refresh(layout, latents.__getitem__, text)
    return cache


def assert_same_cache(cache, ref, atol=1e-5):
    assert cache.entries == ref.entries and cache.length == ref.length
    n = cache.length
    for ours, theirs in ((cache.keys, ref.keys), (cache.values, ref.values)):
        torch.testing.assert_close(ours[:, :, :n], theirs[:, :, :n], atol=atol, rtol=atol)


def test_window_layout_on_the_released_partition():
    """1.3B/14B: 21 trained frames in chunks [1,3,3,3,3,3,3,2], then 3s; full window of 2 chunks."""
    partition = [1, 3, 3, 3, 3, 3, 3, 2]
    size = lambda k: partition[k] if k < len(partition) else 3  # noqa: E731
    floor, seen_floors = 1, []
    for k in range(1, 60):
        layout, floor = window_layout(size, k, 3, 21, None, floor)
        positions = [e.first_frame for e in layout]
        assert positions == sorted(positions) and positions[0] == 0
        assert sum(e.frames for e in layout) + size(k) <= 21  # the chunk being made still ends in the trained range
        if k >= 3:
            assert layout[0] == Entry(0, 0, 1, True)  # the anchor stays, at position 0
        assert not any(e.compressed for e in layout[-2:])
        seen_floors.append(floor)
        if k < len(partition):  # before the trained length is reached nothing leaves: the usual FAR layout
            assert [e.chunk for e in layout] == list(range(k))
            assert positions == [sum(size(c) for c in range(e.chunk)) for e in layout]
        if k == 8:
            assert [e.chunk for e in layout] == [0, 2, 3, 4, 5, 6, 7]  # chunk 1 is the first to leave
        if k >= 20:
            assert len(layout) == 1 + 3 + 2  # anchor, three compressed chunks, two full chunks
    assert seen_floors == sorted(seen_floors)  # an evicted chunk never comes back
    layout, _ = window_layout(size, 30, 3, 21, 1, 1)
    assert [e.compressed for e in layout] == [True, True, False, False]  # window=1: one compressed chunk + anchor
    with pytest.raises(ValueError, match="cannot hold"):
        window_layout(size, 30, 3, 9, None, 1)


def test_endless_equals_finite_until_the_trained_length(tiny_model, prompt):
    gen = Generator(tiny_model)
    finite = list(gen.stream(prompt, height=SIZE, width=SIZE, steps=2, seed=4))
    with gen.open(prompt, height=SIZE, width=SIZE, steps=2, seed=4) as video:
        assert video.endless
        endless = [video.next_chunk() for _ in range(len(finite) + 2)]
    for a, b in zip(finite, endless):
        assert torch.equal(a.latents, b.latents) and a.first_frame == b.first_frame == b.position
    assert endless[len(finite)].first_frame == 8 and endless[len(finite)].position < 8


@pytest.mark.parametrize("max_frames", [8, 12])
def test_recompute_eviction_is_exact_over_three_trained_lengths(tiny_model, prompt, max_frames):
    """evict="recompute": after every chunk the cache is a from-scratch encode of the bounded layout, and the video
    equals the cache-free computation, for 3x the trained length."""
    cfg = tiny_model.config
    trained = sum(cfg.chunk_partition)
    gen = Generator(tiny_model)
    text = tiny_model.encode_text(prompt)
    chunks = []
    with gen.open(prompt, height=SIZE, width=SIZE, steps=2, seed=7, evict="recompute", max_frames=max_frames) as video:
        while sum(c.latents.shape[2] for c in chunks) < 3 * trained:
            chunks.append(video.next_chunk())
            assert chunks[-1].position + chunks[-1].latents.shape[2] <= max_frames
            if video.layout:
                assert_same_cache(video.cache, fresh_cache(tiny_model, video.layout, video.final, text))
    ref = slow_endless(tiny_model, prompt, 7, len(chunks), 2, max_frames)
    for k, (ours, theirs) in enumerate(zip(chunks, ref)):
        assert torch.allclose(ours.latents, theirs, atol=1e-4, rtol=1e-4), (k, (ours.latents - theirs).abs().max())


def test_memory_is_flat(tiny_model, prompt):
    """4x the trained length: one buffer allocation, constant entry count once the window is full."""
    trained = sum(tiny_model.config.chunk_partition)
    before = live_caches()
    with Generator(tiny_model).open(prompt, height=SIZE, width=SIZE, steps=1, seed=0, max_frames=12) as video:
        assert live_caches() == before + 1
        pointer, capacity = video.cache.keys.data_ptr(), video.cache.capacity
        entries, frames = [], 0
        while frames < 4 * trained:
            frames += video.next_chunk().latents.shape[2]
            entries.append((len(video.cache.entries), video.cache.length, len(video.final)))
            assert video.cache.keys.data_ptr() == pointer and video.cache.capacity == capacity
        assert len(set(entries[-6:])) == 1  # the window filled: entries, tokens and kept latents stop changing
        assert max(tokens for _, tokens, _ in entries) == capacity  # the largest context exactly
    assert live_caches() == before


def test_reindex_by_rotation_is_exact_for_a_uniform_shift(tiny_model, prompt):
    """Moving every entry by the same offset keeps relative positions, so rotating the cached keys must give
    exactly what encoding at the new positions gives, also when rotations are composed."""
    text = tiny_model.encode_text(prompt)
    torch.manual_seed(2)
    latents = {0: torch.randn(1, 16, 1, SIZE, SIZE), 1: torch.randn(1, 16, 2, SIZE, SIZE),
               2: torch.randn(1, 16, 2, SIZE, SIZE)}

    def layout(at):
        return [Entry(0, at, 1, True), Entry(1, at + 1, 2, True), Entry(2, at + 3, 2, False)]

    cache = fresh_cache(tiny_model, layout(9), latents, text)
    assert cache.reindex(layout(4)) == (0, 3)
    assert cache.reindex(layout(1)) == (0, 3)  # rotations compose: 9 -> 4 -> 1
    assert_same_cache(cache, fresh_cache(tiny_model, layout(1), latents, text))
    assert cache.refresh(layout(1), latents.__getitem__, text) == 0  # nothing left to recompute


def test_rotation_composes():
    torch.manual_seed(0)
    from streamgen import CausalWanTransformer, preset

    model = CausalWanTransformer(preset("tiny"))
    k = torch.randn(2, 5, 2, 32)
    a, b = k.clone(), k.clone()
    rotate_time(a, 3, model)
    rotate_time(a, -7, model)
    rotate_time(b, -4, model)
    assert torch.allclose(a, b, atol=1e-6)
    n = model.rope.dims[0]
    assert torch.equal(a[..., n:], k[..., n:])  # only the time part of the head dim turns


def test_keep_eviction_keeps_old_entries_and_recomputes_only_the_window(tiny_model, prompt):
    """evict="keep": constant cost per chunk (at most full_chunk_limit entries recomputed); kept compressed entries are
    the rotated old ones (computed under a context that still held the evicted chunk), so the video departs from the
    exact one only after the first eviction."""
    gen = Generator(tiny_model)
    fcl = tiny_model.config.full_chunk_limit
    kw = dict(height=SIZE, width=SIZE, steps=1, seed=3, max_frames=12)
    with gen.open(prompt, evict="keep", **kw) as keep, gen.open(prompt, evict="recompute", **kw) as exact:
        first_eviction = None
        for k in range(14):
            a, b = keep.next_chunk(), exact.next_chunk()
            assert a.recomputed <= fcl
            if first_eviction is None and k > 1 and exact.layout[1].chunk != 1:
                first_eviction = k
            if first_eviction is None:
                assert torch.allclose(a.latents, b.latents, atol=1e-5)
        assert first_eviction == 7
        assert b.recomputed == len(exact.layout) - 1 > fcl  # exact: everything after the anchor, every chunk
        assert (a.latents - b.latents).abs().max() > 1e-5  # beyond float noise: the approximation is visible
        n = keep.cache.tokens(keep.layout[0])  # the anchor never moves and is never stale
        assert torch.equal(keep.cache.keys[:, :, :n], exact.cache.keys[:, :, :n])


def test_prompt_switch_applies_from_the_next_chunk(tiny_model, prompt):
    """Without recache: entries cached before the switch stay as they were; what is computed after it (the chunk and
    the entries the refresh recomputes) is under the new prompt."""
    gen = Generator(tiny_model)
    other = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(8))
    kw = dict(height=SIZE, width=SIZE, steps=2, seed=5, max_frames=12)
    with gen.open(prompt, **kw) as video, gen.open(prompt, **kw) as recached:
        chunks = [video.next_chunk() for _ in range(6)]
        for _ in range(6):
            recached.next_chunk()
        before = [(e, video.cache.keys[:, :, :video.cache.length].clone()) for e in video.cache.entries]
        video.set_prompt(other)
        recached.set_prompt(other, recache=True)
        assert video.prompt_version == 1
        chunks.append(video.next_chunk())
        again = recached.next_chunk()
        # layout [anchor, C1, C2, C3, F4, F5]: anchor, C1 and C2 were cached before and stay; C3 on are recomputed
        assert chunks[-1].recomputed == 3 and again.recomputed == 6
        kept = sum(video.cache.tokens(e) for e in video.cache.entries[:3])
        assert torch.equal(video.cache.keys[:, :, :kept], before[0][1][:, :, :kept])
        assert not torch.allclose(video.cache.keys[:, :, :kept], recached.cache.keys[:, :, :kept], atol=1e-3)
    ref = slow_endless(tiny_model, prompt, 5, 7, 2, 12, prompts={6: other})
    for k in range(6):
        assert torch.allclose(chunks[k].latents, ref[k], atol=1e-4)
    assert torch.allclose(again.latents, ref[6], atol=1e-4)  # recache: exactly the whole context under the new prompt
    assert not torch.allclose(chunks[6].latents, ref[6], atol=1e-3)


def test_recache_reencodes_the_context_under_the_new_prompt(tiny_model, prompt):
    gen = Generator(tiny_model)
    other = torch.randn(1, 8, 32, generator=torch.Generator().manual_seed(8))
    text = tiny_model.encode_text(other)
    with gen.open(prompt, height=SIZE, width=SIZE, steps=2, seed=5, evict="recompute") as video:
        chunks = [video.next_chunk() for _ in range(3)]
        video.set_prompt(other, recache=True)
        chunks.append(video.next_chunk())
        assert chunks[-1].recomputed == 3  # the whole context
        assert_same_cache(video.cache, fresh_cache(tiny_model, video.layout, video.final, text))
        chunks += [video.next_chunk() for _ in range(7)]
    ref = slow_endless(tiny_model, prompt, 5, 11, 2, 8, prompts={3: other})
    for k, (ours, theirs) in enumerate(zip(chunks, ref)):
        assert torch.allclose(ours.latents, theirs, atol=1e-4), k


def test_steps_change_between_chunks(tiny_model, prompt):
    with Generator(tiny_model).open(prompt, height=SIZE, width=SIZE, steps=2, seed=0) as video:
        got = [video.next_chunk().steps]
        video.set_steps(4)
        got += [video.next_chunk().steps, video.next_chunk(steps=1).steps, video.next_chunk().steps]
        video.set_steps(Schedule([(1000.0, 500.0), (500.0, 0.0)]))
        got.append(video.next_chunk().steps)
    assert got == [2, 4, 1, 4, 2]


def test_finite_stream_ends_and_closing_frees_the_cache(tiny_model, prompt):
    before = live_caches()
    video = Generator(tiny_model).open(prompt, height=SIZE, width=SIZE, num_frames=5, steps=1, seed=0)
    assert [c.index for c in video] == [0, 1, 2]
    assert video.done and live_caches() == before + 1
    video.close()
    assert live_caches() == before
    with pytest.raises(RuntimeError, match="closed"):
        video.next_chunk()
    stream = Generator(tiny_model).stream(prompt, height=SIZE, width=SIZE, steps=1, seed=0)
    next(stream)
    assert live_caches() == before + 1
    stream.close()  # an abandoned Generator.stream frees its cache too
    assert live_caches() == before


@pytest.mark.parametrize("kwargs, message", [
    (dict(evict="lru"), "evict must be"),
    (dict(window=-1), "window"),
    (dict(max_frames=4), "cannot hold"),
])
def test_bad_endless_options(tiny_model, prompt, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Generator(tiny_model).open(prompt, height=SIZE, width=SIZE, **kwargs)
