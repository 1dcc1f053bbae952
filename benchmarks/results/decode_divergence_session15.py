"""One-off (session 15): where an overlapped end-to-end decode first departs from a standalone decode of the same
latents (`e2e_determinism_session15.txt`: frames differ only when the decode runs on its own stream beside the
generator). Forward hooks on every VAE decoder module record (float64 sum, float64 sum of |x|) of each output on the
stream that made it; the two traces are compared in call order.

    cd benchmarks/results && PYTHONPATH=CHECKOUT python decode_divergence_session15.py     # on the GPU machine
"""

import torch

from streamgen.bench import random_pipeline

trace: list[tuple[str, torch.Tensor]] = []


def hook(name):
    def record(module, args, out):
        if isinstance(out, torch.Tensor):
            x = out.detach().double()
            trace.append((name, torch.stack([x.sum(), x.abs().sum()])))
    return record


def main() -> None:
    device = torch.device("cuda")
    pipe = random_pipeline("1.3B", device, torch.bfloat16)
    prompt = torch.randn(1, 512, 4096, device=device, dtype=torch.bfloat16)
    with torch.no_grad():
        for _ in pipe.stream(prompt, steps=4, seed=0):  # warm-up: graphs captured, kernels compiled
            pass
        for name, module in pipe.vae.named_modules():
            module.register_forward_hook(hook(name))
        for attempt in range(3):
            trace.clear()
            chunks = [c.latents for c in pipe.stream(prompt, steps=4, seed=0)]
            torch.cuda.synchronize()
            overlapped = [(n, v.cpu()) for n, v in trace]
            trace.clear()
            decoder = pipe.vae.stream_decoder()
            for c in chunks:
                decoder.decode(c.latents)
            torch.cuda.synchronize()
            alone = [(n, v.cpu()) for n, v in trace]
            assert [n for n, _ in overlapped] == [n for n, _ in alone]
            differ = [i for i, ((_, a), (_, b)) in enumerate(zip(overlapped, alone)) if not torch.equal(a, b)]
            print(f"attempt {attempt}: {len(alone)} module outputs, {len(differ)} differ", flush=True)
            for i in differ[:6]:
                name, a = overlapped[i]
                calls = sum(1 for n, _ in alone[:i] if n == name)
                print(f"   #{i} {name or 'vae'} (its call {calls}): overlapped {a.tolist()} alone "
                      f"{alone[i][1].tolist()}", flush=True)


if __name__ == "__main__":
    main()
