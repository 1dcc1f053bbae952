import json

from distill.experiment import main


def test_tiny_experiment_runs_end_to_end(tmp_path, capsys):
    main([str(tmp_path), "--tiny"])
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["student"]) == {"1", "2"} and set(results["teacher_as_flow_map"]) == {"2"}
    for acc in [results["classifier_on_real"], *results["student"].values()]:
        assert set(acc) == {"colour", "shape", "motion", "all"} and all(0 <= v <= 1 for v in acc.values())
    curves = json.loads((tmp_path / "curves.json").read_text())
    assert set(curves) == {"vae", "teacher", "stage1"} and all(curves.values())
    assert "| stage-1 student | 1 |" in (tmp_path / "results.md").read_text()
    assert (tmp_path / "stage1" / "model" / "transformer" / "config.json").is_file()
