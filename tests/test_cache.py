import pytest
import torch

from streamgen.cache import KVCache, context_layout
from streamgen.engine import chunk_sizes
from streamgen.model import Past, Run


def test_context_layout_follows_far():
    sizes = [1, 3, 3, 3, 3]
    layout = context_layout(sizes, 4, full_chunk_limit=3)
    assert [(e.chunk, e.first_frame, e.frames, e.compressed) for e in layout] == [
        (0, 0, 1, True), (1, 1, 3, True), (2, 4, 3, False), (3, 7, 3, False)]
    assert context_layout(sizes, 0, 3) == []
    assert all(not e.compressed for e in context_layout(sizes, 2, 3))


@pytest.mark.parametrize("full_chunk_limit", [2, 3])
def test_incremental_refresh_equals_full_prefix_recompute(tiny_model, prompt, full_chunk_limit):
    """After every chunk, the incrementally refreshed cache holds exactly what re-encoding the whole prefix gives."""
    sizes = chunk_sizes(tiny_model.config.chunk_partition, 9)  # [1, 2, 2, 2, 2]
    torch.manual_seed(3)
    finals = {i: torch.randn(1, 16, n, 16, 16) for i, n in enumerate(sizes)}
    text = tiny_model.encode_text(prompt)
    layouts = [context_layout(sizes, k, full_chunk_limit) for k in range(1, len(sizes) + 1)]
    cache = KVCache.for_layouts(tiny_model, 1, 16, 16, layouts)
    for k, layout in enumerate(layouts, start=1):
        recomputed = cache.refresh(layout, finals.__getitem__, text)
        # only the newest chunk until one turns compressed; then that one and the full window after it
        assert recomputed == (1 if k < full_chunk_limit else full_chunk_limit)
        fresh = KVCache.for_layouts(tiny_model, 1, 16, 16, [layout])
        assert fresh.refresh(layout, finals.__getitem__, text) == k
        assert cache.length == fresh.length and cache.entries == fresh.entries
        for layer in range(tiny_model.config.num_layers):
            for ours, ref in ((cache.keys, fresh.keys), (cache.values, fresh.values)):
                a, b = ours[layer, :, : cache.length], ref[layer, :, : fresh.length]
                assert torch.allclose(a, b, atol=1e-5, rtol=1e-5), f"chunk {k} layer {layer}"


def test_compressed_entries_are_smaller_and_refresh_is_idempotent(tiny_model, prompt):
    sizes = [1, 2, 2, 2]
    finals = {i: torch.randn(1, 16, n, 16, 16) for i, n in enumerate(sizes)}
    text = tiny_model.encode_text(prompt)
    layout = context_layout(sizes, 4, 3)
    cache = KVCache.for_layouts(tiny_model, 1, 16, 16, [layout])
    cache.refresh(layout, finals.__getitem__, text)
    # 16x16 latent: 64 tokens per full frame, 16 per compressed frame
    assert cache.length == (1 + 2) * 16 + (2 + 2) * 64
    before = cache.keys.clone()
    assert cache.refresh(layout, finals.__getitem__, text) == 0
    assert torch.equal(before, cache.keys)
    assert cache.capacity == cache.length and cache.past().length == cache.length


def test_overflow_is_an_error(tiny_model, prompt):
    sizes = [1, 2, 2]
    finals = {i: torch.randn(1, 16, n, 16, 16) for i, n in enumerate(sizes)}
    cache = KVCache.for_layouts(tiny_model, 1, 16, 16, [context_layout(sizes, 1, 3)])
    with pytest.raises(RuntimeError, match="too few"):
        cache.refresh(context_layout(sizes, 3, 3), finals.__getitem__, tiny_model.encode_text(prompt))


def test_buffers_are_reused_by_the_next_stream_of_the_same_size(tiny_model, prompt):
    """A finished stream hands its KV buffers to the next one (so CUDA graphs captured on them replay)."""
    from streamgen.engine import Generator

    gen = Generator(tiny_model)
    first = gen.generate(prompt, height=16, width=16, steps=2, seed=3)
    assert gen.buffers.idle() == 2
    with gen.open(prompt, height=16, width=16, num_frames=gen.default_frames, steps=2, seed=3) as video:
        assert gen.buffers.idle() == 0
        reused = [video.cache.keys.data_ptr(), video.cache.values.data_ptr()]
        again = torch.cat([c.latents for c in video], dim=2)
    assert gen.buffers.idle() == 2
    with gen.open(prompt, height=16, width=16, num_frames=gen.default_frames) as video:  # same roles again
        assert [video.cache.keys.data_ptr(), video.cache.values.data_ptr()] == reused
    torch.testing.assert_close(again, first, rtol=0, atol=0)  # stale buffer contents never leak into a result
    with gen.open(prompt, height=32, width=16, num_frames=gen.default_frames) as other:  # another size: new buffers
        assert other.cache.keys.data_ptr() not in reused
    gen.buffers.clear()
    assert gen.buffers.idle() == 0


def test_storing_into_the_cache_refuses_autograd(tiny_model, prompt):
    """The refresh writes keys and values into reused buffers, which autograd cannot follow: a forward that stores
    with gradients on is an error, not silently wrong gradients (training's rollout refreshes without them)."""
    sizes = [1, 2]
    cache = KVCache.for_layouts(tiny_model, 1, 16, 16, [context_layout(sizes, 2, 3)])
    zero = torch.zeros(1)
    with pytest.raises(RuntimeError, match="without autograd"):
        tiny_model([Run(torch.randn(1, 16, 1, 16, 16), zero, zero, 0)], tiny_model.encode_text(prompt),
                   past=Past(cache.keys, cache.values, 0, store=True))
