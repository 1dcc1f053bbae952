"""Frame sinks: where decoded video goes, chunk by chunk.

The engine hands a sink uint8 RGB frames of shape (F, H, W, 3), a few at a time, as soon as each chunk is decoded.
Every sink has the same three methods:

- `write(frames)` takes one chunk. The first chunk fixes the frame size; a later chunk of another size, or anything
  that is not (F, H, W, 3) uint8 with F >= 1, raises ValueError naming what was expected and what came, and leaves
  the sink as it was (still writable, still closable). Any other exception from `write` (an encoder or disk
  error) leaves the sink in an unknown state: abort it.
- `close()` finalises: the file appears under its final name only now, whole.
- `abort()` gives up after an error: a file sink removes its temporary file, so a half-written video never sits
  under the final name.

Used as a context manager a sink closes on a normal exit and aborts when the block raises. `close()` and `abort()`
may be called more than once; `abort()` after `close()` does nothing (the file is finished), `close()` after
`abort()` raises RuntimeError (nothing was finalised).

Sinks: `Mp4Sink` (H.264 file), `FragmentedMp4Sink` (fragmented MP4 bytes for a live viewer), `ImageFolderSink`
(one PNG/JPEG per frame), `NumpySink` (in memory, optional `.npy`), `ThreadedSink` (any of these, on a background
thread), and `open_sink(path, fps)` to pick one from a path. `ImageEncoder` gives single PNG/JPEG images as bytes.

Colour: H.264 output is BT.709, limited range, and tagged so (VUI and the MP4 `colr` box), so browsers and players
do not have to guess the matrix. JPEGs are BT.601 full range, as JFIF prescribes.
"""

from __future__ import annotations

import os
import queue
import struct
import threading
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Literal, TypeVar

import av
import numpy as np
from av.video.reformatter import ColorPrimaries, ColorRange, Colorspace, ColorTrc

_S = TypeVar("_S", bound="Sink")


class Sink(ABC):
    """Base of all sinks: checks chunks, tracks the lifecycle, and gives context-manager behaviour.

    Subclasses implement `_write` (gets a checked (F, H, W, 3) uint8 array), `_close` and `_abort`; `_abort` must
    not raise. A sink whose encoder needs an even width and height sets `needs_even_size`.
    """

    needs_even_size = False

    def __init__(self) -> None:
        self.frame_size: tuple[int, int] | None = None  # (H, W), fixed by the first chunk
        self.frames_written = 0
        self._state: Literal["open", "closed", "aborted"] = "open"

    def write(self, frames: np.ndarray) -> None:
        if self._state != "open":
            raise RuntimeError(f"{type(self).__name__} is {self._state}; it takes no more frames")
        frames = _check_chunk(frames, self.frame_size, self.needs_even_size)
        self._write(frames)
        self.frame_size = frames.shape[1:3]
        self.frames_written += len(frames)

    def close(self) -> None:
        if self._state == "closed":
            return
        if self._state == "aborted":
            raise RuntimeError(f"{type(self).__name__} was aborted; there is nothing to close")
        try:
            self._close()
        except BaseException:
            self._state = "aborted"
            self._abort()
            raise
        self._state = "closed"

    def abort(self) -> None:
        if self._state != "open":
            return
        self._state = "aborted"
        self._abort()

    def __enter__(self: _S) -> _S:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()
        elif self._state == "open":
            self.close()

    @abstractmethod
    def _write(self, frames: np.ndarray) -> None: ...

    @abstractmethod
    def _close(self) -> None: ...

    @abstractmethod
    def _abort(self) -> None: ...


class Mp4Sink(Sink):
    """An MP4 file: H.264 (libx264) yuv420p by default, constant frame rate `fps`.

    The video is written to a hidden temporary file beside `path` (`.name.<random>.part`) and renamed onto `path`
    by `close()`, so `path` only ever holds a finished file; `abort()` deletes the temporary file. A write that
    fails (a full disk: OSError ENOSPC) aborts: no file under `path`, no temporary file left, the error raised (a
    failing `close()` likewise). The `moov` index is moved to the front (`movflags=faststart`) so a browser can start
    playing before the download ends.

    yuv420p needs an even width and height; an odd one raises ValueError on the first chunk (crop or pad before
    writing; this sink does not change the picture). `codec` may name another encoder that takes `crf` (libx265,
    libsvtav1; `preset=None` keeps the encoder's default preset); only libx264 is tested. `crf` 18 is close to
    visually lossless; raise it for smaller files. `close()` with no frames written raises ValueError and leaves
    no file.
    """

    def __init__(
        self,
        path: str | os.PathLike,
        fps: float | Fraction,
        codec: str = "libx264",
        crf: int = 18,
        preset: str | None = "medium",
    ) -> None:
        super().__init__()
        self.needs_even_size = True
        self.path = Path(path)
        self.fps = _as_rate(fps)
        self.codec = codec
        self._options = {"crf": str(crf)} | ({"preset": preset} if preset else {})
        if not self.path.parent.is_dir():
            raise FileNotFoundError(f"folder {self.path.parent} does not exist")
        self._tmp: Path | None = None
        self._container = None
        self._stream = None

    def _write(self, frames: np.ndarray) -> None:
        if self._container is None:
            self._tmp = _temp_path(self.path)
            self._container = av.open(str(self._tmp), "w", format="mp4", container_options={"movflags": "faststart"})
            self._stream = _add_h264_stream(self._container, self.codec, self.fps, frames.shape[1:3], self._options)
        try:
            for i, frame in enumerate(frames):
                self._container.mux(self._stream.encode(_yuv_frame(frame, self.frames_written + i)))
        except OSError:  # a full disk: the partial video is thrown away at once, not left behind
            self.abort()
            raise

    def _close(self) -> None:
        if self._container is None:
            raise ValueError(f"{self.path}: no frames were written, so there is no video to finalise")
        self._container.mux(self._stream.encode(None))
        self._container.close()
        os.replace(self._tmp, self.path)

    def _abort(self) -> None:
        if self._container is not None:
            try:
                self._container.close()
            except Exception:  # the file is being thrown away; a failing trailer does not matter
                pass
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)


class FragmentedMp4Sink(Sink):
    """Fragmented MP4 for a live viewer (browser Media Source Extensions, a websocket): bytes, not a file.

    `on_bytes` gets the init segment (`ftyp` + `moov`) with the first chunk, then one `moof` + `mdat` fragment per
    chunk, as soon as that chunk is encoded. Concatenated, the pieces are a valid MP4 in the layout of FFmpeg's
    `movflags=frag_keyframe+empty_moov+default_base_moof`.

    Why fragments are written here and not by FFmpeg's muxer: the mp4 muxer cuts a fragment only when the packet
    after it arrives (or on `av_write_frame(ctx, NULL)`, which PyAV does not expose), so chunk k would leave the
    process only once chunk k+1 had been generated. Instead the muxer writes the init segment, and this class
    writes each chunk's `moof` (`mfhd`, `traf` with `tfhd` default-base-is-moof, `tfdt`, `trun`) and `mdat`.

    Encoding: libx264 with `tune=zerolatency` (no B-frames, no lookahead: every frame's packet is out when the
    frame is in) and an IDR frame at the start of every chunk, so each fragment decodes on its own: a viewer
    joining late needs only `init_segment` and the fragments from any point on. The price is one keyframe per
    chunk. `codec_string` (e.g. 'avc1.64001f') and `mime_type` are known after the first chunk, for
    `MediaSource.isTypeSupported` / `addSourceBuffer`. Width and height must be even, as for `Mp4Sink`.

    An exception from `on_bytes` propagates out of `write`/`close`; abort the sink then.
    """

    _movflags = "frag_keyframe+empty_moov+default_base_moof"

    def __init__(
        self,
        on_bytes: Callable[[bytes], None],
        fps: float | Fraction,
        crf: int = 23,
        preset: str = "veryfast",
    ) -> None:
        super().__init__()
        self.needs_even_size = True
        self.on_bytes = on_bytes
        self.fps = _as_rate(fps)
        self._options = {"crf": str(crf), "preset": preset, "tune": "zerolatency", "forced-idr": "1"}
        self.init_segment: bytes | None = None
        self._container = None
        self._stream = None
        self._sequence = 0  # mfhd sequence number of the last fragment

    @property
    def codec_string(self) -> str | None:
        """RFC 6381 codec string, 'avc1.PPCCLL' from the `avcC` box; None before the first chunk."""
        if self.init_segment is None:
            return None
        at = self.init_segment.find(b"avcC")
        profile, compatibility, level = self.init_segment[at + 5 : at + 8]
        return f"avc1.{profile:02x}{compatibility:02x}{level:02x}"

    @property
    def mime_type(self) -> str | None:
        return None if self.init_segment is None else f'video/mp4; codecs="{self.codec_string}"'

    def _write(self, frames: np.ndarray) -> None:
        if self._container is None:
            self._start(frames.shape[1:3])
        packets = []
        for i, frame in enumerate(frames):
            packets += self._stream.encode(_yuv_frame(frame, self.frames_written + i, keyframe=i == 0))
        self._emit_fragment(packets)

    def _close(self) -> None:
        if self._container is None:
            raise ValueError("no frames were written, so there is no video to finalise")
        self._emit_fragment(self._stream.encode(None))
        self._container.close()  # writes an `mfra` index nobody needs; the writer drops it

    def _abort(self) -> None:
        if self._container is not None:
            try:
                self._container.close()
            except Exception:
                pass

    def _start(self, size: tuple[int, int]) -> None:
        out = _Collect()
        self._container = av.open(out, "w", format="mp4", container_options={"movflags": self._movflags})
        self._stream = _add_h264_stream(self._container, "libx264", self.fps, size, self._options)
        self._container.start_encoding()  # opens the encoder and writes ftyp + empty moov
        self.init_segment = b"".join(out.pieces)
        out.pieces = None  # later muxer output (the trailer) is dropped
        # Fragments are timed in the track's timescale, which the muxer chose (e.g. 16384 for 16 fps).
        if self._stream.time_base.numerator != 1:
            raise RuntimeError(f"unexpected mp4 track time base {self._stream.time_base}")
        self._timescale = self._stream.time_base.denominator
        self.on_bytes(self.init_segment)

    def _frame_index(self, seconds: Fraction) -> int:
        index = seconds * self.fps
        if index.denominator != 1:
            raise RuntimeError(f"packet time {seconds} s is not on a frame boundary at {self.fps} fps")
        return int(index)

    def _ticks(self, frame_index: int) -> int:
        ticks = frame_index * self._timescale / self.fps
        if ticks.denominator != 1:
            raise RuntimeError(f"frame {frame_index} at {self.fps} fps falls between ticks of 1/{self._timescale}")
        return int(ticks)

    def _emit_fragment(self, packets: list) -> None:
        if not packets:
            return
        samples, payload = [], []
        for packet in packets:
            if packet.pts != packet.dts:
                raise RuntimeError("reordered frames (B-frames) are not expected with tune=zerolatency")
            data = _annexb_to_length_prefixed(bytes(packet))
            n = self._frame_index(packet.pts * packet.time_base)
            flags = _SYNC_SAMPLE if packet.is_keyframe else _NON_SYNC_SAMPLE
            samples.append((self._ticks(n + 1) - self._ticks(n), len(data), flags))
            payload.append(data)
        self._sequence += 1
        mdat = _box(b"mdat", *payload)
        start = self._ticks(self._frame_index(packets[0].dts * packets[0].time_base))
        moof = _moof(self._sequence, start, samples, data_offset=0)
        moof = _moof(self._sequence, start, samples, data_offset=len(moof) + 8)  # same length, real offset
        self.on_bytes(moof + mdat)


class ImageFolderSink(Sink):
    """One image file per frame: `folder/frame_000000.png`, `frame_000001.png`, ...

    `name` is a printf pattern for the frame index, without the extension; `suffix` defaults to '.png' or '.jpg'.
    PNG is lossless RGB; JPEG is 4:2:0 with `quality` 1..100 (100 best, default 90), mapped linearly onto the
    encoder's quantiser scale 31..2.
    Encoders are FFmpeg's (via PyAV), so no imaging library is needed.

    The folder is created on the first chunk. Each image is written to a temporary name and renamed, so every
    file under a frame name is whole. Existing files of the same names are replaced. `abort()` keeps the frames
    already written (each is a valid image) and stops; `close()` has nothing to finalise.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        format: Literal["png", "jpeg"] = "png",
        quality: int | None = None,
        name: str = "frame_%06d",
        suffix: str | None = None,
    ) -> None:
        super().__init__()
        if format not in ("png", "jpeg"):
            raise ValueError(f"format must be 'png' or 'jpeg', got {format!r}")
        if quality is not None and (format != "jpeg" or not 1 <= quality <= 100):
            raise ValueError(f"quality must be 1..100 and only applies to jpeg, got {quality} for {format}")
        try:
            distinct = name % 0 != name % 1
        except TypeError:
            distinct = False
        if not distinct or "/" in name:
            raise ValueError(f"name must be a file-name pattern with one integer field like 'frame_%06d', got {name!r}")
        self.folder = Path(folder)
        self.format = format
        self.quality = 90 if format == "jpeg" and quality is None else quality
        self.name = name
        self.suffix = suffix or (".png" if format == "png" else ".jpg")
        self._encoder = None

    def path_of(self, index: int) -> Path:
        return self.folder / (self.name % index + self.suffix)

    def _write(self, frames: np.ndarray) -> None:
        if self._encoder is None:
            self.folder.mkdir(parents=True, exist_ok=True)
            self._encoder = ImageEncoder(self.format, self.quality)
        for i, frame in enumerate(frames):
            _write_atomically(self.path_of(self.frames_written + i), self._encoder.encode(frame))

    def _close(self) -> None:
        pass

    def _abort(self) -> None:
        pass


class ImageEncoder:
    """(H, W, 3) uint8 RGB frames -> PNG or JPEG bytes in memory, with FFmpeg's encoders (no imaging library).

    JPEG: 4:2:0, BT.601 full range with a JFIF header; `quality` 1..100 maps linearly onto the quantiser 31..2.
    The encoder is opened on the first frame and reopened when the frame size changes.
    """

    def __init__(self, format: Literal["png", "jpeg"] = "jpeg", quality: int | None = 90) -> None:
        self.format, self.quality = format, quality
        self._codec = None

    def encode(self, frame: np.ndarray) -> bytes:
        height, width = frame.shape[:2]
        if self._codec is None or (self._codec.height, self._codec.width) != (height, width):
            self._codec = self._open(height, width)
        video_frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")
        if self.format == "jpeg":
            video_frame = video_frame.reformat(format="yuv420p", dst_color_range=ColorRange.JPEG)
        return b"".join(bytes(p) for p in self._codec.encode(video_frame))

    def _open(self, height: int, width: int):
        if self.format == "png":
            codec = av.CodecContext.create("png", "w")
            codec.pix_fmt = "rgb24"
        else:
            codec = av.CodecContext.create("mjpeg", "w")
            codec.pix_fmt = "yuv420p"
            codec.color_range = ColorRange.JPEG
            codec.sample_aspect_ratio = Fraction(1, 1)  # makes the encoder write a JFIF header
            codec.qmin = codec.qmax = round(2 + (100 - self.quality) * 29 / 99)
        codec.width, codec.height = width, height
        codec.time_base = Fraction(1, 1)
        return codec


class NumpySink(Sink):
    """Keeps every frame in memory: `.frames` is (N, H, W, 3) uint8 (shape (0, 0, 0, 3) before any chunk).

    Chunks are copied on write, so the producer may reuse its buffer. With `path`, `close()` also saves `.frames`
    as `.npy`, through a temporary file renamed onto `path`; `abort()` writes nothing.
    """

    def __init__(self, path: str | os.PathLike | None = None) -> None:
        super().__init__()
        self.path = None if path is None else Path(path)
        if self.path is not None and not self.path.parent.is_dir():
            raise FileNotFoundError(f"folder {self.path.parent} does not exist")
        self._chunks: list[np.ndarray] = []

    @property
    def frames(self) -> np.ndarray:
        if not self._chunks:
            return np.zeros((0, 0, 0, 3), np.uint8)
        if len(self._chunks) > 1:
            self._chunks = [np.concatenate(self._chunks)]
        return self._chunks[0]

    def _write(self, frames: np.ndarray) -> None:
        self._chunks.append(frames.copy())

    def _close(self) -> None:
        if self.path is not None:
            tmp = _temp_path(self.path)
            try:
                with open(tmp, "xb") as f:
                    np.save(f, self.frames)
                os.replace(tmp, self.path)
            finally:
                tmp.unlink(missing_ok=True)

    def _abort(self) -> None:
        pass


class ThreadedSink(Sink):
    """Runs another sink's writes on a background thread, so the producer does not wait on encoding.

    `write` checks the chunk (and the inner sink's size rule) at once, copies it (the producer may reuse its
    buffer) and queues it. At most `max_chunks` chunks wait in the queue, plus one being written; when the queue is
    full `write` blocks until the writer catches up, so memory stays bounded and a sink slower than real time slows
    the producer rather than growing without end.

    An exception in the writer thread is raised again by the producer's next `write` or `close` (the same
    exception object; queued chunks are dropped and the inner sink is aborted on `close`). `close` waits for the
    queue to drain, then closes the inner sink. `abort` drops the queued chunks, waits for the chunk being written
    (if any), and aborts the inner sink. The inner sink is only ever used by one thread at a time. Always end a
    ThreadedSink with `close` or `abort` (or use it in a `with` block): until then its thread waits for chunks.
    """

    _stop = object()

    def __init__(self, sink: Sink, max_chunks: int = 8) -> None:
        super().__init__()
        if max_chunks < 1:
            raise ValueError(f"max_chunks must be at least 1, got {max_chunks}")
        self.sink = sink
        self.needs_even_size = sink.needs_even_size  # so an odd size fails here, at once
        self._queue: queue.Queue = queue.Queue(maxsize=max_chunks)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name=f"{type(sink).__name__}-writer", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            frames = self._queue.get()
            if frames is self._stop:
                return
            if self._error is not None:
                continue  # keep taking chunks after a failure, so a producer blocked on a full queue wakes up
            try:
                self.sink.write(frames)
            except BaseException as e:  # handed to the producer
                self._error = e

    def _write(self, frames: np.ndarray) -> None:
        if self._error is not None:
            raise self._error
        self._queue.put(frames.copy())

    def _close(self) -> None:
        self._join()
        if self._error is not None:
            self.sink.abort()
            raise self._error
        self.sink.close()

    def _abort(self) -> None:
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._join()
        self.sink.abort()

    def _join(self) -> None:
        if self._thread.is_alive():
            self._queue.put(self._stop)
            self._thread.join()


def open_sink(path: str | os.PathLike, fps: float | Fraction, **options) -> Sink:
    """The sink a path asks for; `options` go to its constructor.

    - `*.mp4` -> Mp4Sink.
    - `*.npy` -> NumpySink writing that file.
    - an existing folder, or a path without a suffix -> ImageFolderSink of PNGs named frame_000000.png, ...
    - a name with a `%` field and a `.png` / `.jpg` / `.jpeg` suffix, like `out/img_%04d.jpg` -> ImageFolderSink
      in that folder with that pattern and format.
    `fps` is used by the MP4 sink only (frames carry no time otherwise). Anything else raises ValueError.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if "%" in path.name:
        formats = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg"}
        if suffix not in formats:
            raise ValueError(f"{path}: an image pattern must end in .png, .jpg or .jpeg")
        return ImageFolderSink(path.parent, format=formats[suffix], name=path.stem, suffix=path.suffix, **options)
    if suffix == ".mp4":
        return Mp4Sink(path, fps, **options)
    if suffix == ".npy":
        return NumpySink(path, **options)
    if path.is_dir() or not suffix:
        return ImageFolderSink(path, **options)
    raise ValueError(
        f"{path}: cannot tell the sink from the suffix {suffix!r}; use .mp4, .npy, a folder, or an image pattern "
        "like frames/frame_%06d.png"
    )


# --- helpers -----------------------------------------------------------------------------------------------------


def _check_chunk(frames: np.ndarray, size: tuple[int, int] | None, even: bool) -> np.ndarray:
    frames = np.asarray(frames)
    h, w = ("H", "W") if size is None else size
    expected = f"frames of shape (F, {h}, {w}, 3) and dtype uint8 with F >= 1"
    got = f"shape {tuple(frames.shape)} and dtype {frames.dtype}"
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
        hint = "; for a single frame use frames[None]" if frames.ndim == 3 else ""
        raise ValueError(f"expected {expected}, got {got}{hint}")
    if len(frames) == 0 or 0 in frames.shape[1:3]:
        raise ValueError(f"expected {expected}, got an empty chunk: {got}")
    if size is not None and frames.shape[1:3] != size:
        raise ValueError(f"expected {expected} (the size of the first chunk), got {got}")
    height, width = frames.shape[1:3]
    if even and (height % 2 or width % 2):
        raise ValueError(
            f"H.264 yuv420p needs an even width and height, got {width}x{height}; crop or pad the frames to even"
        )
    return frames


def _as_rate(fps: float | Fraction) -> Fraction:
    rate = Fraction(fps).limit_denominator(1001)  # 29.97 -> 2997/100, 30000/1001 stays exact
    if rate <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    return rate


def _temp_path(final: Path) -> Path:
    return final.with_name(f".{final.name}.{uuid.uuid4().hex[:12]}.part")


def _write_atomically(path: Path, data: bytes) -> None:
    tmp = _temp_path(path)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _add_h264_stream(container, codec: str, fps: Fraction, size: tuple[int, int], options: dict[str, str]):
    stream = container.add_stream(codec, rate=fps)
    stream.height, stream.width = size
    stream.pix_fmt = "yuv420p"
    stream.options = dict(options)
    context = stream.codec_context
    context.colorspace = Colorspace.ITU709
    context.color_range = ColorRange.MPEG
    context.color_primaries = ColorPrimaries.BT709
    context.color_trc = ColorTrc.BT709
    return stream


def _yuv_frame(rgb: np.ndarray, index: int, keyframe: bool = False) -> av.VideoFrame:
    """One RGB frame as BT.709 limited-range yuv420p, timed as frame `index` at the stream's rate."""
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
    frame = frame.reformat(format="yuv420p", dst_colorspace=Colorspace.ITU709, dst_color_range=ColorRange.MPEG)
    frame.pts = index
    if keyframe:
        frame.pict_type = av.video.frame.PictureType.I
    return frame


class _Collect:
    """Write-only file object for PyAV; without `seek` the muxer treats the output as a stream."""

    def __init__(self) -> None:
        self.pieces: list[bytes] | None = []

    def write(self, data) -> int:
        if self.pieces is not None:
            self.pieces.append(bytes(data))
        return len(data)


# ISO/IEC 14496-12 sample flags: sample_depends_on = 2 (an I frame) / 1 plus sample_is_non_sync_sample.
_SYNC_SAMPLE = 0x02000000
_NON_SYNC_SAMPLE = 0x01010000


def _box(kind: bytes, *payload: bytes) -> bytes:
    body = b"".join(payload)
    return struct.pack(">I4s", 8 + len(body), kind) + body


def _full_box(kind: bytes, version: int, flags: int, *payload: bytes) -> bytes:
    return _box(kind, struct.pack(">I", version << 24 | flags), *payload)


def _moof(sequence: int, base_time: int, samples: list[tuple[int, int, int]], data_offset: int) -> bytes:
    """`moof` for one track (track_ID 1, the only track the muxer made) whose data follows in the next `mdat`.

    `samples` holds (duration in track ticks, size in bytes, sample flags); `data_offset` counts from the start of
    the `moof` (tfhd default-base-is-moof) to the first sample byte.
    """
    tfhd = _full_box(b"tfhd", 0, 0x020000, struct.pack(">I", 1))  # default-base-is-moof
    tfdt = _full_box(b"tfdt", 1, 0, struct.pack(">Q", base_time))
    trun_flags = 0x000001 | 0x000100 | 0x000200 | 0x000400  # data offset, sample duration, size, flags
    entries = b"".join(struct.pack(">III", *sample) for sample in samples)
    trun = _full_box(b"trun", 0, trun_flags, struct.pack(">Ii", len(samples), data_offset), entries)
    return _box(b"moof", _full_box(b"mfhd", 0, 0, struct.pack(">I", sequence)), _box(b"traf", tfhd, tfdt, trun))


def _annexb_to_length_prefixed(data: bytes) -> bytes:
    """H.264 Annex B (NAL units after 00 00 01 start codes), as libx264 emits it, to the 4-byte length-prefixed
    NAL units an MP4 sample holds."""
    starts = []
    at = data.find(b"\x00\x00\x01")
    while at >= 0:
        starts.append(at + 3)
        at = data.find(b"\x00\x00\x01", at + 3)
    out = []
    for k, start in enumerate(starts):
        end = starts[k + 1] - 3 if k + 1 < len(starts) else len(data)
        nal = data[start:end].rstrip(b"\x00")  # a NAL never ends in 00; these belong to the next 4-byte start code
        out.append(struct.pack(">I", len(nal)) + nal)
    return b"".join(out)
