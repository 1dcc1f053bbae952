"""`streamgen` command line: generate a video, describe a checkpoint, serve live streams.

Bad input ends with exit code 2 and one line naming the problem; the output file exists only if the run finished
(sinks write under a temporary name and rename at the end).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
from pydantic import ValidationError
from safetensors import safe_open

from streamgen.checkpoint import CheckpointError, weight_files
from streamgen.media import MediaError
from streamgen.pipeline import BUILTIN_DESCRIPTION, SETTINGS_NAME, NonFiniteError, Pipeline
from streamgen.protocol import Limits
from streamgen.sinks import ThreadedSink, open_sink
from streamgen.text import EmbeddingFile

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class UsageError(Exception):
    """Bad input: reported in one line, exit code 2."""


def _steps(text: str) -> int | list[int]:
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"steps must be an integer or a comma-separated list, got {text!r}") from None
    if any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"step budgets must be >= 1, got {text!r}")
    return values[0] if len(values) == 1 else values


DECODE_PASS_HELP = ("decode at most N video frames per VAE pass: memory grows with N (480x832 on an H100: the "
                    "decoder peaks 2.3 GiB above its weights at N=2, 2.1 at N=1, 4.4 for a whole chunk; N=2 is as "
                    "fast as whole chunks, N=1 1-4%% slower) (default: 2)")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text[:40]!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a seed is an integer, got {text[:40]!r}") from None
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"a seed lies in [0, 2**63), got {text[:40]}")
    return value


def _fps(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a frame rate is a number, got {text[:40]!r}") from None
    if not (math.isfinite(value) and 0 < value <= 1000):
        raise argparse.ArgumentTypeError(f"a frame rate lies in (0, 1000], got {text[:40]}")
    return value


def _device(text: str) -> str:
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device: {text[:40]!r} (cpu, cuda, cuda:1 ...)") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"streamgen runs on cpu or cuda, not {device.type}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError("CUDA is not available on this machine")
    if device.type == "cuda" and device.index is not None and device.index >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(f"no {device}: this machine has {torch.cuda.device_count()} GPUs")
    return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="streamgen", description="Causal streaming video generation (AnyFlow).")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate a video", description=(
        "Generate a video chunk by chunk and write it as it is made. Without --model, " + BUILTIN_DESCRIPTION + "."))
    gen.add_argument("--prompt", help="text prompt (with --embeddings: the prompt to look up in the file)")
    gen.add_argument("--embeddings", type=Path, help="safetensors file of precomputed prompt embeddings")
    gen.add_argument("--model", type=Path, help="pipeline folder (diffusers layout); default: the built-in model")
    gen.add_argument("--steps", type=_steps, default=4, help="step budget, or one per generated chunk: 1,2,4,4")
    gen.add_argument("--frames", type=_positive_int, help="number of video frames, 1 + 4k (default: the model's)")
    gen.add_argument("--height", type=_positive_int, help="pixels (default: the model's)")
    gen.add_argument("--width", type=_positive_int, help="pixels (default: the model's)")
    gen.add_argument("--seed", type=_seed, default=0)
    gen.add_argument("--image", type=Path, help="image to start from (I2V)")
    gen.add_argument("--video", type=Path, help="video to continue (V2V)")
    gen.add_argument("-o", "--output", type=Path, default=Path("out.mp4"),
                     help=".mp4, .npy, or a folder for PNG frames (default: out.mp4)")
    gen.add_argument("--fps", type=_fps, help="frame rate of the output (default: the model's)")
    gen.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    gen.add_argument("--device", type=_device, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    gen.add_argument("--decode-pass-frames", type=_positive_int, metavar="N",
                     help=DECODE_PASS_HELP)

    info = sub.add_parser("info", help="describe a checkpoint folder")
    info.add_argument("model", type=Path)

    srv = sub.add_parser("serve", help="serve live streams over websockets, with a browser page", description=(
        "Serve live video streams steered by their viewers: open http://HOST:PORT/ in a browser, or speak the "
        "websocket protocol (README, 'Serving'). Without --model, " + BUILTIN_DESCRIPTION + "."))
    srv.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1, this machine)")
    srv.add_argument("--port", type=int, default=8765, help="default: 8765; 0 picks a free port")
    srv.add_argument("--model", type=Path, help="pipeline folder (diffusers layout); default: the built-in model")
    srv.add_argument("--dtype", choices=list(DTYPES), help="default: bf16 on GPU, fp32 on CPU")
    srv.add_argument("--device", type=_device, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    srv.add_argument("--decode-pass-frames", type=_positive_int, metavar="N",
                     help=DECODE_PASS_HELP)
    srv.add_argument("--token", default=os.environ.get("STREAMGEN_TOKEN") or None,
                     help="access token clients must send (?token=); required with a --host other than 127.0.0.1 "
                          "(default: $STREAMGEN_TOKEN)")
    srv.add_argument("--allow-origin", action="append", metavar="ORIGIN",
                     help="a web origin whose pages may connect, e.g. https://app.example (repeatable; '*': any); "
                          "default: pages served by this server only")
    srv.add_argument("--max-streams", type=int, help="concurrent streams; beyond, clients get 'busy' (default 4)")
    srv.add_argument("--limit", action="append", default=[], metavar="NAME=VALUE",
                     help="any server limit, e.g. --limit max_steps=8 --limit allow_endless=false (README, 'Serving')")
    # `bench` takes its own arguments (streamgen.bench); listed here for --help
    sub.add_parser("bench", add_help=False, help="stream latency per step budget, random weights (bench --help)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["bench"]:
        from streamgen.bench import main as bench_main

        bench_main(argv[1:])
        return 0
    args = build_parser().parse_args(argv)
    try:
        return {"generate": generate, "info": info, "serve": serve}[args.command](args)
    except (UsageError, ValueError, CheckpointError, MediaError, OSError, ImportError) as e:
        if isinstance(e, OSError) and e.strerror and e.filename:  # e.g. a full disk: "No space left on device"
            e = UsageError(f"{e.filename}: {e.strerror}")
        message = str(e).strip().splitlines()
        print(f"streamgen: error: {message[0] if message else type(e).__name__}", file=sys.stderr)
        for line in message[1:]:
            print(f"  {line}", file=sys.stderr)
        return 2


def _load_pipeline(args: argparse.Namespace) -> Pipeline:
    """The pipeline `generate` and `serve` run: --model (or the built-in one) on --device in --dtype, decoding
    --decode-pass-frames video frames per VAE pass."""
    pipe = Pipeline.load(args.model, DTYPES.get(args.dtype), args.device)
    if args.decode_pass_frames is not None:
        pipe.vae.decode_pass_frames = args.decode_pass_frames
    return pipe


def generate(args: argparse.Namespace) -> int:
    if args.prompt is None and args.embeddings is None:
        raise UsageError("give --prompt, or --embeddings (with --prompt to pick one prompt from the file)")
    if args.image and args.video:
        raise UsageError("give --image or --video, not both")
    for path in (args.image, args.video, args.embeddings):
        if path is not None and not path.is_file():
            raise UsageError(f"{path}: no such file")
    if args.model is not None and not args.model.is_dir():
        raise UsageError(f"{args.model}: no such model folder")
    start = time.perf_counter()
    pipe = _load_pipeline(args)
    s = pipe.settings
    height, width, frames = args.height or s.height, args.width or s.width, args.frames or s.num_frames
    pipe.latent_size(height, width, frames)  # validate before anything is written
    if args.embeddings is not None:
        table = EmbeddingFile(args.embeddings)
        prompt = table.encode([args.prompt if args.prompt is not None else table.prompts[0]])
    else:
        prompt = args.prompt
    context = None
    if args.image or args.video:
        context = pipe.context_from_file(args.image or args.video, height, width, frames)
    fps = args.fps or s.fps
    print(f"streamgen: {height}x{width}, {frames} frames, steps {args.steps}, seed {args.seed}, "
          f"{pipe.transformer.device} {str(pipe.transformer.dtype).removeprefix('torch.')}"
          + ("" if args.model else " (built-in default model)"), file=sys.stderr)

    first_frame_at, written = None, 0
    gen_start = time.perf_counter()
    failure = None
    with ThreadedSink(open_sink(args.output, fps)) as sink:
        try:
            for chunk in pipe.stream(prompt, height=height, width=width, num_frames=frames, steps=args.steps,
                                     seed=args.seed, context=context):
                first_frame_at = first_frame_at or time.perf_counter() - gen_start
                sink.write(chunk.frames[0])
                written += chunk.frames.shape[1]
                lat = chunk.latents
                kind = "context" if lat.from_context else f"{lat.steps} steps"
                print(f"  chunk {chunk.index}: frames {chunk.first_frame}-{written - 1} ({kind}) cache "
                      f"{lat.context_s:.3f}s denoise {lat.denoise_s:.3f}s decode {chunk.decode_s:.3f}s",
                      file=sys.stderr)
        except NonFiniteError as e:  # the sink still closes normally: the frames made before are kept
            if not written:
                raise UsageError(f"{e}; nothing was written") from None
            failure = e
    if failure is not None:
        raise UsageError(f"{failure}; {args.output} holds the {written} frames made before it")
    total = time.perf_counter() - gen_start
    print(f"done: {written} frames -> {args.output}; time to first frame {first_frame_at:.3f}s, total {total:.2f}s, "
          f"{written / total:.1f} fps ({total / written * 1000:.1f} ms/frame; load {gen_start - start:.2f}s)",
          file=sys.stderr)
    return 0


def info(args: argparse.Namespace) -> int:
    root = args.model
    if not root.is_dir():
        raise UsageError(f"{root}: no such model folder")
    report: dict = {"path": str(root.resolve())}
    for component in ("transformer", "vae", "text_encoder", "tokenizer", "scheduler"):
        folder = root / component
        if not folder.is_dir():
            continue
        entry: dict = {"files": sorted(p.name for p in folder.iterdir())}
        if (folder / "config.json").is_file():
            entry["config"] = json.loads((folder / "config.json").read_text())
        if any(folder.glob("*.safetensors")):
            count = 0
            for path in set(weight_files(folder).values()):
                with safe_open(path, framework="pt") as f:
                    count += sum(torch.Size(f.get_slice(k).get_shape()).numel() for k in f.keys())
            entry["parameters"] = count
        entry["bytes"] = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        report[component] = entry
    if (root / SETTINGS_NAME).is_file():
        report["settings"] = json.loads((root / SETTINGS_NAME).read_text())
    print(json.dumps(report, indent=2))
    return 0


def fix_mmap_threshold(nbytes: int = 1 << 20) -> bool:
    """Make glibc serve every allocation of `nbytes` or more with its own mmap, returned to the system when freed.

    By default glibc raises that threshold each time such a block is freed, after which the per-chunk frame and
    activation buffers of a long-running server come from the heap, whose top cannot shrink past a block still in
    use: measured on the 8-client loopback load (benchmarks/load_test.py), RSS swung between 400 and 470 MB and kept a
    +61 MB step for good; with the threshold fixed it stayed within 309-316 MB. False where there is no glibc.
    """
    try:
        libc = ctypes.CDLL(None)
        return bool(libc.mallopt(-3, nbytes))  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def serve(args: argparse.Namespace) -> int:
    from streamgen.server import StreamServer  # the websockets stack only for this command

    fix_mmap_threshold()

    fields = dict(item.partition("=")[::2] for item in args.limit)
    if args.max_streams is not None:
        fields["max_streams"] = str(args.max_streams)
    try:
        limits = Limits.model_validate_json(json.dumps(fields)) if fields else Limits()
    except ValidationError as e:
        raise UsageError("bad --limit: " + "; ".join(f"{err['loc'][0]}: {err['msg']}" for err in e.errors())) from None
    if args.model is not None and not args.model.is_dir():
        raise UsageError(f"{args.model}: no such model folder")
    StreamServer.check_access(args.host, args.token)  # before the model loads
    pipe = _load_pipeline(args)
    server = StreamServer(pipe, args.host, args.port, limits, "" if args.model else BUILTIN_DESCRIPTION, args.token,
                          args.allow_origin)

    async def run() -> None:
        async with server:
            query = "?token=..." if args.token else ""
            print(f"streamgen: serving on http://{args.host}:{server.port}/{query} ({pipe.transformer.device}, at "
                  f"most {limits.max_streams} streams); Ctrl-C stops", file=sys.stderr)
            await asyncio.Future()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(run())
    return 0


if __name__ == "__main__":
    sys.exit(main())
