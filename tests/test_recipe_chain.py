"""The recipe as a user runs it, through the command line: a Hugging Face checkpoint directory with a real BPE
tokenizer -> SFT -> GRPO -> eval -> sample -> HF export, with no tokenizer settings anywhere (every stage finds
the tokenizer in the artefact before it), on the X-Reasoner recipe configs shrunk by overrides; transformers
then loads the export (tokenizer, image processor, model) and generates what `xr-jax sample` generated."""

import importlib.util
import json
import os

import numpy as np
import pytest
import torch

from tests.tiny_checkpoint import write_bpe_checkpoint
from xr_jax.cli import commands as cli
from xr_jax.checkpoints import convert
from xr_jax.data.tokenizer import TOKENIZER_FILES, load_tokenizer

ROOT = os.path.join(os.path.dirname(__file__), "..")
GSM8K = os.path.join(ROOT, "tests", "fixtures", "data", "gsm8k_test_50.jsonl")
ORZ = os.path.join(ROOT, "tests", "fixtures", "data", "orz_math_sample.json")
GSM8K_EVAL = os.path.join(ROOT, "tests", "fixtures", "eval", "gsm8k_test.jsonl")
SMALL = ["model.dtype=float32", "model.param_dtype=float32", "model.remat=none", "mesh.shape=[1,1,1]",
         "logging.progress=false"]
SYSTEM = "You are a careful math tutor."


def _files(path):
    return sorted(f for f in os.listdir(path) if os.path.isfile(os.path.join(path, f)))


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("chain") / "Qwen2.5-VL-tiny")
    texts = [row["question"] + "\n" + row["answer"] for row in map(json.loads, open(GSM8K))]
    write_bpe_checkpoint(path, texts)
    return path


def test_hf_checkpoint_sft_grpo_eval_sample_export(hf_dir, tmp_path, capsys):
    src_tok = load_tokenizer(hf_dir)
    assert 512 < src_tok.vocab_size < 600 and len(src_tok.encode(" the answer")) < len(" the answer")  # merges
    sft_out, grpo_out, hf_out = (str(tmp_path / n) for n in ("sft_model", "final", "hf_export"))

    # stage 1: SFT straight from the HF directory (the recipe's first command)
    assert cli.main(["sft", "--config", os.path.join(ROOT, "configs", "x_reasoner_sft.yaml"), *SMALL,
                     f"model.path={hf_dir}", "data.source=gsm8k", f"data.path={GSM8K}", "train.epochs=null",
                     "train.steps_per_epoch=null", "train.steps=1", "train.batch_size=2", "train.microbatches=1",
                     "train.seq_len=512", "train.loss_chunk=256", f"logging.dir={tmp_path / 'sft_log'}",
                     f"train.export_dir={sft_out}"]) == 0
    assets = os.path.join(sft_out, convert.ASSETS_DIR)
    assert {"tokenizer.json", "tokenizer_config.json", "preprocessor_config.json", "config.json"} <= set(_files(assets))
    assert json.load(open(os.path.join(assets, "config.json"))) == json.load(open(os.path.join(hf_dir, "config.json")))

    # stage 2: GRPO from the SFT export: the tokenizer comes from its assets/
    assert cli.main(["grpo", "--config", os.path.join(ROOT, "configs", "x_reasoner_grpo.yaml"), *SMALL,
                     f"model.path={sft_out}", f"data.path={ORZ}", "train.steps=1", "train.batch_size=2",
                     "grpo.group_size=2", "grpo.max_new_tokens=8", "grpo.max_prompt_len=256", "grpo.microbatches=1",
                     "grpo.kl_coef=0", "grpo.gap_every=0", "grpo.reward_workers=1", "train.loss_chunk=256",
                     f"logging.dir={tmp_path / 'grpo_log'}",
                     f"train.export_dir={grpo_out}"]) == 0
    assert _files(os.path.join(grpo_out, convert.ASSETS_DIR)) == _files(assets)
    assert convert.load_tokenizer_for(grpo_out).encode("12 eggs") == src_tok.encode("12 eggs")

    # eval: the paper's config, one benchmark of 2 rows
    out = tmp_path / "eval"
    assert cli.main(["eval", "--config", os.path.join(ROOT, "configs", "eval_paper.yaml"), *SMALL[:4],
                     f"model.path={grpo_out}", "eval.benchmarks=[gsm8k]",
                     f"eval.sources={{gsm8k: {{path: {GSM8K_EVAL}, limit: 2}}}}", f"eval.output_dir={out}",
                     "eval.max_tokens=12", "eval.max_answer=4", "eval.batch_size=2", "eval.score_workers=1"]) == 0
    assert len((out / "predictions.jsonl").read_text().splitlines()) == 2
    capsys.readouterr()

    # sample: greedy, a chosen system message; a prompt past the model's 2048 positions is refused in one line
    samples = str(tmp_path / "samples.jsonl")
    prompt = "Janet has 3 apples and buys 4 more. How many apples does she have?"
    assert cli.main(["sample", "--model", grpo_out, "--prompt", prompt, "--system", SYSTEM, "--greedy",
                     "--max-new-tokens", "6", "--output", samples]) == 0
    (record,) = [json.loads(line) for line in open(samples)]
    assert cli.main(["sample", "--model", grpo_out, "--prompt", "eggs " * 2100, "--greedy"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) - err.index(next(e for e in err if "error" in e)) == 1 and "2048 positions" in err[-1]

    # export to Hugging Face: every config key of the source kept, world-readable files, tokenizer and processor
    assert cli.main(["convert", "--from", grpo_out, "--to-hf", hf_out]) == 0
    assert json.load(open(os.path.join(hf_out, "config.json"))) == json.load(open(os.path.join(hf_dir, "config.json")))
    umask = os.umask(0)
    os.umask(umask)
    assert {f: oct(os.stat(os.path.join(hf_out, f)).st_mode & 0o777) for f in _files(hf_out)} == {
        f: oct(0o666 & ~umask) for f in _files(hf_out)}
    assert {"tokenizer.json", "chat_template.jinja", "preprocessor_config.json", "model.safetensors"} <= set(
        _files(hf_out)) and set(_files(hf_out)) & set(TOKENIZER_FILES) == set(_files(hf_dir)) & set(TOKENIZER_FILES)

    from transformers import AutoImageProcessor, AutoTokenizer, Qwen2_5_VLForConditionalGeneration

    tok = AutoTokenizer.from_pretrained(hf_out)
    chat = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": prompt}]
    ids = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    ids = list(ids["input_ids"]) if isinstance(ids, dict) or hasattr(ids, "keys") else list(ids)
    assert ids == src_tok.encode(src_tok.apply_chat_template(chat, add_generation_prompt=True))
    if importlib.util.find_spec("torchvision") is not None:
        from transformers import AutoProcessor

        image_processor = AutoProcessor.from_pretrained(hf_out).image_processor
    else:  # transformers 5 builds the Qwen2.5-VL processor only with torchvision (for its video processor)
        image_processor = AutoImageProcessor.from_pretrained(hf_out)
    pixels = image_processor(images=[np.zeros((56, 84, 3), np.uint8)], return_tensors="np")
    assert pixels["image_grid_thw"].tolist() == [[1, 4, 6]]
    model = Qwen2_5_VLForConditionalGeneration.from_pretrained(hf_out, attn_implementation="eager").eval()
    with torch.no_grad():
        gen = model.generate(torch.tensor([ids]), max_new_tokens=6, do_sample=False,
                             eos_token_id=[src_tok.special.im_end, src_tok.special.endoftext])
    assert gen[0, len(ids):].tolist() == record["token_ids"]


def test_preset_model_exports_its_builtin_tokenizer(tmp_path, capsys):
    """A demo-style run (preset model, `model.tokenizer=tiny`) exports real tokenizer files: sample and convert
    need no override, and transformers' AutoTokenizer gives the tiny tokenizer's ids."""
    export = str(tmp_path / "model")
    assert cli.main(["sft", "--config", os.path.join(ROOT, "configs", "tiny_sft.yaml"), "model.tokenizer=tiny",
                     "train.steps=1", "train.batch_size=2", "mesh.shape=[1,1,1]", "logging.progress=false",
                     f"logging.dir={tmp_path / 'log'}", f"train.export_dir={export}"]) == 0
    text = "Janet’s ducks lay 16 eggs. <|im_start|>"
    assert convert.load_tokenizer_for(export).encode(text) == load_tokenizer("tiny").encode(text)
    assert cli.main(["sample", "--model", export, "--prompt", "1+1?", "--greedy", "--max-new-tokens", "2"]) == 0
    assert cli.main(["convert", "--from", export, "--to-hf", str(tmp_path / "hf")]) == 0
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(str(tmp_path / "hf")).encode(text) == load_tokenizer("tiny").encode(text)
