"""Byte-level BPE text tokenizer: exact round trips, stable ids, deterministic training."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from tokenization.text import TextTokenizer, TextTokenizerConfig

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "examples" / "corpus" / "docs.jsonl"
CONFIG = TextTokenizerConfig(vocab_size=512)

SAMPLES = [
    "The quick brown fox jumps over the lazy dog.",
    "Crème brûlée, naïve façade, Ærøskøbing, São Paulo.",
    "e\u0301 (decomposed) vs \u00e9 (composed)",
    "東京は日本の首都です。你好，世界！",
    "emoji 🙂🚀 and a family 👨\u200d👩\u200d👧 🇫🇷",
    "  leading spaces, tabs\tand\nnew lines\r\n  ",
    "",
]


def corpus_texts() -> list[str]:
    """The text segments of the sample corpus, in file order."""
    lines = CORPUS.read_text(encoding="utf-8").splitlines()
    documents = [json.loads(line) for line in lines if line.strip()]
    return [s["text"] for d in documents for s in d["segments"] if s["type"] == "text"]


@pytest.fixture(scope="module")
def tokenizer() -> TextTokenizer:
    return TextTokenizer.train(corpus_texts(), CONFIG)


def run_python(code: str, *args: str) -> str:
    """Run ``code`` in a fresh interpreter (its own hash seeds) and return its stdout."""
    result = subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_trained_vocabulary_has_the_requested_size_and_no_special_tokens(
    tokenizer: TextTokenizer, tmp_path: Path
) -> None:
    assert tokenizer.vocab_size == 512
    tokenizer.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    assert saved["added_tokens"] == []
    assert saved["model"]["unk_token"] is None


@pytest.mark.parametrize("text", SAMPLES)
def test_round_trip_is_exact_for_any_unicode(tokenizer: TextTokenizer, text: str) -> None:
    [ids] = tokenizer.encode([text])
    assert all(0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text


def test_batches_keep_order_and_every_id_is_in_range(tokenizer: TextTokenizer) -> None:
    batch = tokenizer.encode(SAMPLES)
    assert len(batch) == len(SAMPLES)
    assert all(0 <= i < tokenizer.vocab_size for ids in batch for i in ids)
    assert tokenizer.decode_batch(batch) == SAMPLES
    assert batch[0] == tokenizer.encode([SAMPLES[0]])[0]


def test_bpe_merges_shorten_corpus_text(tokenizer: TextTokenizer) -> None:
    text = corpus_texts()[0]
    [ids] = tokenizer.encode([text])
    assert len(ids) < len(text.encode("utf-8"))


def test_out_of_range_ids_and_a_bare_string_are_errors(tokenizer: TextTokenizer) -> None:
    with pytest.raises(ValueError, match=r"out of range \[0, 512\): \[512\]"):
        tokenizer.decode([1, 512])
    with pytest.raises(ValueError, match="out of range"):
        tokenizer.decode([-1])
    with pytest.raises(TypeError, match="list of texts"):
        tokenizer.encode("not a list")  # type: ignore[arg-type]


def test_saved_tokenizer_gives_identical_ids_in_a_fresh_process(
    tokenizer: TextTokenizer, tmp_path: Path
) -> None:
    tokenizer.save_pretrained(tmp_path)
    code = (
        "import json, sys\n"
        "from tokenization.text import TextTokenizer\n"
        "tok = TextTokenizer.from_pretrained(sys.argv[1])\n"
        "print(json.dumps({'ids': tok.encode(json.loads(sys.argv[2])),"
        " 'config': tok.config.model_dump()}))\n"
    )
    loaded = json.loads(run_python(code, str(tmp_path), json.dumps(SAMPLES)))
    assert loaded["ids"] == tokenizer.encode(SAMPLES)
    assert loaded["config"] == CONFIG.model_dump()


def test_training_is_deterministic_within_and_across_processes(tmp_path: Path) -> None:
    texts = corpus_texts()
    TextTokenizer.train(texts, CONFIG).save_pretrained(tmp_path / "a")
    TextTokenizer.train(texts, CONFIG).save_pretrained(tmp_path / "b")
    code = (
        "import sys\n"
        "from tests.tokenization.test_text import CONFIG, corpus_texts\n"
        "from tokenization.text import TextTokenizer\n"
        "TextTokenizer.train(corpus_texts(), CONFIG).save_pretrained(sys.argv[1])\n"
    )
    run_python(code, str(tmp_path / "c"))
    first = (tmp_path / "a" / "tokenizer.json").read_bytes()
    assert (tmp_path / "b" / "tokenizer.json").read_bytes() == first
    assert (tmp_path / "c" / "tokenizer.json").read_bytes() == first


def test_from_config_loads_pretrained_or_trains(tokenizer: TextTokenizer, tmp_path: Path) -> None:
    tokenizer.save_pretrained(tmp_path)
    loaded = TextTokenizer.from_config(TextTokenizerConfig(pretrained_dir=str(tmp_path)))
    assert loaded.encode(SAMPLES) == tokenizer.encode(SAMPLES)
    trained = TextTokenizer.from_config(CONFIG, texts=corpus_texts())
    assert trained.encode(SAMPLES) == tokenizer.encode(SAMPLES)
    with pytest.raises(ValueError, match="pretrained_dir or pass texts"):
        TextTokenizer.from_config(CONFIG)


def test_missing_pretrained_dir_names_the_path(tmp_path: Path) -> None:
    missing = tmp_path / "no-such-tokenizer"
    with pytest.raises(FileNotFoundError, match="no-such-tokenizer"):
        TextTokenizer.from_config(TextTokenizerConfig(pretrained_dir=str(missing)))


def test_foreign_tokenizer_json_keeps_added_tokens_as_text_ids(tmp_path: Path) -> None:
    """A tokenizer.json made by ``tokenizers`` itself (like Qwen's) loads, added token included."""
    raw = Tokenizer(models.BPE())
    raw.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    raw.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=300, initial_alphabet=alphabet, show_progress=False)
    raw.train_from_iterator(corpus_texts(), trainer)
    raw.add_special_tokens(["<|endoftext|>"])
    file = tmp_path / "tokenizer.json"
    raw.save(str(file))

    loaded = TextTokenizer.from_pretrained(file)
    assert loaded.vocab_size == 301
    assert loaded.config == TextTokenizerConfig(vocab_size=301, pretrained_dir=str(file))
    text = "first document<|endoftext|>second 🙂"
    [ids] = loaded.encode([text])
    assert 300 in ids
    assert loaded.decode(ids) == text
    assert TextTokenizer.from_pretrained(tmp_path).encode([text]) == [ids]


@pytest.mark.parametrize("field", [{"vocab_size": 0}, {"min_frequency": 0}, {"merges": 3}])
def test_config_rejects_invalid_values(field: dict[str, int]) -> None:
    with pytest.raises(ValidationError):
        TextTokenizerConfig(**field)
