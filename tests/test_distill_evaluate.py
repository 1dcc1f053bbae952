import json
import shutil

import torch

from distill.evaluate import frechet_distance, main
from streamgen import CausalWanTransformer, preset
from streamgen.pipeline import Pipeline, PipelineSettings
from streamgen.text import WordHashEncoder
from streamgen.vae import WanVAE
from streamgen.vae import preset as vae_preset


def test_frechet_distance_of_gaussians():
    """Same covariance: the squared mean distance; identical sets: 0; 1-d: (m1-m2)^2 + (s1-s2)^2."""
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 3, generator=gen, dtype=torch.float64)
    assert abs(frechet_distance(a, a)) < 1e-6
    assert abs(frechet_distance(a, a + torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)) - 5.0) < 1e-6
    x = torch.randn(4000, 1, generator=gen, dtype=torch.float64)
    x = (x - x.mean()) / x.std(correction=0)
    assert abs(frechet_distance(x, 3 * x + 1) - (1 + 4)) < 1e-6


def test_tiny_evaluation_of_three_students(tmp_path, capsys):
    """Random tiny students in pipeline folders laid out as the experiment and the trainer write them."""
    torch.manual_seed(0)
    pipe = Pipeline(CausalWanTransformer(preset("tiny")), WanVAE(vae_preset("tiny")), WordHashEncoder(32, 16),
                    PipelineSettings(height=32, width=32, num_frames=13, fps=8))
    pipe.save_pretrained(tmp_path / "stage1" / "model")
    for name in ("stage2", "consistency"):
        shutil.copytree(tmp_path / "stage1" / "model", tmp_path / name / "model")
    (tmp_path / "results.json").write_text(json.dumps({"size": "tiny", "steps": {"classifier_steps": 1}}))
    report = main([str(tmp_path), "--budgets", "1", "2", "--drift", "2", "3"])
    assert [(r["model"], r["steps"]) for r in report["rows"]] == [
        (m, s) for m in ("stage-1", "stage-2", "consistency") for s in (1, 2)]
    for r in report["rows"]:
        assert 0 <= r["accuracy"]["all"] <= 1 and r["frechet"] >= -1e-6 and r["frame_difference"] >= 0
        assert set(r["drift"]) == {"2", "3"}
    assert report["real"]["drift_window_frames"] == 8  # two latent frames
    table = (tmp_path / "evaluation.md").read_text()
    assert "| consistency | 2 |" in table and "| real videos |" in table
    assert (tmp_path / "classifier.pt").is_file()
