import json
import math

import numpy as np
import torch

from distill.experiment import (
    CaptionClassifier,
    ema_decay,
    generated_videos,
    main,
    psnr,
    reconstruct,
    reconstruction_quality,
    train_vae,
)
from distill.synthetic import SyntheticVideos
from distill.vae_train import INITIAL_LOGVAR, foreground_weights, init_for_training, vae_loss
from streamgen.pipeline import Pipeline
from streamgen.vae import Resample, WanVAE
from streamgen.vae import preset as vae_preset


def test_tiny_experiment_runs_end_to_end(tmp_path, capsys):
    main([str(tmp_path), "--size", "tiny"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["student"]) == {"1", "2"} and set(results["teacher_as_flow_map"]) == {"2"}
    for acc in [results["classifier_on_real"], *results["student"].values()]:
        assert set(acc) == {"colour", "shape", "motion", "all"} and all(0 <= v <= 1 for v in acc.values())
    assert set(results["vae_reconstruction"]) == {"psnr_db", "mean_frame_psnr_db"}
    curves = json.loads((tmp_path / "curves.json").read_text())
    assert set(curves) == {"vae", "teacher", "stage1"} and all(curves.values())
    assert "| stage-1 student | 1 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "stage1" / "model" / "transformer" / "config.json").is_file()
    for name in ("real", "vae", "student-1", "student-2", "teacher-2"):  # strips a person can look at
        assert (tmp_path / "samples" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # A second run reuses the first one's VAE instead of training one.
    again = tmp_path / "again"
    main([str(again), "--size", "tiny", "--vae", str(tmp_path / "stage1" / "model")])
    results = json.loads((again / "results.json").read_text())
    assert results["vae_from"] == str(tmp_path / "stage1" / "model") and results["steps"]["vae_steps"] == 0
    assert not (again / "vae").exists()
    assert set(json.loads((again / "curves.json").read_text())) == {"teacher", "stage1"}
    assert results["vae_reconstruction"] == json.loads((tmp_path / "results.json").read_text())["vae_reconstruction"]


def test_ema_of_a_short_run_keeps_almost_nothing_of_the_initial_weights():
    for steps in (1, 2, 10, 320, 800, 10**6):
        decay = ema_decay(0.999, steps)
        assert 0 <= decay <= 0.999 and decay**steps <= math.exp(-8) + 1e-12
    assert ema_decay(0.999, 10**6) == 0.999


def test_briefly_trained_vae_codes_clips_better_than_a_constant(tmp_path):
    """The experiment's VAE training, shrunk (100 steps, 16x16, 5 frames, ~6 s): what it exports (the EMA) must code
    the clips better than the dataset's mean colour and decode different clips differently. Exporting mostly the
    random initialisation (EMA decay 0.999 over a short run: 10.1 dB here, clips 0.008 apart) decodes every clip to the
    same grey texture."""
    torch.manual_seed(0)
    size = {"clips": 16, "pixels": 16, "frames": 5, "batch": 4, "vae_steps": 100, "vae_lr": 1e-3, "vae": "tiny"}
    vae = WanVAE.from_pretrained(train_vae(tmp_path, size))
    video = SyntheticVideos(16, 0, 5, 16, 16).batch(list(range(16)))["video"]
    recon = reconstruct(vae, video, batch=8)
    assert recon.shape == video.shape and recon.dtype == torch.float32 and recon.abs().max() <= 1
    constant = video.mean((0, 2, 3, 4), keepdim=True).expand_as(video)
    assert psnr(recon, video) > psnr(constant, video) + 0.5  # 14.0 dB vs 12.6 dB
    assert recon.std(0).mean() > 0.3 * video.std(0).mean(), "clips decode to different videos"  # 0.29 vs 0.45
    quality = reconstruction_quality(video, recon)
    assert quality["psnr_db"] == psnr(recon, video) and quality["mean_frame_psnr_db"] > psnr(constant, video)


def test_foreground_weights_single_out_the_shape_and_keep_the_loss_scale():
    video = torch.full((2, 3, 2, 4, 4), -0.5)
    video[0, 0, :, 1:3, 1:3] = 0.9  # a red 2x2 square in clip 0, clip 1 flat
    video[1, 2, 1] = -0.45  # within 0.1 of the background: not the shape
    w = foreground_weights(video, 10.0)
    square = torch.zeros(2, 1, 2, 4, 4, dtype=torch.bool)
    square[0, :, :, 1:3, 1:3] = True
    raw = torch.where(square, 10.0, 1.0)
    expected = raw / raw.mean(dim=(1, 2, 3, 4), keepdim=True)  # clip 0: 8 of 32 pixels -> mean 3.25; clip 1: 1
    torch.testing.assert_close(w, expected)
    torch.testing.assert_close(w.mean(dim=(1, 2, 3, 4)), torch.ones(2))


def test_vae_loss_with_equal_weights_is_l1_plus_mse():
    torch.manual_seed(0)
    vae = init_for_training(WanVAE(vae_preset("tiny")))
    video = SyntheticVideos(2, 0, 5, 16, 16).batch([0, 1])["video"]
    plain, _ = vae_loss(vae, video, torch.Generator().manual_seed(1), 0.0)
    weighted, _ = vae_loss(vae, video, torch.Generator().manual_seed(1), 0.0, foreground_weight=10.0)
    with torch.no_grad():
        z = vae.quant_conv(vae.encoder(video)).chunk(2, dim=1)
        noise = torch.randn(z[0].shape, generator=torch.Generator().manual_seed(1))
        recon = vae.decoder(vae.post_quant_conv(z[0] + (0.5 * z[1].clamp(-30, 20)).exp() * noise))
    error = recon - video
    torch.testing.assert_close(plain, error.abs().mean() + error.square().mean())
    torch.testing.assert_close(weighted, ((error.abs() + error.square()) * foreground_weights(video, 10.0)).mean())


def test_a_fresh_vae_starts_with_a_narrow_posterior_and_nearest_neighbour_time_resampling():
    torch.manual_seed(0)
    vae = init_for_training(WanVAE(vae_preset("tiny")))
    z = vae.config.z_dim
    assert torch.all(vae.quant_conv.weight[z:] == 0) and torch.all(vae.quant_conv.bias[z:] == INITIAL_LOGVAR)
    temporal = [m for m in vae.modules() if isinstance(m, Resample) and m.mode.endswith("3d")]
    assert {m.mode for m in temporal} == {"downsample3d", "upsample3d"}
    with torch.no_grad():
        for m in temporal:
            x = torch.randn(2, m.time_conv.weight.shape[1], 9, 4, 4)
            if m.mode == "downsample3d":  # frames 0, 2, 4, ...
                assert torch.equal(m._halve_frames(x, None, True), x[:, :, ::2])
            else:  # the first frame, then every frame twice
                twice = torch.cat([x[:, :, :1], x[:, :, 1:].repeat_interleave(2, dim=2)], dim=2)
                assert torch.equal(m._double_frames(x, None, True), twice)


def test_generated_videos_come_in_the_classifiers_layout_and_range():
    pipe = Pipeline.load(None, device="cpu")  # the built-in default model, 64x64
    captions = ["a red square moving left on a black background", "a blue circle bouncing on a gray background"]
    video = generated_videos(pipe, captions, steps=1, batch=1)
    frames = pipe.generate(captions[1:], steps=1, seed=1)  # (B, F, H, W, 3) uint8; batch=1 seeds clip i with i
    assert video.shape == (2, 3, frames.shape[1], 64, 64) and video.dtype == torch.float32
    assert -1 <= video.min() and video.max() <= 1
    expected = torch.from_numpy(np.ascontiguousarray(frames[0].transpose(3, 0, 1, 2))).float() / 127.5 - 1
    assert torch.equal(video[1], expected)
    logits = CaptionClassifier()(video)
    assert [lg.shape for lg in logits] == [(2, 6), (2, 3), (2, 6)]


def test_synthetic_batches_are_their_clips_stacked_also_when_cached():
    videos = SyntheticVideos(6, 3, 5, 16, 16)
    first, again = videos.batch([4, 1, 4]), videos.batch([4, 1, 4])
    assert torch.equal(first["video"], again["video"]) and first["video"].is_contiguous()
    assert torch.equal(first["video"][1], videos[1].video) and torch.equal(first["video"][2], videos[4].video)
    assert first["captions"][0] == videos[4].caption
