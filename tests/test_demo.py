"""`xr-jax demo --quick`: the README's main command runs end to end and writes what it promises."""

import json
import os

from xr_jax import cli


def test_demo_quick_runs_every_stage(tmp_path, capsys):
    out = str(tmp_path / "demo")
    assert cli.main(["demo", "--quick", "--out", out]) == 0
    printed = capsys.readouterr().out
    assert "| SFT+GRPO" in printed and "image acc" in printed and "image read" in printed
    for stage in ("base", "sft", "grpo"):
        assert os.path.isfile(os.path.join(out, stage, "metrics.jsonl"))
        assert os.path.isfile(os.path.join(out, stage, "model", "model_config.json"))
        assert os.listdir(os.path.join(out, stage, "checkpoints"))
    assert os.path.getsize(os.path.join(out, "curves.png")) > 10_000
    results = json.load(open(os.path.join(out, "results.json")))
    assert set(results["accuracy"]) == {"base", "sft", "grpo"}
    assert all(0.0 <= v <= 1.0 for row in results["accuracy"].values() for v in row.values())
    assert set(results["image_read"]) == {"base", "sft", "grpo"} and 0.0 <= results["base_transcription"] <= 1.0
