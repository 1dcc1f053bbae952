import types

import numpy as np
import pytest
import torch

from streamgen.pipeline import Pipeline


@pytest.fixture(scope="module")
def pipe():
    return Pipeline.load(None, device="cpu")


def test_stream_frames_and_counts(pipe):
    chunks = list(pipe.stream("a red circle moving right", steps=2, seed=3))
    frames = np.concatenate([c.frames for c in chunks], axis=1)
    assert frames.dtype == np.uint8 and frames.shape == (1, 29, 64, 64, 3)
    assert [c.frames.shape[1] for c in chunks] == [1, 8, 8, 8, 4]  # first latent frame -> 1 frame, later ones -> 4
    assert [c.first_frame for c in chunks] == [0, 1, 9, 17, 25]
    again = pipe.generate("a red circle moving right", steps=2, seed=3)
    assert np.array_equal(frames, again)
    assert not np.array_equal(frames, pipe.generate("a blue square", steps=2, seed=3))


def test_streamed_frames_equal_whole_video_decode(pipe):
    embeds = pipe.prompt_embeds("a red circle")
    latents = pipe.generator.generate(embeds, height=8, width=8, num_frames=8, steps=1, seed=0)
    whole = pipe.vae.decode(latents, latents_per_chunk=None)
    streamed = pipe.generate(embeds, steps=1, seed=0)
    expected = ((whole.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 4, 1).numpy()
    assert np.abs(streamed.astype(int) - expected.astype(int)).max() <= 1


def test_context_lands_in_the_cache_unchanged(pipe):
    video = torch.rand(1, 3, 9, 64, 64) * 2 - 1
    chunks = list(pipe.stream("a red circle", steps=1, seed=0, context=video))
    encoded = pipe.vae.encode(video)
    assert chunks[0].latents.from_context and chunks[1].latents.from_context and not chunks[2].latents.from_context
    assert torch.equal(torch.cat([chunks[0].latents.latents, chunks[1].latents.latents], 2), encoded)


def test_bad_sizes(pipe):
    with pytest.raises(ValueError, match="multiples of 32"):
        next(pipe.stream("x", height=48, width=64))
    with pytest.raises(ValueError, match="1 \\+ 4k"):
        next(pipe.stream("x", num_frames=10))


def test_save_load_round_trip(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "model")
    loaded = Pipeline.load(tmp_path / "model", device="cpu")
    assert loaded.settings == pipe.settings
    a = pipe.generate("a red circle", steps=1, seed=0, num_frames=5)
    b = loaded.generate("a red circle", steps=1, seed=0, num_frames=5)
    assert np.abs(a.astype(int) - b.astype(int)).max() <= 1


def test_one_ahead_asks_for_the_next_chunk_before_handing_one_out():
    from streamgen.pipeline import _one_ahead

    asked = []

    def gen(n):
        for i in range(n):
            asked.append(i)
            yield types.SimpleNamespace(index=i)

    handed = []
    for chunk in _one_ahead(gen(4)):
        handed.append(chunk.index)
        if chunk.index == 0:
            assert asked == [0]  # the first chunk goes straight out: time to first frame
        else:
            assert asked[-1] == min(chunk.index + 1, 3)  # chunk k + 1 is already queued while chunk k is decoded
    assert handed == [0, 1, 2, 3]
    assert list(_one_ahead(gen(0))) == []


def test_top_level_load_streams_the_builtin_model():
    import streamgen

    pipe = streamgen.load(device="cpu")
    chunks = list(pipe.stream("a red circle moving right", steps=1, seed=0, num_frames=9))
    frames = np.concatenate([c.frames for c in chunks], axis=1)
    assert frames.shape == (1, 9, 64, 64, 3) and frames.dtype == np.uint8
    np.testing.assert_array_equal(frames, pipe.generate("a red circle moving right", steps=1, seed=0, num_frames=9))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the decode's own stream is a CUDA one")
def test_decode_waits_for_its_chunk_not_for_work_queued_after_it():
    cuda = Pipeline.load(None, device="cuda")
    embeds = cuda.prompt_embeds("a red circle")
    chunk = next(cuda.generator.stream(embeds, height=8, width=8, num_frames=8, steps=1, seed=0))
    cuda.decode_chunk(cuda.vae.stream_decoder(), chunk)  # the first decode autotunes its kernels (synchronizing)
    torch.cuda.synchronize()
    later = torch.cuda.Event()
    torch.cuda._sleep(2_000_000_000)  # the next chunk's work, queued on the generator's stream
    later.record()
    frames = cuda.decode_chunk(cuda.vae.stream_decoder(), chunk)
    assert not later.query(), "the decode waited for the generator's queued work"
    assert frames.shape == (1, 1, 64, 64, 3)
