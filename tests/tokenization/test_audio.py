"""Audio tokenizer: front-end, windowed Whisper encoder, ids, persistence, warm-up on speech."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
import soundfile as sf
import torch
from transformers import WhisperConfig, WhisperModel

from tests.builders import read_docs
from tokenization.audio import AudioTokenizer, AudioTokenizerConfig, pad_mels
from tokenization.audio_trainer import AudioTokenizerTrainer, AudioTrainerConfig, mel_l1
from tokenization.errors import TokenizerInputError
from tokenization.quantizer import QuantizerConfig

REPO = Path(__file__).resolve().parents[2]
CORPUS = REPO / "examples" / "corpus"
# 2 s encoder windows (2 * 100 mel frames), so most corpus clips span several windows.
TINY_ENCODER = dict(
    d_model=32,
    encoder_layers=2,
    encoder_attention_heads=2,
    encoder_ffn_dim=64,
    max_source_positions=100,
)
WARMUP_STEPS = 40  # at learning rate 3e-3, full batch of the 10 training clips
HELD_OUT = ("asr-librivox_0870", "asr-cards_001")  # one long read sentence, one short command


class SpeechClip(NamedTuple):
    """One ASR document of the sample corpus."""

    doc_id: str
    path: Path
    samples: np.ndarray  # (n,) float64
    rate: int
    transcript: str

    @property
    def clip(self) -> tuple[np.ndarray, int]:
        return self.samples, self.rate


def tiny_config(**overrides: object) -> AudioTokenizerConfig:
    data: dict = dict(
        encoder=TINY_ENCODER,
        latent_dim=64,
        decoder_channels=64,
        decoder_blocks=1,
        # ema 0.9: unused codes decay below the restart threshold within a short warm-up.
        quantizer=QuantizerConfig(codebook_size=64, dim=16, ema_decay=0.9),
    )
    return AudioTokenizerConfig(**(data | overrides))


def tone(seconds: float, rate: int, hz: float = 440.0, channels: int = 1) -> np.ndarray:
    """A 0.5-amplitude sine, (n,) or (n, channels) float64."""
    t = np.arange(round(seconds * rate)) / rate
    wave = 0.5 * np.sin(2 * np.pi * hz * t)
    return wave if channels == 1 else np.stack([wave] * channels, axis=1)


@pytest.fixture(scope="module")
def corpus() -> list[SpeechClip]:
    """The 12 ASR documents, in file order."""
    found = []
    for doc in read_docs(CORPUS):
        if doc["id"].startswith("asr-"):
            audio = next(s for s in doc["segments"] if s["type"] == "audio")
            text = next(s for s in doc["segments"] if s["type"] == "text")
            samples, rate = sf.read(CORPUS / audio["path"])
            found.append(SpeechClip(doc["id"], CORPUS / audio["path"], samples, rate, text["text"]))
    assert len(found) == 12
    return found


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models are op-overhead bound: one intra-op thread is faster and does not
    oversubscribe a shared 2-CPU machine (measured: 0.12 s vs 0.45 s per step)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def clip_l1(predicted: torch.Tensor, mel: torch.Tensor) -> float:
    """Mel L1 of one clip (n_mels, >= F) against its log-mel (n_mels, F)."""
    frames = mel.shape[1]
    return mel_l1(predicted[None, :, :frames], mel[None], torch.tensor([frames]))


@pytest.fixture(scope="module")
def warmed(corpus, one_thread) -> dict:
    """A tiny tokenizer warmed up for WARMUP_STEPS full-batch steps on 10 clips, with the
    held-out mel L1 of decode(encode(clip)) before and after."""
    torch.manual_seed(0)
    tokenizer = AudioTokenizer.from_config(tiny_config())
    alphabet = sorted({c for item in corpus for c in item.transcript})  # char-level ids for L_cap
    trainer = AudioTokenizerTrainer(
        tokenizer, AudioTrainerConfig(text_vocab_size=len(alphabet), learning_rate=3e-3)
    )
    train = [item for item in corpus if item.doc_id not in HELD_OUT]
    held = [item.clip for item in corpus if item.doc_id in HELD_OUT]
    held_mels = [tokenizer.preprocess(*clip) for clip in held]
    mels, lengths = pad_mels([tokenizer.preprocess(*item.clip) for item in train])
    transcripts = [[alphabet.index(c) for c in item.transcript] for item in train]

    def held_out_l1() -> float:
        pairs = zip(tokenizer.encode(held), held_mels, strict=True)
        return float(np.mean([clip_l1(tokenizer.decode(ids), mel) for ids, mel in pairs]))

    before = held_out_l1()
    history = [trainer.step(mels, lengths, transcripts) for _ in range(WARMUP_STEPS)]
    frames = torch.cat([m[:, :n] for m, n in zip(mels, lengths, strict=True)], dim=1)
    mean_spectrum = frames.mean(1, keepdim=True)  # (n_mels, 1): a no-information baseline
    ids = torch.cat(tokenizer.encode([item.clip for item in corpus]))
    return dict(
        before=before,
        after=held_out_l1(),
        baseline=float(np.mean([clip_l1(mean_spectrum.expand_as(m), m) for m in held_mels])),
        history=history,
        codes_used=ids.unique().numel() / tokenizer.vocab_size,
        tokenizer=tokenizer,
    )


def test_config_rejects_inconsistent_settings() -> None:
    with pytest.raises(ValueError, match="50 / rate must be an integer"):
        AudioTokenizerConfig(token_rate_hz=15)
    with pytest.raises(ValueError, match="unknown keys"):
        AudioTokenizerConfig(encoder={"d_modle": 64})
    with pytest.raises(ValueError, match="divisible by the downsampling factor 4"):
        AudioTokenizerConfig(encoder={"max_source_positions": 102})
    with pytest.raises(ValueError, match="exclusive"):
        AudioTokenizerConfig(encoder_dir="/some/whisper", encoder={"d_model": 64})


def test_ids_shapes_and_token_counts(one_thread) -> None:
    torch.manual_seed(0)
    tokenizer = AudioTokenizer.from_config(tiny_config())
    seconds = [0.5, 2.0, 4.3]  # 4.3 s spans three 2 s windows
    ids = tokenizer.encode([(tone(s, 16000), 16000) for s in seconds])
    for clip_ids, s in zip(ids, seconds, strict=True):
        assert clip_ids.dtype == torch.long and clip_ids.ndim == 1
        assert len(clip_ids) == tokenizer.tokens_for_seconds(s)
        assert abs(len(clip_ids) - s * 12.5) <= 1
        assert int(clip_ids.min()) >= 0 and int(clip_ids.max()) < tokenizer.vocab_size
    assert tokenizer.decode(ids[1]).shape == (80, 25 * 8)
    assert tokenizer.codebook_vectors().shape == (64, 16)
    assert tokenizer.encode([]) == []

    mels, lengths = pad_mels([tokenizer.preprocess(tone(s, 16000), 16000) for s in seconds])
    rebuilt, vq, features, token_lengths = tokenizer(mels, lengths)
    assert rebuilt.shape == mels.shape == (3, 80, 430)
    assert token_lengths.tolist() == [7, 25, 54] and features.shape == (3, 54, 16)
    assert vq.ids.shape == (3, 54) and (vq.ids[0, 7:] == -1).all() and (features[0, 7:] == 0).all()


def test_two_codebooks_give_k_ids_per_position(one_thread) -> None:
    quantizer = QuantizerConfig(codebook_size=32, dim=16, num_codebooks=2)
    tokenizer = AudioTokenizer.from_config(tiny_config(quantizer=quantizer))
    (ids,) = tokenizer.encode([(tone(2.0, 16000), 16000)])
    assert len(ids) == 50 == tokenizer.tokens_for_seconds(2.0)
    assert int(ids.max()) < 64 and (ids[0::2] < 32).all() and (ids[1::2] >= 32).all()
    assert tokenizer.decode(ids).shape == (80, 25 * 8)


@pytest.mark.parametrize("trained", [False, True])
def test_ids_do_not_depend_on_the_batch(corpus, one_thread, trained: bool, request) -> None:
    """Also once trained: the code search then decodes through a conv decoder whose output
    near a clip's end changes with padding."""
    torch.manual_seed(0)
    tokenizer = request.getfixturevalue("warmed")["tokenizer"] if trained else None
    tokenizer = tokenizer or AudioTokenizer.from_config(tiny_config())
    clips = [item.clip for item in corpus]
    alone = [tokenizer.encode([clip])[0] for clip in clips]
    for batched, single in zip(tokenizer.encode(clips), alone, strict=True):
        assert torch.equal(batched, single)


@pytest.mark.parametrize(("rate", "channels"), [(8000, 1), (44100, 2)])
def test_resamples_to_16k(rate: int, channels: int) -> None:
    tokenizer = AudioTokenizer.from_config(tiny_config())
    samples = tone(1.5, rate, hz=1000.0, channels=channels)
    mel = tokenizer.preprocess(samples, rate)
    assert mel.shape == (80, 150)  # 1.5 s * 100 frames/s, as from 16 kHz
    reference = tokenizer.preprocess(tone(1.5, 16000, hz=1000.0), 16000)
    # Same spectrum as the tone recorded at 16 kHz: the resampler neither shifts nor aliases.
    assert (mel.mean(1).argmax() == reference.mean(1).argmax()).item()
    assert (mel[:, 2:-2] - reference[:, 2:-2]).abs().mean() < 0.05


def test_integer_pcm_equals_float() -> None:
    tokenizer = AudioTokenizer.from_config(tiny_config())
    pcm = (tone(1.0, 16000) * 32767).astype(np.int16)
    from_float = tokenizer.preprocess(pcm / 32767.0, 16000)
    assert torch.allclose(tokenizer.preprocess(pcm, 16000), from_float, atol=1e-5)


@pytest.mark.parametrize(
    ("samples", "rate", "message"),
    [
        (np.zeros(0), 16000, "empty audio"),
        (np.ones(16000, dtype=bool), 16000, "bad audio dtype"),
        (np.zeros(16000), 16000, "silent audio"),
        (np.full(16000, 1e-6), 16000, "silent audio"),
        (tone(0.05, 16000), 16000, "audio too short: 0.050 s"),
        (np.full(16000, np.nan), 16000, "non-finite audio"),
        (tone(1.0, 16000, channels=2).T, 16000, "bad audio shape"),
        (tone(1.0, 16000), 0, "bad sample rate"),
    ],
)
def test_rejects_unusable_audio(samples: np.ndarray, rate: int, message: str) -> None:
    tokenizer = AudioTokenizer.from_config(tiny_config())
    with pytest.raises(TokenizerInputError, match=f"^{message}.*clip 1"):
        tokenizer.encode([(tone(1.0, 16000), 16000), (samples, rate)])


def test_mel_l1_ignores_padding() -> None:
    a, b = torch.zeros(2, 3, 5), torch.ones(2, 3, 5)
    b[0, :, 2:] = 100.0  # padding of clip 0: must not count
    b[1, :, 4:] = 100.0
    assert mel_l1(a, b, torch.tensor([2, 4])) == pytest.approx(1.0)


def test_warmup_improves_held_out_reconstruction(warmed) -> None:
    # Measured (seed 0, 40 steps, 2 held-out clips): 0.374 -> 0.199; the mean spectrum of
    # the training frames scores 0.320; 42 of 64 codes used over the 12 clips.
    assert warmed["after"] < 0.75 * warmed["before"]
    assert warmed["after"] < 0.9 * warmed["baseline"]  # the codes carry clip information
    assert warmed["codes_used"] >= 0.3


def test_caption_loss_decreases(warmed) -> None:
    caption = [step["caption"] for step in warmed["history"]]
    assert np.mean(caption[-5:]) < 0.5 * np.mean(caption[:5])  # measured 2.87 -> 0.08
    assert all(np.isfinite(step["loss"]) for step in warmed["history"])


def test_step_without_transcripts_and_bad_ids(one_thread) -> None:
    tokenizer = AudioTokenizer.from_config(tiny_config())
    trainer = AudioTokenizerTrainer(tokenizer, AudioTrainerConfig(text_vocab_size=8))
    mels, lengths = pad_mels([tokenizer.preprocess(tone(s, 16000), 16000) for s in (0.5, 1.0)])
    metrics = trainer.step(mels, lengths)
    assert "caption" not in metrics and {"loss", "reconstruction", "vq", "usage"} <= set(metrics)
    with pytest.raises(ValueError, match=r"in \[0, 8\)"):
        trainer.step(mels, lengths, [[1, 2], [8]])


def test_saved_tokenizer_gives_identical_ids_in_a_fresh_process(warmed, corpus, tmp_path) -> None:
    tokenizer = warmed["tokenizer"]
    tokenizer.save_pretrained(tmp_path / "audio")
    assert sorted(p.name for p in (tmp_path / "audio").iterdir()) == [
        "config.json",
        "model.safetensors",
    ]
    paths = [str(item.path) for item in corpus]
    script = (
        "import json, sys, soundfile as sf\n"
        "from tokenization.audio import AudioTokenizer\n"
        "tok = AudioTokenizer.from_pretrained(sys.argv[1])\n"
        "ids = tok.encode([sf.read(p) for p in sys.argv[2:]])\n"
        "print(json.dumps([row.tolist() for row in ids]))\n"
    )
    env = os.environ | {"HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    done = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "audio"), *paths],
        capture_output=True,
        text=True,
        env=env,
        cwd=REPO,
        timeout=120,
        check=True,
    )
    fresh = json.loads(done.stdout.strip().splitlines()[-1])
    expected = tokenizer.encode([item.clip for item in corpus])
    assert fresh == [row.tolist() for row in expected]


def test_encoder_from_a_local_whisper_checkpoint(tmp_path, monkeypatch, one_thread) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    whisper = WhisperConfig(
        **TINY_ENCODER,
        decoder_layers=1,
        decoder_attention_heads=2,
        decoder_ffn_dim=64,
        vocab_size=8,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=3,
    )
    WhisperModel(whisper).save_pretrained(tmp_path / "whisper")
    with pytest.raises(ValueError, match="80 mel bins, n_mels=128"):
        AudioTokenizer.from_config(
            tiny_config(encoder_dir=str(tmp_path / "whisper"), encoder={}, n_mels=128)
        )
    config = tiny_config(encoder_dir=str(tmp_path / "whisper"), encoder={})
    tokenizer = AudioTokenizer.from_config(config)
    saved = WhisperModel.from_pretrained(tmp_path / "whisper").encoder.state_dict()
    for name, weight in tokenizer.encoder.state_dict().items():
        assert torch.equal(weight, saved[name]), name
    clip = (tone(3.0, 16000), 16000)
    ids = tokenizer.encode([clip])[0]

    tokenizer.save_pretrained(tmp_path / "audio")
    (tmp_path / "whisper" / "model.safetensors").unlink()  # the saved tokenizer stands alone
    reloaded = AudioTokenizer.from_pretrained(tmp_path / "audio")
    assert reloaded.config.encoder_dir is None
    assert torch.equal(reloaded.encode([clip])[0], ids)


def test_a_pickled_whisper_checkpoint_is_refused(tmp_path: Path) -> None:
    """Only safetensors weights load: a pytorch_model.bin is never unpickled."""
    import torch
    from transformers import WhisperConfig, WhisperModel

    tiny = WhisperConfig(d_model=16, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                         decoder_attention_heads=2, encoder_ffn_dim=32, decoder_ffn_dim=32,
                         vocab_size=16, max_source_positions=200, pad_token_id=0, bos_token_id=1,
                         eos_token_id=2, decoder_start_token_id=1)  # fmt: skip
    model = WhisperModel(tiny)
    model.save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()  # leave only a pickled checkpoint
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(OSError, match="safetensors"):
        AudioTokenizer.from_config(AudioTokenizerConfig(encoder_dir=str(tmp_path), encoder={}))


def test_caption_decoder_learns_at_its_own_rate(one_thread) -> None:
    tokenizer = AudioTokenizer.from_config(tiny_config())
    config = AudioTrainerConfig(
        text_vocab_size=8, learning_rate=1e-4, caption_learning_rate=1e-3, warmup_steps=0
    )
    trainer = AudioTokenizerTrainer(tokenizer, config)
    mels, lengths = pad_mels([tokenizer.preprocess(tone(s, 16000), 16000) for s in (0.5, 1.0)])
    trainer.step(mels, lengths, [[1, 2], [3]], progress=0.5)
    tokenizer_group, caption_group = trainer.optimizer.param_groups
    scale = 0.5 * (1 + config.min_lr_ratio)  # the cosine half-way
    assert tokenizer_group["lr"] == pytest.approx(1e-4 * scale)
    assert caption_group["lr"] == pytest.approx(1e-3 * scale)
    assert {id(p) for p in caption_group["params"]} == {id(p) for p in trainer.caption.parameters()}
    one_rate = config.model_copy(update={"caption_learning_rate": None})
    same = AudioTokenizerTrainer(tokenizer, one_rate)
    same.step(mels, lengths, [[1, 2], [3]], progress=0.5)
    assert [g["lr"] for g in same.optimizer.param_groups] == [pytest.approx(1e-4 * scale)] * 2
