"""One-off (session 15): which Triton conv of the VAE gives different results from run to run? (`decode_poison_*`:
no buffer is read unwritten; `decode_under_load_bisect_*`: the decode is deterministic with torch's convs.) One
streaming decode of the 1.3B stream's latents records the arguments of the first calls of each kind (shapes, flags)
to `causal_conv3d`, `upsample2x_conv2d` and `few_outputs_conv3d`; each recorded call is then replayed on fresh
output buffers 6 times alone and 6 times on a side stream while the default stream runs queued GEMMs, and compared
bit for bit with its first replay.

    cd benchmarks/results && PYTHONPATH=CHECKOUT python conv_replay_under_load_session15.py     # on the GPU machine
"""

import torch
from decode_under_load_session15 import under_load

import kernels.conv3d as conv3d
import kernels.few_outputs_conv as few
import kernels.upsample_conv as upsample
from streamgen.bench import vae_decode_case

calls: dict[tuple, tuple] = {}


def clone(x):
    if isinstance(x, torch.Tensor):
        return x.clone(memory_format=torch.preserve_format) if x.is_contiguous() else x.clone()
    if isinstance(x, (list, tuple)):
        return type(x)(clone(y) for y in x)
    return x


def describe(x):
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), x.stride(), x.dtype)
    if isinstance(x, (list, tuple)):
        return tuple(describe(y) for y in x)
    return x


def recording(module, name):
    original = getattr(module, name)

    def record(*args, **kwargs):
        key = (name, describe(args), tuple((k, describe(v)) for k, v in sorted(kwargs.items())))
        if key not in calls:
            calls[key] = (original, clone(args), {k: clone(v) for k, v in kwargs.items()})
        return original(*args, **kwargs)
    setattr(module, name, record)
    return original


def result(fn, args, kwargs):
    kwargs = dict(kwargs)
    if isinstance(kwargs.get("out"), torch.Tensor):
        kwargs["out"] = torch.zeros_like(kwargs["out"])
    out = fn(*args, **kwargs)
    return torch.cat([t.flatten().float() for t in (out if isinstance(out, tuple) else (out,)) if t is not None])


def main() -> None:
    device = torch.device("cuda")
    side = torch.cuda.Stream(priority=-1)
    with torch.no_grad():
        vae, latents, sizes = vae_decode_case(device)
        vae.to_channels_last()
        originals = [(m, n, recording(m, n)) for m, n in ((conv3d, "causal_conv3d"), (upsample, "upsample2x_conv2d"),
                                                          (few, "few_outputs_conv3d"))]
        decoder = vae.stream_decoder()
        for c in latents.split(sizes, dim=2):
            decoder.decode(c)
        for m, n, fn in originals:
            setattr(m, n, fn)
        print(f"{len(calls)} kinds of call recorded", flush=True)
        for (name, args, kwargs), (fn, a, k) in calls.items():
            ref = result(fn, a, k)
            alone = [torch.equal(result(fn, a, k), ref) for _ in range(6)]
            loaded = [(under_load(lambda fn=fn, a=a, k=k: result(fn, a, k), side, 40) - ref).abs().max().item()
                      for _ in range(6)]
            flags = {key: v for key, v in kwargs if not isinstance(v, tuple) or len(v) != 3}
            print(f"{name} args {args} {flags}: alone equal {sum(alone)}/6; under load max |diff| {loaded}",
                  flush=True)


if __name__ == "__main__":
    main()
