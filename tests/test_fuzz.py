"""Fuzzing (hypothesis) of everything that parses outside input: the websocket protocol, over a real connection too,
the `streamgen generate` arguments and the checkpoint config files. Every bad input gets one clear error."""

import asyncio
import contextlib
import io
import json
import shutil
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import connect

from streamgen import cli
from streamgen.checkpoint import CheckpointError
from streamgen.pipeline import SETTINGS_NAME, Pipeline
from streamgen.protocol import CLIENT_TYPES, Limits, ProtocolError, check_limits, parse_client_message
from streamgen.server import StreamServer

FAST = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
CODES = {"binary", "too_large", "bad_json", "bad_message", "unknown_type", "unsupported_version", "invalid", "limit"}
FIELDS = ["type", "v", "id", "stream", "prompt", "steps", "seed", "width", "height", "frames", "format", "quality",
          "fps", "realtime", "recache", "t"]

huge_ints = st.integers(min_value=-(10**40), max_value=10**40) | st.sampled_from([2**63, 2**63 - 1, -(2**63), 2**64])
scalars = (st.none() | st.booleans() | st.integers() | huge_ints | st.floats(allow_nan=False, allow_infinity=False)
           | st.text(max_size=30) | st.sampled_from(CLIENT_TYPES) | st.sampled_from(["jpeg", "fmp4", "", "\x00"]))
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=10) | st.sampled_from(FIELDS), inner, max_size=4),
                           max_leaves=20)
# message-shaped objects: a known type and known field names with values of any type (reach pydantic and the limits)
shaped = st.fixed_dictionaries({"type": st.sampled_from(CLIENT_TYPES)}).flatmap(
    lambda base: st.dictionaries(st.sampled_from(FIELDS[1:]), json_values, max_size=6).map(lambda d: {**base, **d}))
number_texts = st.sampled_from(["1" * 5000, "1e999", "-1e999", "NaN", "Infinity", "-Infinity", "-0", "0.0", "1e-400",
                                "9" * 30, "1.5", "4"])
raw_numbers = st.builds(lambda field, number: f'{{"type": "start", "prompt": "x", "{field}": {number}}}',
                        st.sampled_from(["steps", "seed", "width", "frames", "fps", "quality", "id"]), number_texts)
nested = st.builds(lambda depth, opener: opener * depth, st.integers(1, 8000), st.sampled_from(["[", '{"a":']))
texts = (st.text(alphabet=st.characters(min_codepoint=0, max_codepoint=0x10FFFF), max_size=200)  # surrogates too
         | st.binary(max_size=200) | json_values.map(json.dumps) | shaped.map(json.dumps) | raw_numbers | nested
         | st.sampled_from(['{"type": "start", "prompt": "\\ud800"}', '{"type": "ping", "t": 1e308}',
                            '{"type": "ping", "v": true}', '{"type": "ping", "v": 1.0}', "", " ", "null", "{}"]))


def check_one(data, limits: Limits):
    """Parse `data`: a message within `limits`, or a ProtocolError with a known code and a short one-line message."""
    try:
        message = parse_client_message(data, limits)
    except ProtocolError as e:
        assert e.code in CODES, e.code
        assert e.message and "\n" not in e.message and len(e.message) < 1000, e.message
        assert isinstance(e.request_id, str | int | None) and not isinstance(e.request_id, bool)
        e.to_message().to_json()  # the answer can always be sent
        return None
    check_limits(message, limits)  # idempotent on an accepted message
    if getattr(message, "steps", None) is not None:
        assert message.steps <= limits.max_steps
    if getattr(message, "prompt", None) is not None:
        assert len(message.prompt) <= limits.max_prompt_chars
        message.prompt.encode()  # valid text
    message.model_dump_json()
    return message


limits_strategy = st.builds(Limits, max_message_bytes=st.integers(1, 20_000), max_prompt_chars=st.integers(1, 50),
                            max_width=st.integers(1, 2000), max_height=st.integers(1, 2000),
                            max_frames=st.integers(1, 1000), max_steps=st.integers(1, 20),
                            allow_endless=st.booleans(), max_fps=st.floats(0.1, 500))


@FAST
@given(texts)
def test_protocol_parser_answers_any_input_with_a_message_or_a_protocol_error(data):
    check_one(data, Limits())


@settings(max_examples=100, deadline=None)
@given(shaped | json_values.map(json.dumps), limits_strategy)
def test_limits_hold_for_any_configuration(data, limits):
    check_one(data if isinstance(data, str) else json.dumps(data), limits)


@pytest.mark.parametrize("data, code, mentions", [
    ('{"type": "ping", "t": ' + "1" * 5000 + "}", "bad_json", "too many digits"),
    ("[" * 5000 + "]" * 5000, "bad_json", "nested too deeply"),
    ('{"type": "start", "prompt": "\\udc00"}', "bad_json", "lone surrogate"),
    ("\ud800", "bad_json", "not valid Unicode"),
    ('{"type": "start", "prompt": "x", "fps": NaN}', "bad_json", "NaN is not JSON"),
    ('{"type": "ping", "t": 1e999}', "bad_json", "out of range"),
    ('{"type": "ping", "v": true}', "unsupported_version", "True"),
    ('{"type": "' + "x" * 5000 + '"}', "unknown_type", "..."),
])
def test_inputs_that_used_to_escape_as_other_exceptions(data, code, mentions):
    with pytest.raises(ProtocolError) as e:
        parse_client_message(data, Limits())
    assert e.value.code == code and mentions in e.value.message and len(e.value.message) < 300, e.value.message


# ---------------------------------------------------------------------------------------------------------------------
# over a real connection


@pytest.fixture(scope="module")
def pipe() -> Pipeline:
    return Pipeline.load(None)


def refused(data) -> bool:
    try:
        parse_client_message(data, Limits())
    except ProtocolError:
        return True
    return False


@settings(max_examples=2, deadline=None, suppress_health_check=list(HealthCheck))
@given(burst=st.lists(texts.filter(refused), min_size=60, max_size=60))
def test_a_burst_of_fuzzed_messages_gets_one_error_each_while_another_stream_plays(pipe, burst):
    async def scenario():
        async with StreamServer(pipe, port=0, limits=Limits(rate_burst=1000, rate_per_s=1000)) as server:
            url = f"ws://127.0.0.1:{server.port}/"
            async with connect(url) as viewer, connect(url, max_size=None) as fuzzer:
                await viewer.recv()
                await viewer.send(json.dumps(dict(type="start", prompt="a red circle", steps=1, width=32, height=32,
                                                  realtime=False)))
                chunks_before = await count_chunks(viewer, 0.3)
                await fuzzer.recv()
                for data in burst:
                    await fuzzer.send(data)
                answers = [json.loads(await asyncio.wait_for(fuzzer.recv(), 10)) for _ in burst]
                assert all(a["type"] == "error" and a["code"] in CODES for a in answers), answers
                await fuzzer.send(json.dumps({"type": "ping", "t": 1}))
                assert json.loads(await asyncio.wait_for(fuzzer.recv(), 10))["type"] == "pong"
                assert chunks_before >= 1 and await count_chunks(viewer, 0.3) >= 1  # the other stream plays on
                assert len(server.jobs) == 1
                await viewer.send(json.dumps({"type": "stop"}))
                while json.loads(await next_text(viewer))["type"] != "ended":
                    pass

    asyncio.run(asyncio.wait_for(scenario(), 60))


async def next_text(ws) -> str:
    while isinstance(data := await asyncio.wait_for(ws.recv(), 20), bytes):
        pass
    return data


async def count_chunks(ws, seconds: float) -> int:
    """Chunk infos received within `seconds` (at least one awaited)."""
    n, end = 0, time.monotonic() + seconds
    while n == 0 or time.monotonic() < end:
        data = await asyncio.wait_for(ws.recv(), 20)
        n += isinstance(data, str) and json.loads(data)["type"] == "chunk"
    return n


# ---------------------------------------------------------------------------------------------------------------------
# command line and config files


class Reached(BaseException):
    """Raised where `generate` would start writing: every argument passed validation."""


def run_main(argv, monkeypatch) -> tuple[int | str, str]:
    """(exit code, or "reached" when generation would start; stderr)."""
    err = io.StringIO()

    def reached(*_, **__):
        raise Reached

    monkeypatch.setattr(cli, "ThreadedSink", reached)
    with contextlib.redirect_stderr(err):
        try:
            code = cli.main(argv)
        except SystemExit as e:  # argparse
            code = e.code
        except Reached:
            code = "reached"
    return code, err.getvalue()


def assert_clear_error(code, stderr):
    lines = [line for line in stderr.splitlines() if not line.startswith("streamgen: ") or "error" in line]
    assert code == 2, stderr
    assert "Traceback" not in stderr
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1 and len(errors[0]) < 400, stderr


arg_values = (st.text(max_size=12) | st.integers().map(str) | huge_ints.map(str)
              | st.sampled_from(["nan", "inf", "-inf", "-0", "0", "1e400", "0x20", "32", "64", "9", "1,2", "1,,2",
                                 "-1", "cuda", "cuda:7", "meta", "cpu", "cpu:0", "fp16", "bf16", "int8", ""]))
options = ["--steps", "--frames", "--height", "--width", "--seed", "--fps", "--dtype", "--device"]


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.dictionaries(st.sampled_from(options), arg_values, min_size=1, max_size=4))
def test_generate_arguments_end_in_a_clear_error_or_a_valid_run(monkeypatch, tmp_path_factory, values):
    out = tmp_path_factory.mktemp("out") / "v.mp4"
    argv = ["generate", "--prompt", "x", "-o", str(out)] + [f"{k}={v}" for k, v in values.items()]
    code, stderr = run_main(argv, monkeypatch)
    if code != "reached":
        assert_clear_error(code, stderr)
    assert not out.exists()


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory, pipe):
    root = tmp_path_factory.mktemp("model")
    pipe.save_pretrained(root)
    return root


def mutate(config: dict, data) -> object:
    """A config damaged in one of several ways."""
    how = data.draw(st.sampled_from(["drop", "retype", "replace", "text", "wrap"]))
    if how == "text":
        return data.draw(st.sampled_from(["", "{", "{'a': 1}", "[1, 2", "null", "\xff", "1" * 5000, "[" * 5000]))
    if how == "replace":
        return data.draw(json_values)
    if how == "wrap":
        return [config]
    config = dict(config)
    keys = data.draw(st.lists(st.sampled_from(sorted(config)), min_size=1, max_size=3, unique=True))
    for key in keys:
        if how == "drop":
            del config[key]
        else:
            config[key] = data.draw(scalars.filter(lambda v: not isinstance(v, int) or -5 <= v <= 200)
                                    | st.lists(st.integers(-2, 8), max_size=4))
    return config


@settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
@given(data=st.data())
def test_damaged_config_files_raise_one_checkpoint_error(model_folder, tmp_path_factory, data):
    root = tmp_path_factory.mktemp("damaged")
    shutil.copytree(model_folder, root, dirs_exist_ok=True)
    path = root / data.draw(st.sampled_from(["transformer/config.json", "vae/config.json", SETTINGS_NAME]))
    damaged = mutate(json.loads(path.read_text()), data)
    path.write_text(damaged if isinstance(damaged, str) else json.dumps(damaged), encoding="utf-8",
                    errors="surrogatepass")
    try:
        Pipeline.load(root, device="cpu")
    except CheckpointError as e:
        first = str(e).splitlines()[0]
        assert path.name in first or "checkpoint does not match" in first or str(root) in first, str(e)
    except ValueError as e:  # a config that validates but describes an impossible model
        pytest.fail(f"not a CheckpointError: {type(e).__name__}: {e}")


def test_cli_reports_a_damaged_config_in_one_line(model_folder, tmp_path, monkeypatch):
    root = tmp_path / "m"
    shutil.copytree(model_folder, root)
    (root / "transformer" / "config.json").write_text('["not", "an", "object"]')
    code, stderr = run_main(["generate", "--prompt", "x", "--model", str(root), "-o", str(tmp_path / "v.mp4")],
                            monkeypatch)
    assert_clear_error(code, stderr)
    assert "config is a JSON object" in stderr
