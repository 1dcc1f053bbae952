"""One-off (session 15): does the VAE's Triton conv path read memory nobody wrote? (`decode_under_load_*`: its frames
change from run to run, under load and sometimes alone; the torch convs' do not.) Every `torch.empty` /
`torch.empty_like` of a floating dtype is filled with NaN during a streaming decode of the 1.3B stream's latents
(`vae_decode_case`); forward hooks name the first decoder modules whose output holds NaN. Then the same with the
torch convs (a control).

    cd benchmarks/results && PYTHONPATH=CHECKOUT python decode_poison_session15.py     # on the GPU machine
"""

import torch

import streamgen.vae as vaemod
from streamgen.bench import vae_decode_case

EMPTY, EMPTY_LIKE = torch.empty, torch.empty_like


def poisoned(make):
    def wrapper(*args, **kwargs):
        x = make(*args, **kwargs)
        return x.fill_(float("nan")) if x.is_floating_point() else x
    return wrapper


def main() -> None:
    device = torch.device("cuda")
    with torch.no_grad():
        vae, latents, sizes = vae_decode_case(device)
        vae.to_channels_last()
        found: list[str] = []

        def hook(name):
            def check(module, args, out):
                if isinstance(out, torch.Tensor) and len(found) < 8 and bool(out.isnan().any()):
                    inputs_nan = any(bool(a.isnan().any()) for a in args if isinstance(a, torch.Tensor))
                    found.append(f"{name} (inputs hold NaN: {inputs_nan}, output NaN fraction "
                                 f"{out.isnan().float().mean().item():.2e})")
            return check

        for name, module in vae.named_modules():
            module.register_forward_hook(hook(name))
        for triton_convs in (True, False):
            vaemod.set_triton_convs(triton_convs)
            found.clear()
            torch.empty, torch.empty_like = poisoned(EMPTY), poisoned(EMPTY_LIKE)
            try:
                decoder = vae.stream_decoder()
                frames = torch.cat([decoder.decode(c) for c in latents.split(sizes, dim=2)], dim=2)
            finally:
                torch.empty, torch.empty_like = EMPTY, EMPTY_LIKE
            bad = frames.isnan()
            where = bad.nonzero()[:5].tolist() if bool(bad.any()) else []
            print(f"triton convs {triton_convs}: NaN in {bad.float().mean().item():.2e} of the frames, first at "
                  f"{where}", flush=True)
            for line in found:
                print("   ", line, flush=True)


if __name__ == "__main__":
    main()
