"""The synthetic end-to-end experiment: VAE -> latent shards -> teacher -> stage-1 student -> any-step evaluation.

    python -m distill.experiment OUT               # one GPU, minutes (distill/h100.sh: the whole chain)
    python -m distill.experiment OUT --size cpu    # 2 CPU cores, the VAE alone 21 minutes (RESULTS.md)
    python -m distill.experiment OUT --size tiny   # CPU smoke test of the same path, seconds

A caption classifier (colour / shape / motion heads) trained on the synthetic videos themselves judges whether the
student's videos at 1, 2, 4, 8 and 16 steps show what their prompts ask for; every generated video passes through
the VAE's decoder, so the VAE's reconstruction quality (PSNR against each clip's own mean frame, a baseline that knows
the clip but not its motion) bounds them all and is reported first. Writes OUT/results.json, OUT/results.md (the
table), OUT/curves.json (loss curves; curves.png when matplotlib is installed), OUT/samples/*.png (a few clips per row
and every fourth frame per column, real, reconstructed and generated at each budget, captions in
OUT/samples/captions.txt) and every trained model.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from distill.data import write_latent_shards
from distill.synthetic import LABELS, SyntheticVideos
from distill.train import TrainConfig, train
from streamgen.pipeline import Pipeline
from streamgen.sinks import ImageEncoder
from streamgen.text import WordHashEncoder
from streamgen.vae import WanVAE, to_uint8_frames

STEPS = (1, 2, 4, 8, 16)
# The VAE's steps, learning rate and EMA decide whether the whole table means anything: every generated video goes
# through its decoder. It trains on clips as long as the ones it codes later: its causal convolutions see about 60
# frames back, so on shorter training clips every frame is near the zero padding before the first, and the frames
# past the training length decode to dark blotches.
SIZES = {
    "tiny": {"clips": 8, "pixels": 32, "frames": 29, "batch": 2, "vae_steps": 1, "vae_lr": 1e-3, "teacher_steps": 2,
             "stage1_steps": 2, "classifier_steps": 2, "eval_prompts": 2, "eval_steps": (1, 2), "model": "tiny",
             "vae": "tiny"},
    # Two CPU cores. The VAE is most of the time: 21 minutes here (10 samples/s). With equal pixel weights it coded
    # only the backgrounds, at 64x64 and at this 32x32; with VAE_FOREGROUND_WEIGHT its VAE stage reached 20.5 dB
    # (distill/RESULTS.md). The transformer is 4 layers at dim 128.
    "cpu": {"clips": 1024, "pixels": 32, "frames": 29, "batch": 16, "vae_batch": 8, "vae_steps": 1500,
            "vae_lr": 1e-3, "teacher_steps": 1500, "stage1_steps": 800, "classifier_steps": 400, "eval_prompts": 48,
            "eval_steps": STEPS,
            "model": {"preset": "tiny", "num_layers": 4, "num_attention_heads": 2, "attention_head_dim": 64,
                      "ffn_dim": 512, "text_dim": 64, "freq_dim": 64},
            "vae": {"preset": "tiny", "base_dim": 8}},
    # One H100 (distill/h100.sh runs this, then stage 2, consistency and the evaluation). The VAE is base_dim 8: in
    # an 800-step H100 trial (9-frame clips) base_dim 16 was only 1.17x slower per step (the step is mostly overhead
    # at 64x64) and did not reach a lower loss. The transformer (4 layers at dim 192, 2.8M parameters, 5.7 MB in
    # bf16) is the size the built-in default model ships at. With 1000 teacher steps of 32 clips the teacher and
    # its students drew blobs of the right colours that hardly moved (distill/RESULTS.md, run 2): the teacher now
    # sees 8x the clips.
    "gpu": {"clips": 2048, "pixels": 64, "frames": 29, "batch": 32, "vae_batch": 16, "vae_steps": 1000,
            "vae_lr": 1e-3, "teacher_batch": 64, "teacher_steps": 4000, "teacher_lr": 4e-4, "stage1_steps": 1500,
            "classifier_steps": 1500, "eval_prompts": 96, "eval_steps": STEPS,
            "model": {"preset": "tiny", "num_layers": 4, "num_attention_heads": 3, "attention_head_dim": 64,
                      "ffn_dim": 768, "text_dim": 64, "freq_dim": 128},
            "vae": {"preset": "tiny", "base_dim": 8}},
}
# The moving shape's pixels count this much more in the VAE's loss: on an 8-clip overfit it reached 24.5 dB after 300
# steps against 20.4 dB with equal weights (distill/RESULTS.md); with equal weights the CPU runs never left the
# backgrounds; the cpu size's VAE stage then reached 20.5 dB (16.1 dB before, 18.9 dB for each clip's mean frame).
VAE_FOREGROUND_WEIGHT = 10.0
SAMPLE_CLIPS, SAMPLE_FRAME_STRIDE = 4, 4  # rows and frame spacing of the sample strips


class CaptionClassifier(nn.Module):
    """Video (B, 3, F, H, W) in [-1, 1] -> logits per label (colour, shape, motion); 3D convs see the motion."""

    def __init__(self, width: int = 32):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv3d(3, width, 3, stride=(1, 2, 2), padding=1), nn.SiLU(),
            nn.Conv3d(width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv3d(2 * width, 2 * width, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool3d(1), nn.Flatten(),
        )
        self.heads = nn.ModuleList([nn.Linear(2 * width, len(v)) for v in LABELS.values()])

    def forward(self, video: torch.Tensor) -> list[torch.Tensor]:
        h = self.body(video)
        return [head(h) for head in self.heads]


def train_classifier(videos: SyntheticVideos, steps: int, batch: int, device: torch.device) -> CaptionClassifier:
    torch.manual_seed(0)
    model = CaptionClassifier().to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(steps):
        data = videos.batch(torch.randint(len(videos), (batch,), generator=gen).tolist())
        logits = model(data["video"].to(device))
        loss = sum(F.cross_entropy(lg, data["labels"][:, i].to(device)) for i, lg in enumerate(logits))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: CaptionClassifier, video: torch.Tensor, labels: torch.Tensor, batch: int = 32) -> dict:
    """Per-label and all-three-right accuracy of the classifier on videos (B, 3, F, H, W)."""
    preds = []
    for chunk in video.split(batch):
        preds.append(torch.stack([lg.argmax(-1).cpu() for lg in model(chunk.to(next(model.parameters()).device))], 1))
    right = torch.cat(preds) == labels
    out = {name: right[:, i].float().mean().item() for i, name in enumerate(LABELS)}
    out["all"] = right.all(1).float().mean().item()
    return out


def read_log(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]


def ema_decay(decay: float, steps: int) -> float:
    """`decay`, shortened for short runs. Every export is the EMA of the weights, which starts at the initial weights
    and still holds decay**steps of them at the end: 0.999 over 320 steps exports a model that is 73% its random
    initialisation (a VAE that decodes every latent to the same grey video). Capped so at most e**-8 is left."""
    return max(0.0, min(decay, 1.0 - 8.0 / steps))


def train_vae(out: Path, s: dict) -> Path:
    """Train the VAE of size `s` (a SIZES entry); returns its folder."""
    synthetic = {"count": s["clips"], "seed": 0, "frames": s["frames"], "height": s["pixels"], "width": s["pixels"]}
    optim = {"lr": s["vae_lr"], "warmup_steps": min(20, s["vae_steps"] // 10),
             "ema_decay": ema_decay(0.999, s["vae_steps"])}
    return train(TrainConfig(task="vae", output_dir=str(out / "vae"), steps=s["vae_steps"], model=s["vae"],
                             synthetic=synthetic, batch_size=s.get("vae_batch", s["batch"]), optim=optim,
                             foreground_weight=VAE_FOREGROUND_WEIGHT,
                             log_every=max(1, s["vae_steps"] // 50), save_every=10**9))


@torch.no_grad()
def reconstruct(vae: WanVAE, video: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """decode(encode(video)): (B, 3, F, H, W) in [-1, 1] -> the same layout and range, float32 on the CPU."""
    return torch.cat([vae.decode(vae.encode(v.to(vae.device, vae.dtype))).cpu() for v in video.split(batch)])


def generated_videos(pipe: Pipeline, captions: list[str], steps: int, batch: int = 32) -> torch.Tensor:
    """The pipeline's videos for `captions` at a step budget as (B, 3, F, H, W) float32 in [-1, 1] (its frames are
    (B, F, H, W, 3) uint8), the classifier's layout."""
    out = []
    for start in range(0, len(captions), batch):
        frames = pipe.generate(captions[start:start + batch], steps=steps, seed=start)
        out.append(torch.from_numpy(frames).permute(0, 4, 1, 2, 3).float() / 127.5 - 1)
    return torch.cat(out)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Peak signal-to-noise ratio in dB of videos in [-1, 1] (peak-to-peak 2)."""
    return 10 * math.log10(4 / max(F.mse_loss(a.float(), b.float()).item(), 1e-10))


def reconstruction_quality(video: torch.Tensor, recon: torch.Tensor) -> dict:
    """PSNR of `recon` and of the baseline that shows each clip's mean frame throughout (it knows where the shape
    goes but not when): a VAE below the baseline has not learned to code the moving shape."""
    return {"psnr_db": psnr(recon, video), "mean_frame_psnr_db": psnr(video.mean(2, keepdim=True).expand_as(video),
                                                                      video)}


def write_strip(path: Path, video: torch.Tensor) -> None:
    """A PNG of the first SAMPLE_CLIPS clips of `video` (B, 3, F, H, W) in [-1, 1], one per row, every
    SAMPLE_FRAME_STRIDE-th frame left to right."""
    frames = to_uint8_frames(video[:SAMPLE_CLIPS, :, ::SAMPLE_FRAME_STRIDE])  # (b, f, H, W, 3)
    b, f, h, w, _ = frames.shape
    grid = frames.transpose(0, 2, 1, 3, 4).reshape(b * h, f * w, 3)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(ImageEncoder("png").encode(grid))


def run(out: Path, size: str, scale: float = 1.0, vae_from: Path | None = None) -> dict:
    """`scale` multiplies every training run's step count (a shorter run when device time is short); `vae_from`, a
    folder holding a trained `vae/` (an earlier run's VAE or any of its pipelines), replaces the VAE stage."""
    s = dict(SIZES[size])
    for key in ("vae_steps", "teacher_steps", "stage1_steps", "classifier_steps"):
        s[key] = max(1, round(s[key] * scale))
    out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    timings, t0 = {}, time.perf_counter()
    videos = SyntheticVideos(s["clips"], 0, s["frames"], s["pixels"], s["pixels"])
    common = {"batch_size": s["batch"], "log_every": max(1, s["teacher_steps"] // 50), "save_every": 10**9}

    if vae_from is None:
        vae_dir = train_vae(out, s)
    else:
        vae_dir, s["vae_steps"] = vae_from, 0
    timings["vae_s"] = time.perf_counter() - t0
    vae = WanVAE.from_pretrained(vae_dir, device=device)
    model_text_dim = s["model"]["text_dim"] if isinstance(s["model"], dict) else 32
    encoder = WordHashEncoder(model_text_dim, max_length=16)
    write_latent_shards(out / "data", videos, vae, encoder, shard_size=512, batch_size=32)
    timings["encode_s"] = time.perf_counter() - t0 - timings["vae_s"]

    t1 = time.perf_counter()
    teacher = train(TrainConfig(task="teacher", output_dir=str(out / "teacher"), steps=s["teacher_steps"],
                                model=s["model"], data=str(out / "data"), vae=str(vae_dir),
                                optim={"lr": s.get("teacher_lr", 3e-4), "warmup_steps": 50,
                                       "ema_decay": ema_decay(0.995, s["teacher_steps"])},
                                **{**common, "batch_size": s.get("teacher_batch", s["batch"])}))
    timings["teacher_s"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    student = train(TrainConfig(task="stage1", output_dir=str(out / "stage1"), steps=s["stage1_steps"],
                                data=str(out / "data"), vae=str(vae_dir), init_from=str(teacher),
                                optim={"lr": 1e-4, "warmup_steps": 50,
                                       "ema_decay": ema_decay(0.995, s["stage1_steps"])},
                                stage1={"bidirectional_prob": 0.25}, **common))
    timings["stage1_s"] = time.perf_counter() - t1

    t1 = time.perf_counter()
    classifier = train_classifier(videos, s["classifier_steps"], s["batch"], device)
    held_out = SyntheticVideos(s["eval_prompts"], 1, s["frames"], s["pixels"], s["pixels"])
    data = held_out.batch(list(range(len(held_out))))
    recon = reconstruct(vae, data["video"])
    samples = out / "samples"
    samples.mkdir(parents=True, exist_ok=True)
    (samples / "captions.txt").write_text("\n".join(data["captions"][:SAMPLE_CLIPS]) + "\n")
    write_strip(samples / "real.png", data["video"])
    write_strip(samples / "vae.png", recon)
    trained = ("vae_steps", "teacher_steps", "stage1_steps", "classifier_steps")
    results = {"size": size, "scale": scale, "vae_from": vae_from and str(vae_from),
               "steps": {k: s[k] for k in trained},
               "device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
               "vae_reconstruction": reconstruction_quality(data["video"], recon),
               "classifier_on_real": accuracy(classifier, data["video"], data["labels"]),
               "classifier_on_vae_reconstructions": accuracy(classifier, recon, data["labels"]),
               "student": {}}
    timings["classifier_s"] = time.perf_counter() - t1
    t1 = time.perf_counter()
    for name, folder in (("student", student), ("teacher_as_flow_map", teacher)):
        pipe = Pipeline.load(folder, device=device)
        table = {}
        for steps in s["eval_steps"] if name == "student" else s["eval_steps"][-1:]:
            video = generated_videos(pipe, data["captions"], steps)
            write_strip(samples / f"{name.split('_')[0]}-{steps}.png", video)
            table[str(steps)] = accuracy(classifier, video, data["labels"])
        results[name] = table
    timings["evaluation_s"] = time.perf_counter() - t1
    timings["total_s"] = time.perf_counter() - t0
    results["timings"] = timings
    logs = {task: read_log(out / task) for task in ("vae", "teacher", "stage1")
            if (out / task / "log.jsonl").is_file()}  # no vae log when the VAE was reused
    results["throughput"] = {task: {k: max(r[k] for r in log) for k in ("samples_per_s", "tokens_per_s", "memory_gb")}
                             for task, log in logs.items()}
    results["final_loss"] = {task: log[-1]["loss"] for task, log in logs.items()}
    curves = {task: [[r["step"], r["loss"]] for r in log] for task, log in logs.items()}
    (out / "curves.json").write_text(json.dumps(curves))
    plot(curves, out / "curves.png")
    (out / "results.json").write_text(json.dumps(results, indent=2))
    (out / "results.md").write_text(table_markdown(results))
    return results


def plot(curves: dict, path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return  # curves.json has the numbers
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3))
    for ax, (task, points) in zip(axes, curves.items()):
        ax.plot(*zip(*points))
        ax.set_title(task)
        ax.set_xlabel("step")
        ax.set_yscale("log")
    fig.tight_layout()
    fig.savefig(path)


def table_markdown(results: dict) -> str:
    q = results["vae_reconstruction"]
    lines = [f"Device: {results['device']}, size {results['size']}.", "",
             f"VAE reconstruction of held-out clips: PSNR {q['psnr_db']:.1f} dB (each clip's mean frame: "
             f"{q['mean_frame_psnr_db']:.1f} dB).", ""]
    if q["psnr_db"] < q["mean_frame_psnr_db"]:
        lines += ["**The VAE codes clips worse than their mean frame: every generated video goes through its decoder, "
                  "so the rows below say little about the models.**", ""]
    lines += ["| model | steps | colour | shape | motion | all three |", "|---|---|---|---|---|---|"]
    rows = [("real videos", "-", results["classifier_on_real"]),
            ("VAE reconstructions", "-", results["classifier_on_vae_reconstructions"])]
    rows += [("stage-1 student", k, v) for k, v in results["student"].items()]
    rows += [("teacher (r = t, Euler)", k, v) for k, v in results["teacher_as_flow_map"].items()]
    for name, steps, acc in rows:
        lines.append(f"| {name} | {steps} | {acc['colour']:.2f} | {acc['shape']:.2f} | {acc['motion']:.2f} | "
                     f"{acc['all']:.2f} |")
    lines += ["", "| task | samples/s | tokens/s | peak memory (GB) | final loss |", "|---|---|---|---|---|"]
    for task, t in results["throughput"].items():
        lines.append(f"| {task} | {t['samples_per_s']:.1f} | {t['tokens_per_s']:.0f} | {t['memory_gb']:.2f} | "
                     f"{results['final_loss'][task]:.4f} |")
    lines += ["", "Timings (s): " + ", ".join(f"{k} {v:.1f}" for k, v in results["timings"].items())]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m distill.experiment", description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path)
    parser.add_argument("--size", choices=list(SIZES), default="gpu",
                        help="gpu (one GPU), cpu (2 cores, the default model), tiny (CPU smoke test)")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every training run's steps")
    parser.add_argument("--vae", type=Path, help="reuse this trained VAE (a folder holding vae/), no VAE stage")
    args = parser.parse_args(argv)
    results = run(args.out, args.size, args.scale, args.vae)
    print((args.out / "results.md").read_text())
    print(json.dumps(results["timings"]))


if __name__ == "__main__":
    main()
