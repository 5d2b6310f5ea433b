"""The Python chat template equals transformers' rendering of the Qwen2.5-VL Jinja template; prompt templates."""

import pytest

from xr_jax.data import templates


@pytest.fixture(scope="module")
def hf_render():
    """transformers' apply_chat_template (its Jinja environment) on a throwaway tokenizer object."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"x": 0}, unk_token="x")))

    def render(messages, add_generation_prompt=False, **kwargs):
        return hf.apply_chat_template(messages, chat_template=templates.QWEN2_5_VL_CHAT_TEMPLATE, tokenize=False,
                                      add_generation_prompt=add_generation_prompt, **kwargs)

    return render


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}],
    [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}],
    [{"role": "user", "content": [{"type": "image", "image": "a.png"}, {"type": "image_url", "image_url": "b"},
                                  {"type": "text", "text": "Compare {these} two."}]},
     {"role": "assistant", "content": [{"type": "text", "text": "<think>\nsame\n</think>\n\n<answer>A</answer>"}]},
     {"role": "user", "content": [{"type": "video"}, {"type": "text", "text": "And this?"}]}],
    [{"role": "user", "content": "  spaces \n\n and newlines\n"}, {"role": "assistant", "content": ""}],
    templates.build_messages(templates.X_REASONER_TRAIN.format("Solve $x^{2}=4$."), n_images=1, response="<think>x</think>"),
]


@pytest.mark.parametrize("index", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_render_chat_equals_transformers(hf_render, index, add_generation_prompt):
    messages = CONVERSATIONS[index]
    assert templates.render_chat(messages, add_generation_prompt) == hf_render(messages, add_generation_prompt)


def test_add_vision_id_equals_transformers(hf_render):
    messages = CONVERSATIONS[3]
    assert templates.render_chat(messages, add_vision_id=True) == hf_render(messages, add_vision_id=True)
    assert "Picture 2: <|vision_start|>" in templates.render_chat(messages, add_vision_id=True)


def test_reference_example_string():
    text = templates.render_chat([{"role": "user", "content": "T"}], add_generation_prompt=True)
    assert text == "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nT<|im_end|>\n<|im_start|>assistant\n"


def test_expand_image_pads():
    text = "a<|vision_start|><|image_pad|><|vision_end|>b<|vision_start|><|image_pad|><|vision_end|>"
    out = templates.expand_image_pads(text, [2, 3])
    assert out == "a<|vision_start|>" + "<|image_pad|>" * 2 + "<|vision_end|>b<|vision_start|>" + "<|image_pad|>" * 3 + "<|vision_end|>"
    with pytest.raises(ValueError, match="2 <\\|image_pad\\|> placeholders but 1 images"):
        templates.expand_image_pads(text, [4])


def test_x_reasoner_prompt_templates():
    train = templates.get_prompt_template("x_reasoner_train").format("What is $\\frac{1}{2}$?")
    assert train == (
        "You will solve a problem/request. You should provide your thoughts within <think> </think> tags before "
        "providing the answer.\nWrite your final answer within <answer> </answer> tags. Here is the question: "
        "What is $\\frac{1}{2}$?"
    )
    mc = templates.get_prompt_template("x_reasoner_eval_mc").format("Which?", {"A": "Yes", "B": "No"})
    assert mc.startswith("You should provide your thoughts within <think> </think> tags, then answer with just one")
    assert "question is \n'Is the earth flat?\n A: Yes \nB: No', you should answer with <think>...</think> <answer>B: No </answer>)." in mc
    assert mc.endswith("Here is the question: Which?\n\nOptions:\n\nA: Yes\nB: No")
    math = templates.get_prompt_template("x_reasoner_eval_math").format("1+1?")
    assert math.startswith("A conversation between User and Assistant.") and math.endswith("<answer>2 </answer>).\n\nHere is the question: 1+1?")
    assert "Options" not in math


def test_custom_prompt_template_and_errors():
    custom = templates.PromptTemplate("short_test", "Q: {{ question }}\nA:")
    assert custom.format("{x}") == "Q: {x}\nA:"  # braces in questions stay verbatim
    assert templates.get_prompt_template(custom) is custom
    with pytest.raises(ValueError, match="unknown prompt template 'nope'"):
        templates.get_prompt_template("nope")
    with pytest.raises(ValueError, match="must contain"):
        templates.register_prompt_template(templates.PromptTemplate("bad_test", "no placeholder"))
    with pytest.raises(ValueError, match="message 0 must be a dict with 'role' and 'content'"):
        templates.render_chat([{"content": "x"}])



def test_run_config_sets_prompt_template_and_system_message():
    """`data.prompt_template` and `data.system` reach the SFT rows and the GRPO prompts."""
    from xr_jax import config as config_lib
    from xr_jax.data.tokenizer import load_tokenizer
    from xr_jax.train import grpo, setup, sft

    tok = load_tokenizer("tiny")
    base = ["data.source=synthetic", "model.tokenizer=tiny", "data.synthetic.num_examples=4", "data.pack=false",
            "data.shuffle=false", "train.batch_size=2", "train.seq_len=256", "train.steps=1", "data.prompt_template=think"]
    for system, expected in ((None, templates.DEFAULT_SYSTEM_MESSAGE), ("", "")):
        cfg = config_lib.load(None, base + ([] if system is None else [f"data.system={system}"]))
        expression = setup.make_source(cfg)[0].meta["expression"]
        prefix = (f"<|im_start|>system\n{expected}<|im_end|>\n<|im_start|>user\n"
                  f"Think step by step. What is {expression}?<|im_end|>\n<|im_start|>assistant\n")
        row = next(sft.make_batches(cfg, setup.build_model(cfg, None, tok)[0], tok))["input_ids"][0]
        assert tok.decode([t for t in row if t != tok.special.pad]).startswith(prefix)
        prompts = next(grpo.load_prompts(cfg, tok))
        assert tok.decode([t for t in prompts["prompt_ids"][0] if t != tok.special.pad]) == prefix
