"""`Session`: the network-free front of a live video (tiny built-in model, 32x32 pixels)."""

import asyncio
import gc
import threading

import numpy as np
import pytest

from streamgen.cache import live_caches
from streamgen.pipeline import Pipeline
from streamgen.session import DeadlineController, Session, next_chunks

SMALL = dict(height=32, width=32)


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.load(None)


def test_sync_iterator_equals_the_pipeline_and_frees_the_cache(pipe):
    gc.collect()
    base = live_caches()
    with Session(pipe, "a red circle", steps=2, seed=3, frames=13, **SMALL) as session:
        assert live_caches() == base  # nothing allocated before the first chunk
        chunks = list(session)
        assert session.done and live_caches() == base  # a complete video frees its cache by itself
    assert [c.index for c in chunks] == [0, 1, 2] and [c.first_frame for c in chunks] == [0, 1, 9]
    assert all(c.steps == 2 and c.prompt_version == 0 and not c.by_deadline for c in chunks)
    video = np.concatenate([c.frames for c in chunks])
    expected = pipe.generate("a red circle", num_frames=13, steps=2, seed=3, **SMALL)[0]
    np.testing.assert_array_equal(video, expected)  # the same frames as the one-shot pipeline
    assert session.next_chunk() is None


def test_async_iterator_gives_the_same_frames(pipe):
    async def collect():
        with Session(pipe, "a red circle", steps=2, seed=3, frames=13, **SMALL) as session:
            return [frame async for frame in session.aframes()]

    sync = list(Session(pipe, "a red circle", steps=2, seed=3, frames=13, **SMALL).frames())
    frames = asyncio.run(collect())
    assert len(frames) == 13 and frames[0].shape == (32, 32, 3)
    np.testing.assert_array_equal(np.stack(frames), np.stack(sync))


def endless(pipe, n, changes=None):
    """The first n chunks of an endless video; `changes[k](session)` runs after chunk k was received."""
    gc.collect()
    base = live_caches()
    session = Session(pipe, "a red circle", steps=2, seed=5, **SMALL)
    chunks = []
    for chunk in session:
        chunks.append(chunk)
        assert live_caches() == base + 1
        if changes and chunk.index in changes:
            changes[chunk.index](session)
        if len(chunks) == n:
            break
    session.close()
    assert live_caches() == base and session.closed and session.next_chunk() is None
    return chunks


def test_prompt_switch_applies_from_the_next_chunk(pipe):
    plain = endless(pipe, 5)
    versions = []
    switched = endless(pipe, 5, {1: lambda s: versions.append(s.prompt("a blue square"))})
    recached = endless(pipe, 5, {1: lambda s: s.prompt("a blue square", recache=True)})
    assert versions == [1] and [c.prompt_version for c in switched] == [0, 0, 1, 1, 1]
    for k in (0, 1):  # before the switch: untouched
        np.testing.assert_array_equal(switched[k].frames, plain[k].frames)
        np.testing.assert_array_equal(recached[k].frames, plain[k].frames)
    assert not np.array_equal(switched[2].frames, plain[2].frames)
    assert not np.array_equal(recached[2].frames, switched[2].frames)  # the re-encoded context differs
    assert switched[2].switch_s > 0 and plain[2].switch_s == 0
    assert switched[1].position == plain[1].position


def test_steps_change_from_the_next_chunk(pipe):
    chunks = endless(pipe, 4, {1: lambda s: s.steps(1)})
    assert [c.steps for c in chunks] == [2, 2, 1, 1]


def test_control_from_another_thread(pipe):
    session = Session(pipe, "a red circle", steps=2, seed=5, **SMALL)
    got = [session.next_chunk()]
    thread = threading.Thread(target=lambda: (session.prompt("a blue square"), session.steps(3)))
    thread.start()
    thread.join()
    got.append(session.next_chunk())
    closer = threading.Thread(target=session.close)
    closer.start()
    closer.join()
    assert (got[1].prompt_version, got[1].steps) == (1, 3) and session.next_chunk() is None


def test_deadline_controller_picks_the_largest_budget_that_keeps_up():
    controller = DeadlineController(fps=8, max_steps=8, smoothing=1.0)
    assert controller.choose(2, 8) == 1  # nothing measured yet: start cheap
    controller.observe(latent_frames=2, steps=2, denoise_s=0.25, other_s=0.25)  # 1/16 s per step and frame, 1/8 s
    # 8 frames at 8 fps play for 1 s = 1/2 s per latent frame: 1/8 + n/16 <= 1/2 -> n = 6
    assert controller.choose(2, 8) == 6
    assert controller.choose(2, 4) == 2  # 1/4 s per latent frame
    controller.share = 0.5  # two streams take turns: half the time each
    assert controller.choose(2, 8) == 2
    controller.share, controller.max_steps = 1.0, 4
    assert controller.choose(2, 8) == 4
    controller.add_overhead(2, 10.0)  # far too slow anyway: never below one step
    assert controller.choose(2, 8) == 1


def test_session_deadline_mode(pipe):
    chunks = endless(pipe, 4, {0: lambda s: s.deadline(1e-3), 2: lambda s: s.deadline(None)})
    # at 0.001 fps every chunk has ages to spare: after the first measured chunk the largest budget, 2
    assert [(c.by_deadline, c.steps) for c in chunks] == [(False, 2), (True, 1), (True, 2), (False, 2)]
    fast = endless(pipe, 3, {0: lambda s: s.deadline(1e6)})
    assert [c.steps for c in fast] == [2, 1, 1]  # an impossible rate: the cheapest budget


@pytest.mark.parametrize("kwargs, message", [
    (dict(steps=0), "integer >= 1"),
    (dict(steps=True), "integer >= 1"),
    (dict(height=33), "multiples of 32"),
    (dict(width=0), "multiples of 32"),
    (dict(frames=10), "1 \\+ 4k"),
    (dict(deadline_fps=0), "fps must be positive"),
    (dict(evict="drop"), "evict"),
    (dict(window=-1), "window"),
])
def test_bad_arguments_raise_value_error(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Session(pipe, "x", **kwargs)


def test_bad_control_values_raise_value_error(pipe):
    session = Session(pipe, "x", **SMALL)
    with pytest.raises(ValueError, match="integer >= 1"):
        session.steps(0)
    with pytest.raises(ValueError, match="positive"):
        session.deadline(-1)
    with pytest.raises(ValueError, match="text or prompt embeddings"):
        session.prompt(3)
    assert session.prompt_version == 0


def test_next_chunks_of_sessions_equal_their_chunks_one_by_one(pipe):
    def sessions():
        return [Session(pipe, prompt, steps=2, seed=seed, **SMALL) for prompt, seed in
                [("a red circle", 1), ("a blue square", 2), ("a green triangle", 3)]]

    alone = [[s.next_chunk() for _ in range(5)] for s in sessions()]
    together = sessions()
    together[2].steps(3)  # from its first chunk on: not batched with the others
    rounds = [next_chunks(together) for _ in range(5)]
    for k, made in enumerate(rounds):
        assert [c.batch for c in made] == [2, 2, 1]
        for i in (0, 1):
            assert made[i].index == k and made[i].first_frame == alone[i][k].first_frame
            diff = np.abs(made[i].frames.astype(int) - alone[i][k].frames.astype(int))
            assert diff.max() <= 1  # the same frames up to rounding of the shared forward
    with pytest.raises(ValueError, match="listed twice"):
        next_chunks([together[0], together[0]])
    together[1].close()
    made = next_chunks(together)
    assert made[1] is None and made[0].batch == 1 and made[2].batch == 1
    for s in together:
        s.close()
