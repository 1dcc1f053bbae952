import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from distill.data import write_latent_shards
from distill.synthetic import SyntheticVideos
from streamgen import CausalWanTransformer, preset
from streamgen.model import load_transformer, save_transformer
from streamgen.pipeline import Pipeline
from streamgen.text import WordHashEncoder
from streamgen.vae import WanVAE
from streamgen.vae import preset as vae_preset

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A random tiny VAE, 12 encoded synthetic clips (32x32, 29 frames = 8 latent frames) and a random teacher."""
    root = tmp_path_factory.mktemp("distill")
    torch.manual_seed(0)
    vae = WanVAE(vae_preset("tiny")).eval()
    vae.save_pretrained(root / "vae" / "vae")
    write_latent_shards(root / "data", SyntheticVideos(12, seed=3, height=32, width=32), vae, WordHashEncoder(32, 16),
                        shard_size=5)
    save_transformer(CausalWanTransformer(preset("tiny").model_copy(update={"gate_value": 0.0})), root / "teacher")
    return root


def torchrun(config: dict, root: Path, *extra: str) -> None:
    path = root / f"{Path(config['output_dir']).name}.json"
    path.write_text(json.dumps(config))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "distill.train", str(path), *extra]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]


def stage1_config(root: Path, name: str) -> dict:
    return {"task": "stage1", "output_dir": str(root / name), "steps": 4, "batch_size": 2, "seed": 5,
            "data": str(root / "data"), "vae": str(root / "vae"), "init_from": str(root / "teacher"),
            "log_every": 1, "save_every": 2, "optim": {"lr": 1e-3, "warmup_steps": 2},
            "stage1": {"bidirectional_prob": 0.5}}


def final_state(run: Path) -> dict:
    latest = (run / "checkpoints" / "latest").read_text()
    return torch.load(run / "checkpoints" / latest / "state.pt", weights_only=True)


def flat(tree, prefix=""):
    if isinstance(tree, dict):
        for k, v in tree.items():
            yield from flat(v, f"{prefix}{k}.")
    elif isinstance(tree, (list, tuple)):
        for i, v in enumerate(tree):
            yield from flat(v, f"{prefix}{i}.")
    else:
        yield prefix, tree


def test_two_process_kill_and_resume_is_bit_identical(setup):
    torchrun(stage1_config(setup, "whole"), setup)
    torchrun(stage1_config(setup, "killed"), setup, "--kill-after", "2")
    assert (setup / "killed" / "checkpoints" / "latest").read_text() == "step-0000002"
    assert not (setup / "killed" / "model").exists()  # it died before finishing
    torchrun(stage1_config(setup, "killed"), setup)

    whole, resumed = final_state(setup / "whole"), final_state(setup / "killed")
    assert whole["step"] == resumed["step"] == 4 and whole["loader"] == resumed["loader"]
    a, b = dict(flat({k: whole[k] for k in ("model", "ema", "optimizer")})), dict(
        flat({k: resumed[k] for k in ("model", "ema", "optimizer")}))
    assert a.keys() == b.keys() and len(a) > 100
    for k in a:
        if isinstance(a[k], torch.Tensor):
            assert torch.equal(a[k], b[k]), k
        else:
            assert a[k] == b[k], k
    first = final_state(setup / "whole")["model"]
    teacher = load_transformer(setup / "teacher", torch.float32).state_dict()
    assert any(not torch.equal(first["model." + k], v) for k, v in teacher.items())  # it did train

    log = [json.loads(line) for line in (setup / "killed" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2, 3, 4]
    assert all(r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 for r in log)


def test_trained_checkpoint_loads_in_the_engine_and_generates(setup):
    folder = setup / "whole" / "model"
    if not folder.exists():
        pytest.skip("needs the training run of the previous test")
    ema = final_state(setup / "whole")["ema"]
    loaded = load_transformer(folder, torch.float32)
    assert all(torch.equal(v, ema["model." + k]) for k, v in loaded.state_dict().items())
    pipe = Pipeline.load(folder, device="cpu")
    assert (pipe.settings.height, pipe.settings.width, pipe.settings.num_frames) == (32, 32, 29)
    frames = pipe.generate("a red square moving left on a black background", steps=2, seed=0)
    assert frames.shape == (1, 29, 32, 32, 3) and frames.dtype == np.uint8 and frames.std() > 0
