"""Text tokenizer: a thin wrapper over the ``tokenizers`` library reading a model directory's ``tokenizer.json``.

The special tokens of the image protocol are looked up by their text, so the same code serves the official Qwen2
tokenizer (ids 151665...) and small ones (the fixture's 755...).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from tokenizers import Tokenizer as _HFTokenizer

from .errors import CheckpointError, ConfigError, MissingFileError

IMAGE_AREA = "<|image_area|>"
BOI = "<|begin_of_image|>"
EOI = "<|end_of_image|>"
IMAGE_PLACEHOLDER = "<|image_placeholder|>"
PAD_CANDIDATES = ("[PAD]", "<|vision_pad|>", "<|endoftext|>")
EOS_CANDIDATES = ("<|endoftext|>", "<|im_end|>", "</s>")


@dataclass(frozen=True)
class SpecialIds:
    image_area: int
    boi: int
    eoi: int
    placeholder: int
    pad: int
    eos: int | None  # end of text, when the tokenizer has one
    bos: int | None = None  # tokenizer_config.json's bos_token (Qwen2's and the fixtures' have none)


class Tokenizer:
    def __init__(self, tok: _HFTokenizer, source: str = "<memory>", bos_token: str | None = None):
        self._tok = tok
        self.source = source
        ids = {}
        for name, text in (("image_area", IMAGE_AREA), ("boi", BOI), ("eoi", EOI), ("placeholder", IMAGE_PLACEHOLDER)):
            i = tok.token_to_id(text)
            if i is None:
                raise CheckpointError(f"tokenizer {source} lacks the special token {text!r} of the image protocol")
            ids[name] = i
        pad = next((tok.token_to_id(p) for p in PAD_CANDIDATES if tok.token_to_id(p) is not None), None)
        if pad is None:
            raise CheckpointError(f"tokenizer {source} has no padding token (looked for {PAD_CANDIDATES})")
        eos = next((tok.token_to_id(e) for e in EOS_CANDIDATES if tok.token_to_id(e) is not None), None)
        bos = None
        if bos_token is not None:
            bos = tok.token_to_id(bos_token)
            if bos is None:
                raise CheckpointError(f"tokenizer {source}: its bos_token {bos_token!r} is not in the vocabulary")
        self.special = SpecialIds(pad=pad, eos=eos, bos=bos, **ids)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike) -> Tokenizer:
        p = Path(path)
        f = p / "tokenizer.json" if p.is_dir() else p
        if not f.is_file():
            raise MissingFileError(f"tokenizer.json not found in {p}")
        try:
            tok = _HFTokenizer.from_file(str(f))
        except Exception as e:  # the tokenizers library raises a bare Exception for a file it cannot parse
            raise CheckpointError(f"{f} is not a valid tokenizer file: {e}") from None
        return cls(tok, source=str(f), bos_token=_bos_token(f.parent))

    def save_pretrained(self, path: str | os.PathLike) -> None:
        """``tokenizer.json``, and the bos token (if any) in ``tokenizer_config.json`` as Hugging Face writes it."""
        Path(path).mkdir(parents=True, exist_ok=True)
        self._tok.save(str(Path(path) / "tokenizer.json"))
        if self.special.bos is not None:
            bos = {"bos_token": self._tok.id_to_token(self.special.bos)}
            (Path(path) / "tokenizer_config.json").write_text(json.dumps(bos, indent=2) + "\n")

    def encode(self, text: str) -> list[int]:
        """Plain text -> ids (special tokens written in the text are recognised; nothing is added)."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def __len__(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)


def _bos_token(directory: Path) -> str | None:
    """``bos_token`` of a Hugging Face ``tokenizer_config.json`` (a string or {"content": ...}), if any."""
    f = directory / "tokenizer_config.json"
    if not f.is_file():
        return None
    try:
        bos = json.loads(f.read_text()).get("bos_token")
    except (json.JSONDecodeError, AttributeError) as e:
        raise ConfigError(f"{f} is not a valid tokenizer config: {e}") from None
    return bos.get("content") if isinstance(bos, dict) else bos


SPECIAL_TOKENS = ("<|endoftext|>", "[PAD]", IMAGE_AREA, BOI, EOI, IMAGE_PLACEHOLDER)  # ids 0..5 in a new tokenizer


def train_tokenizer(texts, vocab_size: int = 512) -> Tokenizer:
    """A byte-level BPE over ``texts`` with the image protocol's special tokens at ids 0-5
    (eos 0, pad 1, image area 2, boi 3, eoi 4, placeholder 5), for models trained from scratch."""
    from tokenizers import decoders, models, pre_tokenizers, trainers

    tok = _HFTokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return Tokenizer(tok, source="trained")
