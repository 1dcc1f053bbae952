"""Any-step evaluation of the causal students: stage 1, stage 2 and the consistency baseline (issue 7's table).

    python -m distill.evaluate OUT [--stage2 DIR] [--consistency DIR] [--prompts N] [--budgets 1 2 ...] [--drift 2 20]

OUT is a `distill.experiment` output folder (its `results.json`, `stage1/model`); the stage-2 and consistency
students default to `OUT/stage2/model` and `OUT/consistency/model` (pipeline folders written by `distill.train`);
missing students are left out. For each student and step budget (default 1, 2, 4, 8, 16, 32) on the experiment's
held-out prompts (synthetic dataset seed 1; default as many as the experiment evaluated):

- caption accuracy by the experiment's classifier (retrained as the experiment trains it, kept in OUT/classifier.pt);
- Frechet distance of the classifier's penultimate features against held-out real videos (dataset seed 2);
- temporal consistency: mean absolute frame-to-frame difference (real videos' value in the reference row);
- drift along an endless `LatentStream` (`Generator.open(..., num_frames=None)`): accuracy and Frechet distance of
  chunk 20's frames against chunk 2's (real windows of the same length as reference).

The consistency student samples with its own sampler (jump to 0, re-noise), the flow-map students with jumps.
Writes OUT/evaluation.json, OUT/evaluation.md and OUT/evaluation.png (when matplotlib is installed).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from distill.consistency import consistency_step
from distill.experiment import SIZES, CaptionClassifier, accuracy, train_classifier
from distill.synthetic import SyntheticVideos
from streamgen.engine import Generator, Step, flow_map_step
from streamgen.pipeline import Pipeline

BUDGETS = (1, 2, 4, 8, 16, 32)
DRIFT_CHUNKS = (2, 20)


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """|mu_a - mu_b|^2 + tr(C_a + C_b - 2 (C_a^1/2 C_b C_a^1/2)^1/2) of feature sets (n, d), in float64."""
    a, b = a.double(), b.double()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = (a - mu_a).T @ (a - mu_a) / len(a), (b - mu_b).T @ (b - mu_b) / len(b)
    vals, vecs = torch.linalg.eigh(cov_a)
    root_a = vecs @ torch.diag(vals.clamp_min(0).sqrt()) @ vecs.T
    cross = torch.linalg.eigvalsh(root_a @ cov_b @ root_a).clamp_min(0).sqrt().sum()
    return float((mu_a - mu_b).square().sum() + cov_a.trace() + cov_b.trace() - 2 * cross)


@torch.no_grad()
def features(classifier: CaptionClassifier, video: torch.Tensor, batch: int = 32) -> torch.Tensor:
    """The classifier's penultimate features (B, 2 * width) of videos (B, 3, F, H, W) in [-1, 1]."""
    device = next(classifier.parameters()).device
    return torch.cat([classifier.body(v.to(device)).cpu() for v in video.split(batch)])


def frame_difference(video: torch.Tensor) -> float:
    """Mean absolute difference of consecutive frames of (B, 3, F, H, W)."""
    return float((video[:, :, 1:] - video[:, :, :-1]).abs().mean())


@torch.no_grad()
def sample(pipe: Pipeline, step: Step, embeds: torch.Tensor, budget: int, seed: int) -> torch.Tensor:
    """A finite video at the pipeline's natural size, decoded: (B, 3, F, H, W) in [-1, 1] on the CPU."""
    s = pipe.settings
    frames, h, w = pipe.latent_size(s.height, s.width, s.num_frames)
    latents = Generator(pipe.transformer, s.shift, step).generate(embeds, height=h, width=w, num_frames=frames,
                                                                  steps=budget, seed=seed)
    return pipe.vae.decode(latents).clamp(-1, 1).cpu()


@torch.no_grad()
def endless_chunks(pipe: Pipeline, step: Step, embeds: torch.Tensor, budget: int, seed: int,
                   chunks: tuple[int, ...]) -> dict[int, torch.Tensor]:
    """Decoded frames of the given chunks of an endless stream (decoded causally from its start)."""
    s = pipe.settings
    _, h, w = pipe.latent_size(s.height, s.width, s.num_frames)
    decoder, out = pipe.vae.stream_decoder(), {}
    with Generator(pipe.transformer, s.shift, step).open(embeds, height=h, width=w, num_frames=None, steps=budget,
                                                          seed=seed) as stream:
        for chunk in stream:
            frames = decoder.decode(chunk.latents).clamp(-1, 1).cpu()
            if chunk.index in chunks:
                out[chunk.index] = frames
            if chunk.index >= max(chunks):
                return out
    return out


def classifier_for(out: Path, results: dict, device: torch.device) -> CaptionClassifier:
    """The experiment's caption classifier: trained as the experiment trains it, once, then kept in OUT."""
    path = out / "classifier.pt"
    if path.is_file():
        model = CaptionClassifier().to(device)
        model.load_state_dict(torch.load(path, weights_only=True, map_location=device))
        return model.eval()
    s = SIZES[results["size"]]
    videos = SyntheticVideos(s["clips"], 0, s["frames"], s["pixels"], s["pixels"])
    model = train_classifier(videos, results["steps"]["classifier_steps"], s["batch"], device)
    torch.save(model.state_dict(), path)
    return model


def evaluate(students: dict[str, tuple[Pipeline, Step]], classifier: CaptionClassifier, held_out: dict,
             reference: dict, budgets: tuple[int, ...], drift: tuple[int, int]) -> dict:
    """Per student and budget: accuracy, Frechet distance, frame difference, drift; plus the real reference.

    held_out: the prompts ("captions", "labels"); reference: real videos ("video", "labels")."""
    real = reference["video"]
    real_feats = features(classifier, real)
    window = None
    rows = []
    for name, (pipe, step) in students.items():
        embeds = pipe.prompt_embeds(held_out["captions"]).to(pipe.transformer.device)
        for budget in budgets:
            video = sample(pipe, step, embeds, budget, seed=0)
            chunks = endless_chunks(pipe, step, embeds, budget, 0, drift)
            window = chunks[drift[0]].shape[2]
            real_window = real[:, :, -window:]  # a real window of the drift chunks' length
            real_window_feats = features(classifier, real_window)
            row = {"model": name, "steps": budget, "accuracy": accuracy(classifier, video, held_out["labels"]),
                   "frechet": frechet_distance(features(classifier, video), real_feats),
                   "frame_difference": frame_difference(video), "drift": {}}
            for c in drift:
                row["drift"][str(c)] = {
                    "accuracy": accuracy(classifier, chunks[c], held_out["labels"])["all"],
                    "frechet": frechet_distance(features(classifier, chunks[c]), real_window_feats)}
            rows.append(row)
    half = len(real) // 2
    return {"rows": rows, "real": {
        "frame_difference": frame_difference(real), "accuracy": accuracy(classifier, real, reference["labels"]),
        "frechet_real_halves": frechet_distance(real_feats[:half], real_feats[half:]) if half > 1 else None,
        "drift_window_frames": window}}


def table_markdown(report: dict) -> str:
    first, last = report["drift_chunks"]
    real = report["real"]
    lines = [f"Device: {report['device']}. Held-out prompts: {report['prompts']}; Frechet distance on the caption "
             f"classifier's penultimate features vs {report['prompts']} held-out real videos; drift: chunk {last} vs "
             f"chunk {first} of an endless stream ({real['drift_window_frames']}-frame windows).", "",
             f"| model | steps | all three | colour | shape | motion | FD | frame diff | acc chunk {first} | "
             f"acc chunk {last} | FD chunk {first} | FD chunk {last} |", "|---" * 12 + "|"]
    acc = real["accuracy"]
    halves = "-" if real["frechet_real_halves"] is None else f"{real['frechet_real_halves']:.3f} (halves)"
    lines.append(f"| real videos | - | {acc['all']:.2f} | {acc['colour']:.2f} | {acc['shape']:.2f} | "
                 f"{acc['motion']:.2f} | {halves} | {real['frame_difference']:.4f} | - | - | - | - |")
    for r in report["rows"]:
        a, d = r["accuracy"], r["drift"]
        lines.append(f"| {r['model']} | {r['steps']} | {a['all']:.2f} | {a['colour']:.2f} | {a['shape']:.2f} | "
                     f"{a['motion']:.2f} | {r['frechet']:.3f} | {r['frame_difference']:.4f} | "
                     f"{d[str(first)]['accuracy']:.2f} | {d[str(last)]['accuracy']:.2f} | "
                     f"{d[str(first)]['frechet']:.3f} | {d[str(last)]['frechet']:.3f} |")
    return "\n".join(lines) + "\n"


def plot(report: dict, path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False  # evaluation.json has the numbers
    first, last = report["drift_chunks"]
    panels = [("caption accuracy (all three)", lambda r: r["accuracy"]["all"]),
              ("Frechet distance", lambda r: r["frechet"]),
              ("frame difference", lambda r: r["frame_difference"]),
              (f"drift: FD chunk {last} / chunk {first}",
               lambda r: r["drift"][str(last)]["frechet"] / max(r["drift"][str(first)]["frechet"], 1e-12))]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2))
    models = list(dict.fromkeys(r["model"] for r in report["rows"]))
    for ax, (title, value) in zip(axes, panels):
        for m in models:
            rows = [r for r in report["rows"] if r["model"] == m]
            ax.plot([r["steps"] for r in rows], [value(r) for r in rows], marker="o", label=m)
        if title == "frame difference":
            ax.axhline(report["real"]["frame_difference"], color="gray", linestyle="--", label="real")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("steps")
        ax.set_title(title)
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(path)
    return True


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m distill.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="a distill.experiment output folder")
    parser.add_argument("--stage2", type=Path, help="stage-2 student (default OUT/stage2/model)")
    parser.add_argument("--consistency", type=Path, help="consistency student (default OUT/consistency/model)")
    parser.add_argument("--prompts", type=int, help="held-out prompts (default: the experiment's)")
    parser.add_argument("--budgets", type=int, nargs="+", default=list(BUDGETS))
    parser.add_argument("--drift", type=int, nargs=2, default=list(DRIFT_CHUNKS), metavar=("EARLY", "LATE"),
                        help="the chunks of an endless stream compared for drift")
    args = parser.parse_args(argv)
    out = args.out
    results = json.loads((out / "results.json").read_text())
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    budgets, drift = tuple(args.budgets), tuple(args.drift)
    s = SIZES[results["size"]]
    prompts = args.prompts or s["eval_prompts"]
    held = SyntheticVideos(prompts, 1, s["frames"], s["pixels"], s["pixels"])
    held_out = held.batch(list(range(len(held))))
    ref = SyntheticVideos(prompts, 2, s["frames"], s["pixels"], s["pixels"])
    folders = {"stage-1": (out / "stage1" / "model", flow_map_step),
               "stage-2": (args.stage2 or out / "stage2" / "model", flow_map_step),
               "consistency": (args.consistency or out / "consistency" / "model", consistency_step)}
    students = {name: (Pipeline.load(folder, torch.float32, device), step)
                for name, (folder, step) in folders.items() if (folder / "transformer").is_dir()}
    classifier = classifier_for(out, results, device)
    report = evaluate(students, classifier, held_out, ref.batch(list(range(len(ref)))), budgets, drift)
    report.update(device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu", prompts=len(held),
                  drift_chunks=list(drift), students={n: str(f) for n, (f, _) in folders.items() if n in students})
    (out / "evaluation.json").write_text(json.dumps(report, indent=2))
    (out / "evaluation.md").write_text(table_markdown(report))
    plot(report, out / "evaluation.png")
    print(table_markdown(report))
    return report


if __name__ == "__main__":
    main()
