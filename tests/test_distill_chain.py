"""distill/h100.sh, the documented command behind distill/RESULTS.md, end to end at the tiny size (~20 s)."""

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_the_whole_chain_script_runs_and_evaluates_every_student(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    done = subprocess.run(["bash", "distill/h100.sh", str(out), "tiny"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    for task in ("stage2", "consistency"):  # the configs, retargeted at OUT
        config = json.loads((out / f"{task}.json").read_text())
        assert config["output_dir"] == f"{out}/{task}" and config["init_from"] == f"{out}/stage1/model"
        assert (out / task / "model" / "transformer" / "config.json").is_file()
    report = json.loads((out / "evaluation.json").read_text())
    assert {(r["model"], r["steps"]) for r in report["rows"]} == {
        (m, s) for m in ("stage-1", "stage-2", "consistency") for s in (1, 2)}
    assert (out / "results.md").read_text().startswith("Device: cpu, size tiny.")
