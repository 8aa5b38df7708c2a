"""Byte-level BPE text tokenizer: text <-> ids in ``[0, vocab_size)``.

Byte-level BPE (GPT-2 / Qwen style, via HF ``tokenizers``) maps any UTF-8 text to ids with no
unknown token, and decoding restores the text exactly. The BPE holds no special tokens: the
project's ``<BOS>``, ``<EOS>``, ``<PAD>``, ``<MASK>`` ... live in the unified vocabulary, which
is laid out around the text ids ``[0, vocab_size)`` this tokenizer produces.

A pretrained ``tokenizer.json`` (e.g. Qwen2.5's) may carry its own added tokens
(``<|endoftext|>``, ``<|im_start|>`` ...). They are kept as ordinary text ids: their literal
text encodes to their id and decodes back to the same text, and they are never stripped
or inserted implicitly (no BOS/EOS template). Its normalizer, if any (Qwen: NFC), is kept too,
so round trips there are exact only for text already in that normal form.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tokenization.config import TextTokenizerConfig

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "text_config.json"


class TextTokenizer:
    """A byte-level BPE tokenizer whose ids are exactly ``[0, vocab_size)``.

    ``config`` is the config it was trained with (restored from ``text_config.json``), or for
    a foreign ``tokenizer.json`` one that points at it with its real size.
    """

    def __init__(self, tokenizer: Tokenizer, config: TextTokenizerConfig) -> None:
        """Wrap a ``tokenizers.Tokenizer``; its ids must be contiguous from 0, since the
        unified vocabulary places the special and media ids right after them."""
        top = max(tokenizer.get_vocab(with_added_tokens=True).values(), default=-1)
        size = tokenizer.get_vocab_size(with_added_tokens=True)
        if top + 1 != size:
            raise ValueError(f"tokenizer ids are not contiguous: {size} tokens, max id {top}")
        self._tokenizer = tokenizer
        self.config = config

    @classmethod
    def train(cls, texts: Iterable[str], config: TextTokenizerConfig) -> TextTokenizer:
        """Train a byte-level BPE on ``texts``; the same texts and config give the same
        ``tokenizer.json``. The full byte alphabet is seeded so unseen characters still
        encode (as bytes) instead of becoming an unknown token."""
        tokenizer = Tokenizer(models.BPE())
        tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tokenizer.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=config.vocab_size,
            min_frequency=config.min_frequency,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        tokenizer.train_from_iterator(texts, trainer)
        return cls(tokenizer, config)

    @classmethod
    def from_config(
        cls, config: TextTokenizerConfig, texts: Iterable[str] | None = None
    ) -> TextTokenizer:
        """Load ``config.pretrained_dir`` when set, otherwise train on ``texts``."""
        if config.pretrained_dir is not None:
            return cls.from_pretrained(config.pretrained_dir)
        if texts is None:
            raise ValueError("text tokenizer: set pretrained_dir or pass texts to train on")
        return cls.train(texts, config)

    @classmethod
    def from_pretrained(cls, path: str | Path) -> TextTokenizer:
        """Load a directory holding ``tokenizer.json`` (as written by ``save_pretrained`` or
        shipped with an HF model), or the ``tokenizer.json`` file itself."""
        file = Path(path)
        if file.is_dir():
            file = file / TOKENIZER_FILE
        if not file.is_file():
            raise FileNotFoundError(f"text tokenizer not found: {file}")
        tokenizer = Tokenizer.from_file(str(file))
        config_file = file.parent / CONFIG_FILE
        if config_file.is_file():
            config = TextTokenizerConfig.model_validate_json(config_file.read_text("utf-8"))
        else:
            size = tokenizer.get_vocab_size(with_added_tokens=True)
            config = TextTokenizerConfig(vocab_size=size, pretrained_dir=str(path))
        return cls(tokenizer, config)

    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``tokenizer.json`` and ``text_config.json`` (the config it came from)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self._tokenizer.save(str(out / TOKENIZER_FILE))
        config = json.dumps(self.config.model_dump(), indent=2, sort_keys=True)
        (out / CONFIG_FILE).write_text(config + "\n", encoding="utf-8")

    @property
    def vocab_size(self) -> int:
        """Number of text ids, added tokens included: every id is in ``[0, vocab_size)``."""
        return self._tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, texts: list[str]) -> list[list[int]]:
        """Encode a batch of texts (in parallel); no BOS/EOS is added."""
        if isinstance(texts, str):
            raise TypeError("encode takes a list of texts, not a single str")
        encodings = self._tokenizer.encode_batch(texts, add_special_tokens=False)
        return [encoding.ids for encoding in encodings]

    def decode(self, ids: Sequence[int]) -> str:
        """Decode one id sequence; added tokens are decoded as their text, not skipped."""
        return self.decode_batch([ids])[0]

    def decode_batch(self, batch: Sequence[Sequence[int]]) -> list[str]:
        """Decode many id sequences. An id outside ``[0, vocab_size)`` is an error (the
        backend would drop it silently), e.g. a unified id passed without its offset."""
        size = self.vocab_size
        rows = [[int(i) for i in ids] for ids in batch]
        bad = [i for row in rows for i in row if not 0 <= i < size]
        if bad:
            raise ValueError(f"text ids out of range [0, {size}): {bad[:5]}")
        return self._tokenizer.decode_batch(rows, skip_special_tokens=False)
