"""`xr-jax plot`: metrics.jsonl of runs -> one subplot per metric in a PNG; resumed-run steps; user errors."""

import json

import numpy as np
import pytest
from PIL import Image

from xr_jax.cli import commands as cli
from xr_jax.cli import plot


def write_run(path, records):
    path.mkdir(parents=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return str(path)


def test_resumed_steps_keep_the_last_line_and_skip_non_numbers(tmp_path):
    run = write_run(tmp_path / "run", [
        {"step": 1, "loss": 3.0, "lr": 1e-5}, {"step": 2, "loss": 2.5, "lr": 1e-5, "note": "x", "skipped": False},
        {"step": 3, "loss": 9.0},  # lost at the preemption: the run resumed from step 2
        {"step": 3, "loss": 2.0, "lr": 2e-5}, {"step": 4, "loss": 1.5, "reward_mean": 0.25},
    ])
    curves = plot.read_metrics(run)
    assert curves == {"loss": ([1, 2, 3, 4], [3.0, 2.5, 2.0, 1.5]), "lr": ([1, 2, 3], [1e-5, 1e-5, 2e-5]),
                      "reward_mean": ([4], [0.25])}


def test_plot_two_runs_to_png(tmp_path, capsys):
    a = write_run(tmp_path / "a", [{"step": s, "loss": 1 / s, "reward_mean": s / 10} for s in range(1, 21)])
    b = write_run(tmp_path / "b", [{"step": s, "loss": 2 / s, "step_time": 0.1} for s in range(1, 11)])
    out = tmp_path / "plots" / "curves.png"
    assert plot.plot_runs([a, b], None, str(out)) == ["loss", "reward_mean", "step_time"]
    with Image.open(out) as img:
        assert img.format == "PNG" and img.size == (1500, 320)  # 3 subplots of 5 x 3.2 in at 100 dpi

    assert cli.main(["plot", a, b, "--metrics", "reward_mean,loss", "--out", str(tmp_path / "two.png")]) == 0
    assert "2 metrics: reward_mean, loss" in capsys.readouterr().out
    with Image.open(tmp_path / "two.png") as img:
        assert img.size == (1000, 320) and len(np.unique(np.asarray(img.convert("L")))) > 10  # drawn, not blank


@pytest.mark.parametrize("case, message", [
    ("missing", "has no metrics.jsonl"),
    ("unknown_metric", "no run logged rewrd; the runs have: loss"),
    ("bad_line", "metrics.jsonl:2: not a metrics record with a 'step'"),
])
def test_plot_user_errors(tmp_path, capsys, case, message):
    good = write_run(tmp_path / "good", [{"step": 1, "loss": 1.0}])
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n{"loss": 2.0}\n')
    argv = {"missing": ["plot", good, str(tmp_path / "nope")], "unknown_metric": ["plot", good, "--metrics", "rewrd"],
            "bad_line": ["plot", str(bad)]}[case]
    assert cli.main([*argv, "--out", str(tmp_path / "x.png")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("xr-jax plot: error:")
    assert not (tmp_path / "x.png").exists()
