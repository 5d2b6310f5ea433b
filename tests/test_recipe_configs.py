"""Every `configs/*.yaml` loads through the typed Config (a new file is covered automatically), names a
model and data source that exist, and the paper's recipe configs hold the paper's numbers."""

import glob
import os

import pytest
import yaml

from xr_jax import config as config_lib
from xr_jax.data import sources
from xr_jax.models import presets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "*.yaml")))


def test_there_are_configs():
    names = {os.path.basename(p) for p in CONFIGS}
    assert {"tiny.yaml", "x_reasoner_sft.yaml", "x_reasoner_med_sft.yaml"} <= names, names


def _load(path):
    """As the CLI loads it: a file with a `train` section is a training run (fully validated), others
    (e.g. eval) skip the training checks."""
    with open(path) as f:
        training = "train" in (yaml.safe_load(f) or {})
    return config_lib.load(path, validate=False).validate(training=training)


@pytest.mark.parametrize("path", CONFIGS, ids=os.path.basename)
def test_config_loads_and_names_real_things(path):
    cfg = _load(path)
    assert cfg.model.preset in presets.PRESETS, cfg.model.preset
    model = presets.preset(cfg.model.preset, dtype=cfg.model.dtype, remat=cfg.model.remat)
    assert cfg.data.source in ("random", "synthetic") or cfg.data.source in sources.FORMATS, cfg.data.source
    assert len(cfg.mesh.shape) == 3 and cfg.mesh.shape.count(-1) <= 1
    assert cfg.train.batch_size % cfg.train.microbatches == 0
    assert cfg.train.seq_len <= model.text.max_position_embeddings
    # what a user writes on the command line round-trips
    assert config_lib.from_dict(config_lib.Config, config_lib.to_dict(cfg)) == cfg


# [paper] X-Reasoner §2.3 / App. B.1 (reference: x_reasoner_recipe.md §3.1)
PAPER_SFT = {
    "optim.lr": 1e-5, "optim.weight_decay": 0.0, "optim.b1": 0.9, "optim.b2": 0.999,
    "optim.schedule": "step_decay", "optim.decay_per_epoch": 0.8, "optim.warmup_steps": 0,
    "train.epochs": 4, "train.batch_size": 128, "train.seq_len": 4096, "train.freeze_vision": True,
    "data.source": "openthoughts",
}


@pytest.mark.parametrize("name", ["x_reasoner_sft.yaml", "x_reasoner_sft_3b.yaml", "x_reasoner_sft_text.yaml",
                                  "x_reasoner_med_sft.yaml"])
def test_sft_recipes_hold_the_paper_numbers(name):
    cfg = config_lib.load(os.path.join(ROOT, "configs", name))
    for key, want in PAPER_SFT.items():
        section, field = key.split(".")
        assert getattr(getattr(cfg, section), field) == want, (name, key)


def test_recipe_models():
    expected = {"x_reasoner_sft.yaml": "qwen2.5-vl-7b", "x_reasoner_med_sft.yaml": "qwen2.5-vl-7b",
                "x_reasoner_sft_3b.yaml": "qwen2.5-vl-3b", "x_reasoner_sft_text.yaml": "qwen2.5-7b"}
    for name, preset in expected.items():
        cfg = config_lib.load(os.path.join(ROOT, "configs", name))
        assert cfg.model.preset == preset and cfg.model.path is None, name
        shape = presets.preset(preset).text
        assert cfg.model.vocab_size == shape.vocab_size, name  # a preset run has the checkpoint's shape
    assert presets.preset("qwen2.5-7b").vision is None


# docs/recipe.md: the table of every recipe value, checked against the configs row by row.
RECIPE_DOC = os.path.join(ROOT, "docs", "recipe.md")
CONFIG_GROUPS = {"SFT": ["sft", "sft_3b", "sft_text", "med_sft"], "GRPO": ["grpo", "med_grpo"]}
LABELS = ("[paper]", "[xr_jax default]", "[inference]")
# Memory layout and run plumbing: set in the recipe configs but not recipe values.
NOT_RECIPE = {"train.microbatches", "train.loss_chunk", "train.nan_patience", "grpo.microbatches", "eval.sources",
              "eval.output_dir", "eval.batch_size"}


def _config_file(name):
    return "eval_paper.yaml" if name == "eval" else f"x_reasoner_{name}.yaml"


def recipe_rows():
    """(config file, dotted key, xr_jax value cell, label cell) per config named in each keyed row."""
    import re

    rows = []
    with open(RECIPE_DOC) as f:
        lines = [line for line in f if line.startswith("| ") and not line.startswith("| stage")]
    for line in lines:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
        assert len(cells) == 7, line
        _, configs, key, _, value, label, _ = cells
        assert label in LABELS, line
        if not re.fullmatch(r"`[a-z_]+\.[a-z_0-9]+`", key):
            continue  # a row about code, not a config key
        names = [n for token in configs.split() for n in CONFIG_GROUPS.get(token, [token])]
        for name in names:
            rows.append((_config_file(name), key.strip("`"), value, label))
    return rows


def test_recipe_doc_values_match_the_configs():
    rows = recipe_rows()
    assert len(rows) > 150, len(rows)
    loaded = {}
    for file, key, cell, _ in rows:
        if file not in loaded:
            loaded[file] = _load(os.path.join(ROOT, "configs", file))
        section, field = key.split(".")
        actual = getattr(getattr(loaded[file], section), field)
        want = yaml.safe_load(cell.strip("`"))
        if isinstance(actual, float):
            assert float(want) == actual, (file, key, want, actual)
        else:
            assert config_lib.to_dict(actual) == want, (file, key, want, actual)  # tuples as lists, sections as dicts


def test_recipe_doc_covers_every_recipe_key_of_the_configs():
    documented = {(file, key) for file, key, _, _ in recipe_rows()}
    for file in {file for file, _ in documented}:
        with open(os.path.join(ROOT, "configs", file)) as f:
            tree = yaml.safe_load(f)
        for section in ("optim", "train", "grpo", "eval"):
            for field in tree.get(section) or {}:
                key = f"{section}.{field}"
                assert key in NOT_RECIPE or (file, key) in documented, f"docs/recipe.md has no row for {key} of {file}"
