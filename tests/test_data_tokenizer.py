"""The built-in Qwen2.5 tokenizer equals transformers' Qwen2Tokenizer built from the same BPE ranks."""

import json
import pathlib

import numpy as np
import pytest

from xr_jax.data import templates
from xr_jax.data import tokenizer as T

FIXTURES = pathlib.Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(scope="module")
def ours():
    return T.load_tokenizer("qwen2.5")


@pytest.fixture(scope="module")
def reference():
    """transformers' own Qwen2Tokenizer (its NFC normaliser, Qwen2 split regex, byte-level BPE) over the
    vocabulary and merges that transformers' TikTokenConverter derives from the same `.tiktoken` ranks."""
    from tokenizers import AddedToken
    from transformers import Qwen2Tokenizer
    from transformers.convert_slow_tokenizer import TikTokenConverter

    model = json.loads(TikTokenConverter(vocab_file=T.qwen_ranks_path(), pattern=T.QWEN2_PRETOKENIZE_REGEX)
                       .converted().to_str())["model"]
    ref = Qwen2Tokenizer(vocab=model["vocab"], merges=[tuple(m) for m in model["merges"]])  # adds <|endoftext|>
    ref.add_tokens([AddedToken(t, special=i < 14, normalized=False)
                    for i, t in enumerate(T.QWEN2_5_ADDED_TOKENS) if i > 0])
    assert len(ref) == 151665
    return ref


def _corpus() -> list[str]:
    texts = []
    for line in (FIXTURES / "gsm8k_test_50.jsonl").read_text().splitlines():
        row = json.loads(line)
        texts += [row["question"], row["answer"]]
    for name in ("math500_40.json", "gpqa_diamond_30.json"):
        for item in json.loads((FIXTURES / name).read_text()):
            texts += [item["prompt"][0]["value"], item["final_answer"]]
    texts += [
        "Hello", " world", "</think>", "<think>", " </think>", "</think>\n\n", "done.</think>\n\n<answer>5</answer>",
        "<answer>\\boxed{5}</answer>", "</think><answer>", "I'LL SHE'S we'Re it'd", "12345.678 1,000,000 3.14159",
        "naïve café — “quotes” ‘single’ … ½ ≤ ≥ ∑ ∫ √2 π", "e\u0301 vs é; A\u030a vs Å; \u212b",  # NFC cases
        "中文分词测试，数学题：一加一等于二。", "日本語のテキストです。", "한국어 문장입니다.", "مرحبا بالعالم", "Привет, мир!",
        "emoji 😀👍🏽🇺🇳 family 👨‍👩‍👧", "zero\u200bwidth\u00a0nbsp\u2009thin", "tab\tsep\tvalues\n",
        "    leading spaces", "trailing spaces    ", "a  b   c    d", "\n\n\n", "\r\n\r\nwindows\r\n", " \n \n ", "\t\t\n  \n",
        "def f(x):\n    return x ** 2  # square\n\n\nprint(f(3))\n",
        "for (int i = 0; i < n; ++i) { sum += a[i]; }", "SELECT * FROM t WHERE id='x';", "$$\\int_0^1 x^2\\,dx = \\frac13$$",
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n",
        "<|vision_start|><|image_pad|><|image_pad|><|vision_end|>", "x<|endoftext|>y<|file_sep|>z<tool_call>{}</tool_call>",
        "<|im_start|><|im_end|><|im_start|>", "not a special: <|im_startx|> <|IM_END|>", "", " ", "a",
    ]
    texts.append(templates.render_chat(templates.build_messages("What is 2+2?", n_images=1, response="4"), True))
    rng = np.random.default_rng(0)
    alphabet = list("abcXYZ019 \n\t.,;:'\"!?-_()[]{}<>|/\\@#$%^&*+=~`") + ["é", "ß", "中", "😀", "\u0301", "\u00a0", "<|im_end|>"]
    for _ in range(150):
        texts.append("".join(rng.choice(alphabet, size=int(rng.integers(1, 40)))))
    return texts


def test_published_ids(ours):
    assert ours.encode("Hello") == [9707]
    assert ours.encode(" world") == [1879]
    assert ours.encode("</think>") == [522, 26865, 29]
    assert ours.encode("<|im_start|>assistant\n") == [151644, 77091, 198]
    assert ours.encode("done.</think>\n\n<answer>5</answer>")[-10:] == [3918, 26865, 1339, 27, 9217, 29, 20, 522, 9217, 29]
    assert [ours.encode(t)[0] for t in T.QWEN2_5_ADDED_TOKENS] == list(range(151643, 151665))
    assert ours.vocab_size == 151665
    s = ours.special
    assert (s.pad, s.eos, s.im_start, s.image_pad, s.vision_start, s.vision_end) == (151643, 151645, 151644, 151655, 151652, 151653)


def test_ids_equal_transformers_on_a_varied_corpus(ours, reference):
    corpus = _corpus()
    assert len(corpus) > 300
    mismatches = [t for t in corpus if ours.encode(t) != reference.encode(t, add_special_tokens=False)]
    assert not mismatches, f"{len(mismatches)} strings differ, e.g. {mismatches[:3]!r}"


def test_decode_and_token_bytes_equal_transformers(ours, reference):
    for text in _corpus()[::7]:
        ids = ours.encode(text)
        assert ours.decode(ids) == reference.decode(ids)
        assert ours.decode(ids, skip_special_tokens=True) == reference.decode(ids, skip_special_tokens=True)
    # a multi-byte character cut in half decodes to U+FFFD in both
    ids = ours.encode("𝔘🦩")  # rare characters: several byte-level tokens each
    assert len(ids) > 2 and ours.decode(ids[:1]) == reference.decode(ids[:1])
    think = b"".join(ours.token_bytes(i) for i in ours.encode("x.</think>\n\n"))
    assert think == b"x.</think>\n\n"
    assert ours.token_bytes(151645) == b"<|im_end|>"


def test_checkpoint_directory_tokenizer(tmp_path, ours, reference):
    reference.chat_template = templates.QWEN2_5_VL_CHAT_TEMPLATE
    reference.save_pretrained(tmp_path)
    hf = T.load_tokenizer(str(tmp_path))
    for text in _corpus()[::5]:
        assert hf.encode(text) == ours.encode(text)
    assert hf.special == ours.special
    for i in [0, 198, 522, 26865, 1339, 151642, 151645, 151655]:
        assert hf.token_bytes(i) == ours.token_bytes(i)
    messages = templates.build_messages("Q?", n_images=2, response="A")
    assert hf.apply_chat_template(messages) == ours.apply_chat_template(messages)


@pytest.mark.parametrize("name", ["qwen2.5", "tiny"])
def test_builtin_tokenizers_save_as_real_files_with_the_same_ids(tmp_path, name):
    """What an export of a preset model carries: transformers loads the files and gives the built-in's ids."""
    from transformers import AutoTokenizer

    builtin = T.load_tokenizer(name)
    builtin.save_pretrained(str(tmp_path))
    saved, hf = T.load_tokenizer(str(tmp_path)), AutoTokenizer.from_pretrained(str(tmp_path))
    messages = templates.build_messages("Q?", n_images=1, response="<think>x</think>A", system="Be brief.")
    for text in _corpus()[::7] + [builtin.apply_chat_template(messages)]:
        assert saved.encode(text) == builtin.encode(text) == hf.encode(text, add_special_tokens=False)
    assert saved.special == builtin.special and saved.vocab_size == builtin.vocab_size == len(hf)
    assert saved.apply_chat_template(messages) == builtin.apply_chat_template(messages)
    assert saved.decode(builtin.encode("a <|im_end|>b"), skip_special_tokens=True) == "a b"


def test_tiny_tokenizer_id_map():
    tiny = T.load_tokenizer("tiny")
    assert tiny.vocab_size == 278
    s = tiny.special
    assert (s.pad, s.im_start, s.eos, s.vision_start, s.vision_end, s.image_pad, s.video_pad) == (256, 257, 258, 265, 266, 268, 269)
    text = "héllo <|im_start|>assistant\n</think>😀"
    ids = tiny.encode(text)
    assert max(ids) < tiny.vocab_size and tiny.decode(ids) == text
    assert ids[:2] == [ord("h"), 0xC3] and 257 in ids
    assert b"".join(tiny.token_bytes(i) for i in ids) == text.encode()


def test_unknown_tokenizer_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown tokenizer 'qwen3'"):
        T.load_tokenizer("qwen3")


def test_prompt_ids_equal_transformers_processing(ours, reference):
    """Chat template + image-pad expansion + tokenisation = what Qwen2_5_VLProcessor does: its
    `<|image_pad|>` -> grid.prod() // merge_size**2 copies, from the transformers image processor's grids.
    (The processor object itself needs torchvision for its video half, which the CPU test env lacks.)"""
    from PIL import Image
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    from xr_jax.data import images

    rng = np.random.default_rng(0)
    pics = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in [(100, 150), (60, 300)]]
    messages = templates.build_messages("Compare the two pictures.", n_images=2)
    text = reference.apply_chat_template(messages, chat_template=templates.QWEN2_5_VL_CHAT_TEMPLATE,
                                         add_generation_prompt=True, tokenize=False)
    assert text == ours.apply_chat_template(messages, add_generation_prompt=True)
    hf_grid = Qwen2VLImageProcessorPil()(images=pics, return_tensors="np")["image_grid_thw"]
    hf_text = text
    for t, h, w in hf_grid:  # the processor's loop (processing_qwen2_5_vl.py)
        hf_text = hf_text.replace("<|image_pad|>", "<|placeholder|>" * int(t * h * w // 4), 1)
    hf_ids = reference.encode(hf_text.replace("<|placeholder|>", "<|image_pad|>"), add_special_tokens=False)
    _, grid = images.preprocess_images(pics)
    ids = ours.encode(templates.expand_image_pads(text, images.image_pad_counts(grid)))
    assert ids == hf_ids
    assert ids.count(ours.special.image_pad) == 20 + 22  # (8x10 + 4x22 patches) / 4
