"""`xr-jax eval`: a tiny checkpoint on fixture benchmarks through the command line (table, predictions,
results), `--rescore` reproducing the metrics without a model, the paper config loading, user errors."""

import json
import os

import pytest

from tests import eval_fixtures as fx
from tests.tiny_checkpoint import write_tiny_checkpoint
from xr_jax.cli import commands as cli
from xr_jax import config as config_lib

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "eval")
CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "eval_paper.yaml")


def test_paper_config_loads_without_training_keys():
    cfg = config_lib.load(CONFIG, ["model.path=/ckpt"], validate=False).validate(training=False)
    assert cfg.eval.validate() is cfg.eval and len(cfg.eval.benchmarks) == 15 and cfg.eval.max_tokens == 4096
    with pytest.raises(config_lib.ConfigError, match=r"set train.epochs \(passes over the data\) or train.steps"):
        cfg.validate()


def test_eval_tiny_checkpoint_then_rescore(tmp_path, capsys):
    model_dir = str(tmp_path / "hf")
    write_tiny_checkpoint(model_dir, seed=2)
    out = tmp_path / "out"
    (tmp_path / "eval.yaml").write_text(json.dumps({  # JSON is YAML
        "model": {"path": model_dir},
        "mesh": {"shape": [4, 2, 1]},
        "eval": {
            "benchmarks": ["gsm8k"],
            "sources": {"gsm8k": {"path": os.path.join(FIXTURES, "gsm8k_test.jsonl"), "limit": 3},
                        "mmmu_val": {"path": fx.write_mmmu(str(tmp_path / "data"))}},
            "output_dir": str(out), "max_tokens": 40, "max_answer": 8, "batch_size": 4, "score_workers": 1,
            # the bare question keeps byte-level prompts short (fast on CPU)
            "mc_template": "plain", "math_template": "plain",
        },
    }))
    argv = ["eval", "--config", str(tmp_path / "eval.yaml"), "eval.benchmarks=[gsm8k,mmmu_val]"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert "benchmark" in printed and "unparsable %" in printed
    table = [line.split() for line in printed.splitlines() if line.startswith(("gsm8k", "mmmu_val"))]
    assert [(row[0], row[1]) for row in table] == [("gsm8k", "3"), ("mmmu_val", "3")]  # name, n
    records = [json.loads(line) for line in open(out / "predictions.jsonl")]
    assert sorted({(r["benchmark"], r["id"]) for r in records}) == sorted((r["benchmark"], r["id"]) for r in records)
    assert len(records) == 6 and all(1 <= r["num_tokens"] <= 40 for r in records)
    # A random model never closes </think> itself: the forced exit writes it after 40 - 8 - 8 thinking tokens.
    assert any(r["forced"] and "</think>" in r["response"] for r in records)
    results = json.load(open(out / "results.json"))
    assert (out / "results.md").read_text().startswith("| benchmark |")
    assert results["info"]["model"] == model_dir and results["info"]["max_tokens"] == 40

    # --rescore: no model, same metrics from predictions.jsonl alone
    assert cli.main(["eval", "--rescore", str(out / "predictions.jsonl"), f"eval.output_dir={tmp_path / 're'}",
                     "eval.score_workers=1"]) == 0
    assert json.load(open(tmp_path / "re" / "results.json"))["metrics"] == results["metrics"]


@pytest.mark.parametrize("argv, message", [
    (["eval", "eval.benchmarks=[gsm8k]"], "set model.path"),
    (["eval", "model.path=/x", "eval.benchmarks=[no_such_bench]"], "no_such_bench"),
    (["eval", "model.path=/x"], "eval.benchmarks is empty"),
    (["eval", "--rescore", "/no/such/predictions.jsonl"], "does not exist"),
    (["eval", "model.path=/x", "eval.benchmark=[gsm8k]"], "did you mean 'eval.benchmarks'"),
])
def test_eval_user_errors(argv, message, capsys):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and err[0].startswith("xr-jax eval: error:")
