"""Sinks: files and byte streams are decoded back with PyAV (the same libavformat ffprobe uses)."""

from __future__ import annotations

import io
import struct
import threading
import time
from fractions import Fraction

import av
import numpy as np
import pytest

from streamgen.sinks import (
    FragmentedMp4Sink,
    ImageFolderSink,
    Mp4Sink,
    NumpySink,
    Sink,
    ThreadedSink,
    open_sink,
)

H, W = 48, 64
CHUNKS = (4, 3, 5)  # frames per chunk: uneven on purpose


def gradient(count: int, start: int = 0, height: int = H, width: int = W) -> np.ndarray:
    """Smooth colour ramps drifting one step per frame: easy on the encoder, easy to compare."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    frames = []
    for t in range(start, start + count):
        r = 40 + 170 * x / (width - 1) + 2 * t
        g = 40 + 170 * y / (height - 1)
        b = 120 + 60 * np.sin((x + y) / 20 + t / 3)
        frames.append(np.stack([r, g, b], -1))
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


def write_chunks(sink: Sink, sizes=CHUNKS) -> np.ndarray:
    written, start = [], 0
    for n in sizes:
        chunk = gradient(n, start)
        sink.write(chunk)
        written.append(chunk)
        start += n
    return np.concatenate(written)


def decode(source) -> tuple[np.ndarray, av.video.stream.VideoStream, list[Fraction]]:
    with av.open(source) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        return np.stack([f.to_ndarray(format="rgb24") for f in frames]), stream, [f.pts * f.time_base for f in frames]


def mean_abs_error(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def boxes(data: bytes, start: int = 0, end: int | None = None) -> list[tuple[bytes, int, int]]:
    """(type, payload start, box end) of the boxes laid end to end in data[start:end]."""
    end = len(data) if end is None else end
    out = []
    while start < end:
        size, kind = struct.unpack_from(">I4s", data, start)
        out.append((kind, start + 8, start + size))
        start += size
    return out


# --- MP4 file -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fps", [16, Fraction(30000, 1001)])
def test_mp4_round_trip(tmp_path, fps):
    path = tmp_path / "out.mp4"
    with Mp4Sink(path, fps) as sink:
        expected = write_chunks(sink)
        assert not path.exists()  # only a temporary file until close
    frames, stream, times = decode(path)
    assert (stream.width, stream.height) == (W, H)
    assert stream.frames == len(expected) == len(frames) == sum(CHUNKS)
    assert stream.average_rate == fps
    assert times == [Fraction(i) / fps for i in range(len(frames))]
    assert mean_abs_error(frames, expected) < 4
    assert stream.codec_context.name == "h264"
    assert [p.name for p in tmp_path.iterdir()] == ["out.mp4"]


def test_mp4_bad_chunks_raise_and_leave_the_file_closable(tmp_path):
    path = tmp_path / "out.mp4"
    sink = Mp4Sink(path, 16)
    sink.write(gradient(2))
    bad = {
        "size": gradient(2, height=H + 2),
        "dtype": gradient(2).astype(np.float32),
        "single": gradient(1)[0],
        "channels": np.zeros((2, H, W, 4), np.uint8),
        "empty": np.zeros((0, H, W, 3), np.uint8),
    }
    with pytest.raises(ValueError, match=r"expected frames of shape \(F, 48, 64, 3\).*got shape \(2, 50, 64, 3\)"):
        sink.write(bad["size"])
    with pytest.raises(ValueError, match=r"dtype uint8.*got shape .* dtype float32"):
        sink.write(bad["dtype"])
    with pytest.raises(ValueError, match=r"got shape \(48, 64, 3\).*frames\[None\]"):
        sink.write(bad["single"])
    with pytest.raises(ValueError, match=r"got shape \(2, 48, 64, 4\)"):
        sink.write(bad["channels"])
    with pytest.raises(ValueError, match="empty chunk"):
        sink.write(bad["empty"])
    sink.write(gradient(3, 2))
    sink.close()
    frames, stream, _ = decode(path)
    assert len(frames) == stream.frames == 5


def test_mp4_odd_size_is_refused(tmp_path):
    with pytest.raises(ValueError, match="even width and height, got 63x48"):
        Mp4Sink(tmp_path / "out.mp4", 16).write(gradient(1, width=63))
    assert list(tmp_path.iterdir()) == []


def test_mp4_abort_and_exceptions_leave_no_file(tmp_path):
    sink = Mp4Sink(tmp_path / "a.mp4", 16)
    sink.write(gradient(60))  # more than the encoder's lookahead holds, so the muxer has created the file
    assert [p.name.startswith(".a.mp4.") and p.suffix == ".part" for p in tmp_path.iterdir()] == [True]
    sink.abort()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(RuntimeError, match="aborted"):
        sink.close()

    with pytest.raises(KeyError), Mp4Sink(tmp_path / "b.mp4", 16) as sink:
        sink.write(gradient(3))
        raise KeyError("decoder failed")
    assert list(tmp_path.iterdir()) == []

    with pytest.raises(ValueError, match="no frames"), Mp4Sink(tmp_path / "c.mp4", 16):
        pass
    assert list(tmp_path.iterdir()) == []


def test_mp4_rejects_missing_folder(tmp_path):
    with pytest.raises(FileNotFoundError):
        Mp4Sink(tmp_path / "nowhere" / "out.mp4", 16)


# --- fragmented MP4 -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fps", [16, Fraction(30000, 1001)])
def test_fragmented_mp4_streams_every_chunk_before_close(fps):
    pieces: list[bytes] = []
    sink = FragmentedMp4Sink(pieces.append, fps)
    assert sink.codec_string is None
    expected, start = [], 0
    for n in CHUNKS:
        chunk = gradient(n, start)
        sink.write(chunk)
        expected.append(chunk)
        start += n
        # Everything written so far is playable from the bytes received so far: nothing waits for the next chunk.
        frames, _, times = decode(io.BytesIO(b"".join(pieces)))
        assert len(frames) == start
        assert times == [Fraction(i) / fps for i in range(start)]
    received_before_close = len(pieces)
    sink.close()
    assert len(pieces) == received_before_close  # the encoder held nothing back

    data = b"".join(pieces)
    assert pieces[0] == sink.init_segment and pieces[0][4:8] == b"ftyp"
    kinds = [kind for kind, _, _ in boxes(data)]
    assert kinds[:2] == [b"ftyp", b"moov"] and kinds[2:] == [b"moof", b"mdat"] * len(CHUNKS)
    assert [len(boxes(p)) for p in pieces] == [2] + [2] * len(CHUNKS)  # init segment, then one fragment per chunk

    frames, stream, _ = decode(io.BytesIO(data))
    assert len(frames) == sum(CHUNKS) and (stream.width, stream.height) == (W, H) and stream.average_rate == fps
    assert mean_abs_error(frames, np.concatenate(expected)) < 6
    assert sink.codec_string.startswith("avc1.64") and len(sink.codec_string) == len("avc1.64001f")
    assert sink.mime_type == f'video/mp4; codecs="{sink.codec_string}"'


def test_fragments_are_self_consistent():
    """What a strict MSE parser checks: contiguous decode times, offsets into the mdat, a sync sample first."""
    pieces: list[bytes] = []
    with FragmentedMp4Sink(pieces.append, 16) as sink:
        write_chunks(sink)
    next_time, sequence = 0, 0
    for fragment in pieces[1:]:
        (moof_kind, moof, moof_end), (mdat_kind, mdat, mdat_end) = boxes(fragment)
        assert (moof_kind, mdat_kind) == (b"moof", b"mdat")
        inner = dict((kind, (a, b)) for kind, a, b in boxes(fragment, moof, moof_end))
        (seq,) = struct.unpack_from(">I", fragment, inner[b"mfhd"][0] + 4)
        traf = {kind: a for kind, a, _ in boxes(fragment, *inner[b"traf"])}
        (base_time,) = struct.unpack_from(">Q", fragment, traf[b"tfdt"] + 4)
        count, offset = struct.unpack_from(">Ii", fragment, traf[b"trun"] + 4)
        samples = [struct.unpack_from(">III", fragment, traf[b"trun"] + 12 + 12 * i) for i in range(count)]
        assert seq == sequence + 1 and base_time == next_time
        assert offset == mdat and sum(size for _, size, _ in samples) == mdat_end - mdat
        assert samples[0][2] == 0x02000000 and all(flags == 0x01010000 for _, _, flags in samples[1:])
        sequence, next_time = seq, base_time + sum(duration for duration, _, _ in samples)
    assert next_time == sum(CHUNKS) * 16384 // 16  # the muxer's timescale for 16 fps is 16384


def test_fragmented_mp4_abort_and_bad_chunks():
    pieces: list[bytes] = []
    sink = FragmentedMp4Sink(pieces.append, 16)
    with pytest.raises(ValueError, match="even width and height"):
        sink.write(gradient(2, height=47))
    assert pieces == []
    sink.write(gradient(2))
    sink.abort()
    with pytest.raises(RuntimeError, match="aborted"):
        sink.write(gradient(2))


# --- images and numpy ---------------------------------------------------------------------------------------------


def test_png_folder_round_trip_is_exact(tmp_path):
    folder = tmp_path / "frames"
    with ImageFolderSink(folder) as sink:
        expected = write_chunks(sink, (2, 3))
    names = sorted(p.name for p in folder.iterdir())
    assert names == [f"frame_{i:06d}.png" for i in range(5)]
    for i, name in enumerate(names):
        image, _, _ = decode(folder / name)
        np.testing.assert_array_equal(image[0], expected[i])


def test_jpeg_folder_round_trip_and_quality(tmp_path):
    sizes = {}
    for quality in (95, 30):
        sink = open_sink(tmp_path / f"q{quality}" / "img_%03d.jpg", 16, quality=quality)
        assert isinstance(sink, ImageFolderSink) and sink.format == "jpeg"
        with sink:
            expected = write_chunks(sink, (2, 1))
        paths = sorted((tmp_path / f"q{quality}").iterdir())
        assert [p.name for p in paths] == ["img_000.jpg", "img_001.jpg", "img_002.jpg"]
        image, _, _ = decode(paths[2])
        assert mean_abs_error(image[0], expected[2]) < (4 if quality == 95 else 8)
        sizes[quality] = paths[2].stat().st_size
    assert sizes[95] > sizes[30]


def test_image_folder_rejects_bad_settings(tmp_path):
    with pytest.raises(ValueError, match="quality"):
        ImageFolderSink(tmp_path, format="png", quality=80)
    with pytest.raises(ValueError, match="pattern"):
        ImageFolderSink(tmp_path, name="frame")


def test_numpy_sink_round_trip(tmp_path):
    path = tmp_path / "frames.npy"
    sink = NumpySink(path)
    buffer = gradient(3)
    sink.write(buffer)
    buffer[:] = 0  # the producer reuses its buffer; the sink kept a copy
    sink.write(gradient(2, 3))
    assert not path.exists()
    sink.close()
    np.testing.assert_array_equal(sink.frames, gradient(5))
    np.testing.assert_array_equal(np.load(path), gradient(5))
    assert [p.name for p in tmp_path.iterdir()] == ["frames.npy"]

    aborted = NumpySink(tmp_path / "aborted.npy")
    with pytest.raises(KeyError), aborted:
        aborted.write(gradient(1))
        raise KeyError("decoder failed")
    assert [p.name for p in tmp_path.iterdir()] == ["frames.npy"]
    assert NumpySink().frames.shape == (0, 0, 0, 3)


def test_open_sink_picks_by_path(tmp_path):
    assert type(open_sink(tmp_path / "a.mp4", 16)) is Mp4Sink
    assert type(open_sink(tmp_path / "a.npy", 16)) is NumpySink
    assert type(open_sink(tmp_path, 16)) is ImageFolderSink
    folder = open_sink(tmp_path / "frames", 16)
    assert isinstance(folder, ImageFolderSink) and folder.path_of(7) == tmp_path / "frames" / "frame_000007.png"
    pattern = open_sink(tmp_path / "img_%04d.png", 16)
    assert isinstance(pattern, ImageFolderSink) and pattern.path_of(7) == tmp_path / "img_0007.png"
    jpeg = open_sink(tmp_path / "img_%04d.jpeg", 16)
    assert isinstance(jpeg, ImageFolderSink) and jpeg.format == "jpeg" and jpeg.path_of(7).name == "img_0007.jpeg"
    with pytest.raises(ValueError, match=r"suffix '\.avi'"):
        open_sink(tmp_path / "a.avi", 16)
    assert list(tmp_path.iterdir()) == []  # no sink creates anything before its first chunk


# --- threaded -----------------------------------------------------------------------------------------------------


class GatedSink(NumpySink):
    """A slow sink: each write announces itself, then waits until the test opens the gate."""

    def __init__(self, fail_on: int | None = None) -> None:
        super().__init__()
        self.started = threading.Semaphore(0)
        self.gate = threading.Event()
        self.fail_on = fail_on
        self.calls = 0

    def _write(self, frames: np.ndarray) -> None:
        self.calls += 1
        self.started.release()
        if self.calls == self.fail_on:
            raise OSError("disk full")
        self.gate.wait(10)
        super()._write(frames)


def test_threaded_output_matches_the_inner_sink(tmp_path):
    with Mp4Sink(tmp_path / "direct.mp4", 16) as sink:
        write_chunks(sink)
    with ThreadedSink(Mp4Sink(tmp_path / "threaded.mp4", 16), max_chunks=2) as sink:
        write_chunks(sink)
    # x264's own threads make its output differ slightly run to run (seen here, 1 run in 6): compare pictures.
    threaded, _, threaded_times = decode(tmp_path / "threaded.mp4")
    direct, _, direct_times = decode(tmp_path / "direct.mp4")
    assert threaded_times == direct_times
    assert mean_abs_error(threaded, direct) < 1.0

    inner = NumpySink()
    with ThreadedSink(inner) as sink:
        expected = write_chunks(sink)
    np.testing.assert_array_equal(inner.frames, expected)


def test_threaded_queue_is_bounded():
    inner = GatedSink()
    sink = ThreadedSink(inner, max_chunks=2)
    accepted = []

    def produce():
        for i in range(6):
            sink.write(gradient(1, i))
            accepted.append(i)

    producer = threading.Thread(target=produce)
    producer.start()
    assert inner.started.acquire(timeout=5)  # chunk 0 is being written, and stays so until the gate opens
    deadline = time.monotonic() + 5
    while len(accepted) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    time.sleep(0.2)
    # one chunk in the inner sink + max_chunks queued; the fourth write blocks instead of queueing more
    assert len(accepted) == 3 and producer.is_alive()
    inner.gate.set()
    producer.join(5)
    sink.close()
    assert accepted == list(range(6)) and inner.calls == 6
    np.testing.assert_array_equal(inner.frames, gradient(6))


def test_threaded_writer_error_reaches_the_producer():
    inner = GatedSink(fail_on=2)
    inner.gate.set()
    sink = ThreadedSink(inner)
    sink.write(gradient(1))
    sink.write(gradient(1, 1))  # fails in the writer thread
    for _ in range(2):
        assert inner.started.acquire(timeout=5)
    deadline = time.monotonic() + 5
    while sink._error is None and time.monotonic() < deadline:
        time.sleep(0.01)
    with pytest.raises(OSError, match="disk full"):
        sink.write(gradient(1, 2))
    with pytest.raises(OSError, match="disk full"):
        sink.close()
    assert inner._state == "aborted"

    # Without a later write, close() reports the failure.
    inner = GatedSink(fail_on=1)
    with pytest.raises(OSError, match="disk full"), ThreadedSink(inner) as sink:
        sink.write(gradient(1))
    assert inner._state == "aborted"


def test_threaded_abort_drops_queued_chunks(tmp_path):
    inner = GatedSink()
    sink = ThreadedSink(inner, max_chunks=4)
    for i in range(4):
        sink.write(gradient(1, i))
    assert inner.started.acquire(timeout=5)  # chunk 0 in the inner sink, three queued
    threading.Timer(0.1, inner.gate.set).start()
    sink.abort()  # drops the queue, waits for chunk 0, aborts the inner sink
    assert inner.calls == 1 and inner._state == "aborted"

    threaded = ThreadedSink(Mp4Sink(tmp_path / "out.mp4", 16))
    with pytest.raises(ValueError, match="even width and height"):  # checked in the producer, at once
        threaded.write(gradient(1, height=47))
    threaded.write(gradient(2))
    threaded.abort()
    assert list(tmp_path.iterdir()) == []
