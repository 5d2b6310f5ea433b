"""`xr-jax sample`: chat prompts with images -> the sampler -> JSONL, checked against transformers' greedy
`generate` on the same tiny checkpoint; forced exit and sampling options; user errors exit 2."""

import json
import types

import numpy as np
import pytest
import torch
from PIL import Image

from tests.tiny_checkpoint import TINY, tiny_vl_model
from xr_jax.sampling import chat as cs
from xr_jax.cli import commands as cli
from xr_jax.data import images as images_lib

S = TINY.special
STOPS = list(S.stop_ids)

CHATS = [
    {"messages": [{"role": "user", "content": "What is 2+2?"}]},
    {"messages": [{"role": "system", "content": "Be brief."},
                  {"role": "user", "content": [{"type": "image", "image": "red.png"},
                                               {"type": "text", "text": "What colour?"}]}]},
    {"messages": [{"role": "user", "content": [{"type": "text", "text": "Compare "},
                                               {"type": "image", "image": "red.png"},
                                               {"type": "image", "image": "imgs/blue.png"}]},
                  {"role": "assistant", "content": "Ok."},
                  {"role": "user", "content": "Which is wider?"}]},
]


def hf_greedy(model, prompt, max_new: int) -> list[int]:
    """transformers' greedy continuation of one `Prompt` (stop id included, as the sampler gives it)."""
    ids = torch.tensor([list(prompt.ids)])
    extra = {}
    if prompt.pixel_values is not None:
        extra = {"pixel_values": torch.from_numpy(prompt.pixel_values),
                 "image_grid_thw": torch.from_numpy(np.asarray(prompt.grid_thw))}
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                             eos_token_id=STOPS, pad_token_id=S.pad, **extra)
    return out[0, ids.shape[1]:].tolist()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    (root / "imgs").mkdir()
    Image.new("RGB", (56, 40), (220, 20, 20)).save(root / "red.png")
    Image.new("RGB", (90, 60), (20, 20, 220)).save(root / "imgs" / "blue.png")
    messages = root / "chats.jsonl"
    messages.write_text("".join(json.dumps(c) + "\n" for c in CHATS) + "\n")
    model = tiny_vl_model(seed=1)
    # Make greedy decoding of the first chat stop by itself: <|im_end|> takes the role of a token that only
    # its continuation uses (the others run on).
    first, *others = [hf_greedy(model, cs.encode_chat(TINY, c.messages, c.images), 12)
                      for c in cs.read_chats(str(messages))]
    token = next(t for t in first[1:] if not any(t in o for o in others))
    with torch.no_grad():
        model.lm_head.weight[S.im_end] = model.lm_head.weight[token] * 1.05
    model.save_pretrained(root / "hf")
    TINY.save_pretrained(str(root / "hf"))
    return types.SimpleNamespace(root=root, hf=str(root / "hf"), model=model, messages=str(messages))


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def test_prompt_encoding_is_the_qwen_chat_with_expanded_image_pads(tiny):
    chat = cs.read_chats(tiny.messages)[1]
    assert chat.images == (str(tiny.root / "red.png"),)
    prompt = cs.encode_chat(TINY, chat.messages, chat.images)
    _, grid = images_lib.preprocess_images([str(tiny.root / "red.png")])
    n_pads = int(np.prod(grid[0])) // 4
    expected = ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
                + "<|image_pad|>" * n_pads + "<|vision_end|>What colour?<|im_end|>\n<|im_start|>assistant\n")
    assert list(prompt.ids) == TINY.encode(expected) and n_pads >= 4
    np.testing.assert_array_equal(prompt.grid_thw, grid)


def test_system_flag_sets_the_system_message():
    plain, chosen = cs.prompt_chat("2+2?"), cs.prompt_chat("2+2?", system="Answer in French.")
    assert chosen.messages == ({"role": "system", "content": "Answer in French."}, plain.messages[0])
    assert list(cs.encode_chat(TINY, chosen.messages, ()).ids) == TINY.encode(
        "<|im_start|>system\nAnswer in French.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant\n")


def test_greedy_messages_match_transformers_generate(tiny, capsys):
    out = tiny.root / "greedy.jsonl"
    # batch size 2: the second batch is padded with a copy, whose output must be dropped
    assert cli.main(["sample", "--model", tiny.hf, "--messages", tiny.messages, "--greedy", "--max-new-tokens", "12",
                     "--batch-size", "2", "--output", str(out)]) == 0
    rows = read_jsonl(out)
    assert [(r["index"], r["sample"]) for r in rows] == [(0, 0), (1, 0), (2, 0)]
    for chat, row in zip(cs.read_chats(tiny.messages), rows):
        expected = hf_greedy(tiny.model, cs.encode_chat(TINY, chat.messages, chat.images), 12)
        assert row["token_ids"] == expected, chat.name
        assert row["text"] == TINY.decode(expected, skip_special_tokens=True)
        stopped = expected[-1] in STOPS
        assert row["finish_reason"] == ("eos" if stopped else "length") and row["forced_exit"] is False
    # the first chat stops on <|im_end|> (included), another runs to the length cap
    assert rows[0]["token_ids"][-1] == S.im_end and len(rows[0]["token_ids"]) <= 4
    assert any(r["finish_reason"] == "length" and len(r["token_ids"]) == 12 for r in rows)


def test_sampling_forced_exit_checkpoint_and_tokenizer_flag(tiny, tmp_path, capsys):
    ckpt = str(tmp_path / "ckpt")
    assert cli.main(["convert", "--from-hf", tiny.hf, "--to", ckpt]) == 0
    capsys.readouterr()
    opts = ["--prompt", "Think first.", "--image", str(tiny.root / "red.png"), "--temperature", "1.5", "--top-p",
            "0.95", "--num-samples", "3", "--max-think", "5", "--max-answer", "4", "--seed", "7"]
    a, b, c = (str(tmp_path / f"{n}.jsonl") for n in "abc")
    assert cli.main(["sample", "--model", ckpt, *opts, "--output", a]) == 0  # tokenizer from ckpt/assets
    printed = capsys.readouterr().out
    rows = read_jsonl(a)
    assert [r["sample"] for r in rows] == [0, 1, 2] and {r["index"] for r in rows} == {0}
    exit_ids = TINY.encode("</think>")
    for r in rows:
        assert r["text"] in printed
        ids = r["token_ids"]
        if r["forced_exit"]:  # a random model does not write </think> itself: it is written after 5 tokens
            assert ids[5:13] == exit_ids and len(ids) <= 5 + 8 + 4
            assert r["finish_reason"] == ("forced_exit" if ids[-1] in STOPS else "length")
        else:
            assert r["finish_reason"] == "eos" and len(ids) <= 5
    assert sum(r["forced_exit"] for r in rows) >= 2
    assert len({tuple(r["token_ids"]) for r in rows}) == 3  # each sample has its own random stream
    # The HF dir with --tokenizer tiny (the same ids) samples the same; another seed samples differently.
    assert cli.main(["sample", "--model", tiny.hf, "--tokenizer", "tiny", *opts, "--output", b]) == 0
    assert read_jsonl(b) == rows
    assert cli.main(["sample", "--model", tiny.hf, *opts[:-1], "8", "--output", c]) == 0
    assert [r["token_ids"] for r in read_jsonl(c)] != [r["token_ids"] for r in rows]


@pytest.mark.parametrize("case, message", [
    ("bad_json", "bad.jsonl:2: not valid JSON"),
    ("no_messages", 'no_messages.jsonl:1: expected {"messages": [...]}'),
    ("missing_image", "no.png' does not exist"),
    ("corrupt_image", "unreadable image"),
    ("image_with_messages", "--image goes with --prompt"),
    ("answer_without_think", "--max-answer needs --max-think"),
    ("no_model", "is not a checkpoint directory"),
    ("tokenizer_too_big", "outside the vocabulary"),
    ("system_with_messages", "--system goes with --prompt"),
    ("unknown_tokenizer", "--tokenizer: unknown tokenizer 'qwen9'"),
])
def test_user_errors_exit_2_with_one_line(tiny, tmp_path, capsys, case, message):
    files = {"bad": '{"messages": [{"role": "user", "content": "hi"}]}\n{oops\n', "no_messages": '{"prompt": "hi"}\n',
             "missing_image": json.dumps({"messages": [
                 {"role": "user", "content": [{"type": "image", "image": "no.png"}]}]})}
    for name, text in files.items():
        (tmp_path / f"{name}.jsonl").write_text(text)
    base = ["sample", "--model", tiny.hf, "--greedy", "--max-new-tokens", "4", "--output", str(tmp_path / "o.jsonl")]
    argv = {
        "bad_json": [*base, "--messages", str(tmp_path / "bad.jsonl")],
        "no_messages": [*base, "--messages", str(tmp_path / "no_messages.jsonl")],
        "missing_image": [*base, "--messages", str(tmp_path / "missing_image.jsonl")],
        "corrupt_image": [*base, "--prompt", "hi", "--image", str(tmp_path / "bad.jsonl")],
        "image_with_messages": [*base, "--messages", tiny.messages, "--image", "x.png"],
        "answer_without_think": [*base, "--prompt", "hi", "--max-answer", "3"],
        "no_model": ["sample", "--model", str(tmp_path / "nope"), "--prompt", "hi"],
        "tokenizer_too_big": [*base, "--prompt", "hi", "--tokenizer", "qwen2.5"],
        "system_with_messages": [*base, "--messages", tiny.messages, "--system", "x"],
        "unknown_tokenizer": [*base, "--prompt", "hi", "--tokenizer", "qwen9"],
    }[case]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert message in err[-1] and err[-1].startswith("xr-jax sample: error:")
