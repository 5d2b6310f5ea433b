"""`xr-jax demo --quick`: the README's main command runs end to end and writes what it promises."""

import json
import os

from xr_jax import cli


def test_demo_quick_runs_every_stage(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert cli.main(["demo", "--quick", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "| SFT+GRPO" in printed and "image acc" in printed and "image restates" in printed and "transcribes" in printed
    for stage in ("base", "sft", "grpo"):
        assert os.path.isfile(os.path.join(out, stage, "metrics.jsonl"))
        assert os.path.isfile(os.path.join(out, stage, "model", "model_config.json"))
        assert os.listdir(os.path.join(out, stage, "checkpoints"))
    assert os.path.getsize(os.path.join(out, "curves.png")) > 10_000
    results = json.load(open(os.path.join(out, "results.json")))
    assert set(results["results"]) == {"base", "sft", "grpo"}
    # every model has every column, and every column is explained in the table's legend
    assert all(set(row) == set(results["columns"]) for row in results["results"].values())
    assert all(0.0 <= v <= 1.0 for row in results["results"].values() for v in row.values())
    assert all(f"- {text}" in printed for text in results["columns"].values())
    # the GRPO stage logs its reward components apart: total = math + 0.5 x format, step by step
    for line in open(os.path.join(out, "grpo", "metrics.jsonl")):
        r = json.loads(line)
        assert abs(r["reward_mean"] - (r["accuracy"] + 0.5 * r["reward_format"])) < 1e-6
