"""Every user mistake of issue 16's list ends `xr-jax` with exit 2 and one line on stderr that names the
problem (no traceback), and unwritable outputs are found at start, before a model is built or loaded.

Run through `cli.main` in this process: only what the command prints to stderr is captured (log records
go to pytest's handler), and the commands stop before any compilation, so the whole table takes seconds.
"""

import json
import os

import pytest

from tests.tiny_checkpoint import write_tiny_checkpoint
from xr_jax.checkpoints import training as checkpoint
from xr_jax.cli import commands as cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GSM8K = os.path.join(ROOT, "tests", "fixtures", "eval", "gsm8k_test.jsonl")


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    out = str(tmp_path_factory.mktemp("hf"))
    write_tiny_checkpoint(out)
    return out


def _sft(t, *extra):
    return ["sft", "--config", os.path.join(ROOT, "configs", "tiny_sft.yaml"), "train.steps=2",
            f"logging.dir={t}/log", "logging.progress=false", *extra]


def _eval(t, model, bench_file, *extra):
    return ["eval", f"model.path={model}", "eval.benchmarks=[gsm8k]", f"eval.output_dir={t}/eval",
            f"eval.sources={{gsm8k: {{path: {bench_file}}}}}", "eval.max_tokens=16", "eval.max_answer=4",
            "eval.score_workers=1", *extra]


def _write(path, text):
    with open(path, "w") as f:
        f.write(text)
    return str(path)


def _blocked(t):
    """A path whose parent is a regular file: no folder can be made there, whoever runs the test."""
    return os.path.join(_write(os.path.join(t, "a_file"), "x"), "out")


# (case, argv(tmp, model) -> list, what the one line must say)
CASES = [
    ("unusable_data", lambda t, m: _sft(t, "data.source=gsm8k", f"data.path={GSM8K}", "model.tokenizer=tiny"),
     "skipped: prompt_too_long="),
    ("schema_empty_jsonl", lambda t, m: _sft(t, "data.source=gsm8k", f"data.path={_write(f'{t}/e.jsonl', '')}",
                                             "model.tokenizer=tiny"), "found no JSON objects"),
    ("schema_wrong_format", lambda t, m: _sft(t, "data.source=gsm8k", "model.tokenizer=tiny",
                                              f"data.path={_write(f'{t}/w.jsonl', json.dumps({'foo': 1}))}"),
     "does not look like gsm8k: expected fields ['question', 'answer']"),
    ("benchmark_format", lambda t, m: _eval(t, m, _write(f"{t}/b.jsonl", json.dumps({"q": "x"}))),
     "gsm8k row 0 ({t}/b.jsonl:1): missing_field: no 'question'"),
    ("benchmark_bad_json_line", lambda t, m: _eval(t, m, _write(f"{t}/b.jsonl", open(GSM8K).readline() + "{oops\n")),
     "{t}/b.jsonl:2: not valid JSON"),
    ("predictions_bad_line", lambda t, m: ["eval", "--rescore", _write(f"{t}/p.jsonl", '{"benchmark": "gsm8k"}\n'),
                                           f"eval.output_dir={t}/re"], "{t}/p.jsonl:1: not a prediction record"),
    ("preset_huge", lambda t, m: _sft(t, "model.preset=huge"), "unknown model preset 'huge' (model.preset)"),
    ("sft_without_tokenizer", lambda t, m: _sft(t, "data.source=gsm8k", f"data.path={GSM8K}"),
     "a preset model has no tokenizer of its own: set model.tokenizer"),
    ("grpo_without_tokenizer", lambda t, m: ["grpo", "--config", os.path.join(ROOT, "configs", "tiny_grpo.yaml"),
                                             "model.tokenizer=null", f"logging.dir={t}/log"],
     "a preset model has no tokenizer of its own: set model.tokenizer"),
    ("permission_denied", lambda t, m: _sft(t, "checkpoint.dir=/sys/xr_jax_probe"),
     "checkpoint.dir '/sys/xr_jax_probe' is not writable"),
    ("checkpoint_dir_unwritable", lambda t, m: _sft(t, f"checkpoint.dir={_blocked(t)}"),
     "checkpoint.dir '{t}/a_file/out' is not writable"),
    ("logging_dir_unwritable", lambda t, m: _sft(t, f"logging.dir={_blocked(t)}"),
     "logging.dir '{t}/a_file/out' is not writable"),
    ("export_dir_unwritable", lambda t, m: _sft(t, f"train.export_dir={_blocked(t)}/model"),
     "the folder of train.export_dir '{t}/a_file/out' is not writable"),
    ("eval_output_unwritable", lambda t, m: _eval(t, m, GSM8K, f"eval.output_dir={_blocked(t)}"),
     "eval.output_dir '{t}/a_file/out' is not writable"),
    ("sample_output_unwritable", lambda t, m: ["sample", "--model", m, "--prompt", "hi",
                                               "--output", f"{_blocked(t)}/s.jsonl"],
     "--output '{t}/a_file/out/s.jsonl' cannot be written: its folder '{t}/a_file/out' is not writable"),
]


@pytest.mark.parametrize("case,argv,says", CASES, ids=[c[0] for c in CASES])
def test_user_error_is_one_line_and_exit_2(tmp_path, hf_model, capsys, case, argv, says):
    if case == "permission_denied" and not os.path.isdir("/sys"):
        pytest.skip("needs /sys (read-only for everyone) for a real PermissionError")
    t = str(tmp_path)
    assert cli.main(argv(t, hf_model)) == 2
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    # eval announces the model it loads; a bad benchmark file is found after that, nothing else is printed
    if case.startswith("benchmark_"):
        assert lines[0] == f"loading {hf_model}"
        lines = lines[1:]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"xr-jax {argv(t, hf_model)[0]}: error: ") and says.format(t=t) in lines[0], err
    if case.endswith("unwritable") or case == "permission_denied":
        # found at start: nothing was trained (no metrics), no model was loaded
        assert not os.path.exists(f"{t}/log/metrics.jsonl") and "loading" not in err


def test_checkpoint_error_of_the_checkpoint_module_is_a_user_error(tmp_path, capsys, monkeypatch):
    """checkpoint.CheckpointError (e.g. no readable checkpoint in checkpoint.dir) is one line and exit 2 like
    the model loader's ModelCheckpointError: which directories raise it is the checkpoint module's business."""
    def unreadable(self, *args, **kwargs):
        raise checkpoint.CheckpointError(f"no readable checkpoint: checkpoint step 1 in {self.directory} is unreadable")

    monkeypatch.setattr(checkpoint.Checkpointer, "restore", unreadable)
    t = str(tmp_path)
    assert cli.main(_sft(t, f"checkpoint.dir={t}/ck")) == 2
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"xr-jax sft: error: no readable checkpoint: checkpoint step 1 in {t}/ck is unreadable"]
