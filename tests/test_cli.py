import json
import platform
import subprocess
import sys

import av
import numpy as np
import pytest

from streamgen.cli import main
from streamgen.pipeline import Pipeline


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "streamgen.cli", *args], capture_output=True, text=True, cwd=cwd,
                          timeout=300)


def test_generate_mp4_from_the_command_line(tmp_path):
    out = tmp_path / "video.mp4"
    result = run_cli("generate", "--prompt", "a red circle moving right", "--steps", "2", "-o", str(out))
    assert result.returncode == 0, result.stderr
    assert "time to first frame" in result.stderr and "fps" in result.stderr.splitlines()[-1]
    assert "chunk 4" in result.stderr
    with av.open(str(out)) as container:
        stream = container.streams.video[0]
        frames = list(container.decode(stream))
        assert (stream.width, stream.height, stream.average_rate) == (64, 64, 8)
    assert len(frames) == 29
    assert sorted(p.name for p in tmp_path.iterdir()) == ["video.mp4"]


def test_decode_pass_sizes_give_the_same_frames(tmp_path):
    args = ["generate", "--prompt", "a blue square", "--steps", "1", "--frames", "13", "--device", "cpu"]
    sizes = {"default": [], "one": ["--decode-pass-frames", "1"], "whole": ["--decode-pass-frames", "64"]}
    for name, extra in sizes.items():
        assert main([*args, *extra, "-o", str(tmp_path / f"{name}.npy")]) == 0
    whole = np.load(tmp_path / "whole.npy").astype(np.int16)
    assert whole.shape == (13, 64, 64, 3)
    for name in ("default", "one"):  # float32 rounding may move a pixel by one level
        assert np.abs(np.load(tmp_path / f"{name}.npy").astype(np.int16) - whole).max() <= 1


def test_decode_pass_frames_is_the_vaes_unless_given():
    from streamgen.cli import _load_pipeline, build_parser

    args = ["generate", "--prompt", "x", "--device", "cpu"]
    assert _load_pipeline(build_parser().parse_args(args)).vae.decode_pass_frames == 2
    assert _load_pipeline(build_parser().parse_args([*args, "--decode-pass-frames", "3"])).vae.decode_pass_frames == 3


def test_per_chunk_steps_frames_and_png_folder(tmp_path):
    assert main(["generate", "--prompt", "a blue square", "--steps", "1,2,1", "--frames", "13",
                 "-o", str(tmp_path / "frames")]) == 0
    assert len(list((tmp_path / "frames").iterdir())) == 13


def test_image_context(tmp_path):
    image = tmp_path / "start.png"
    frame = av.VideoFrame.from_ndarray(np.full((40, 80, 3), 200, np.uint8), format="rgb24")
    with av.open(str(image), "w", format="image2") as c:
        s = c.add_stream("png")
        s.width, s.height, s.pix_fmt = 80, 40, "rgb24"
        for packet in s.encode(frame):
            c.mux(packet)
    assert main(["generate", "--prompt", "x", "--image", str(image), "--steps", "1", "-o",
                 str(tmp_path / "v.npy")]) == 0
    assert np.load(tmp_path / "v.npy").shape == (29, 64, 64, 3)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model", "/nonexistent/model"], "no such model folder"),
        (["--height", "48"], "multiples of 32"),
        (["--steps", "0"], "step budgets must be >= 1"),
        (["--frames", "10"], "1 + 4k"),
        (["--image", "BAD_IMAGE"], "cannot read as image or video"),
        (["--image", "/nonexistent.png"], "no such file"),
        (["--decode-pass-frames", "0"], "--decode-pass-frames"),
    ],
)
def test_bad_input_exits_2_with_one_line_and_no_file(tmp_path, args, message):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not an image at all")
    args = [str(bad) if a == "BAD_IMAGE" else a for a in args]
    out = tmp_path / "out.mp4"
    result = run_cli("generate", "--prompt", "x", "-o", str(out), *args)
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr
    assert result.stderr.startswith("streamgen: error:") or "error:" in result.stderr
    assert not out.exists() and [p.name for p in tmp_path.iterdir()] == ["bad.png"]


def test_info(tmp_path, capsys):
    Pipeline.load(None, device="cpu").save_pretrained(tmp_path / "m")
    assert main(["info", str(tmp_path / "m")]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["transformer"]["config"]["num_layers"] == 4 and report["transformer"]["parameters"] > 0
    assert report["vae"]["config"]["z_dim"] == 16
    assert report["text_encoder"]["config"]["_class_name"] == "WordHashEncoder"
    assert report["settings"]["fps"] == 8.0


@pytest.mark.parametrize("bad_chunk, kept_frames", [(2, 9), (0, 0)])
def test_nan_latents_end_the_video_and_keep_what_was_made(tmp_path, capsys, monkeypatch, bad_chunk, kept_frames):
    import streamgen.engine as engine

    real_jump, calls = engine.jump, []

    def jump(z, u, t, r):  # one step per chunk: the call index is the chunk index
        calls.append(1)
        out = real_jump(z, u, t, r)
        return out.fill_(float("nan")) if len(calls) == bad_chunk + 1 else out

    monkeypatch.setattr(engine, "jump", jump)
    out = tmp_path / "v.mp4"
    assert main(["generate", "--prompt", "x", "--steps", "1", "--device", "cpu", "-o", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"chunk {bad_chunk}: the latents hold NaN or Inf" in err
    if kept_frames:
        assert f"holds the {kept_frames} frames made before it" in err
        with av.open(str(out)) as container:
            assert container.streams.video[0].frames == kept_frames
    else:
        assert "nothing was written" in err and not out.exists()


def test_serve_fixes_the_mmap_threshold_where_glibc_is():
    from streamgen.cli import fix_mmap_threshold

    assert fix_mmap_threshold() is (platform.libc_ver()[0] == "glibc")
